"""The backend table (sam_fused/_backends.py BACKENDS) is the one place a backend is declared.

Every backend usable here has every op of _registry.SCHEMAS; dispatch, backends(), ops.py and the benchmark read the
table: a backend added to it is served by all of them, and no module keeps a list of backend names of its own. (That
the self-check needs neither ops nor _backends, i.e. no import cycle, is tests/test_imports.py's.)
"""

from __future__ import annotations

import ast
import inspect
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from sam_fused.bench import baselines

import sam_fused
from sam_fused import _backends, ops, reference
from sam_fused._backends import Backend, BackendStatus
from sam_fused._registry import NAMESPACES, SCHEMAS, STEP_SCHEMAS

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


# ---- every backend has every op --------------------------------------------------------------------------------------


def _device_types_here(backend: Backend) -> list[str]:
    """The device types whose kernels `backend` registered in this process (the ones it runs here)."""
    candidates = ["cpu", "cuda"] if backend.devices is None else [*backend.devices, *backend.interpreted_on]
    return [t for t in candidates if backend.runs(torch.device(t))]


def _schema_arguments(schema: str) -> list[str]:
    return [a.name for a in torch._C.parse_schema(schema).arguments]


def _missing_functions(table: object, wanted: dict[str, str]) -> list[str]:
    """The ops of `wanted` that `table` has no function for with the schema's arguments (the reference's kind)."""
    missing = []
    for op, schema in wanted.items():
        fn = getattr(table, op, None)
        if fn is None or list(inspect.signature(fn).parameters) != _schema_arguments(schema):
            missing.append(op)
    return missing


def _missing_kernels(namespace: str, wanted: dict[str, str], device_types: list[str]) -> list[str]:
    """The ops of `wanted` with no kernel in torch.ops namespace `namespace` for a device type's dispatch key."""
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    return [f"{op} ({t})" for op in wanted for t in device_types if not has(f"{namespace}::{op}", t.upper())]


def _missing_ops(backend: Backend, device_types: list[str]) -> list[str]:
    """The ops of _registry.SCHEMAS (and restore_sgd_ when it claims a fused one) that `backend` lacks."""
    wanted = {**SCHEMAS, **(STEP_SCHEMAS if backend.fused_sgd_dtypes else {})}
    if backend.namespace is None:
        return _missing_functions(backend.op_table(), wanted)
    return _missing_kernels(backend.namespace, wanted, device_types)


@pytest.mark.parametrize("backend", _backends.BACKENDS, ids=_backends.NAMES)
def test_every_backend_has_every_op(backend: Backend) -> None:
    if not _backends.status(backend.name).available:
        pytest.skip(f"{backend.name}: {_backends.status(backend.name).detail}")
    device_types = _device_types_here(backend)
    assert device_types, f"{backend.name} is available but runs no device type here"
    assert _missing_ops(backend, device_types) == []


def test_a_missing_op_is_found() -> None:
    """The check above catches a backend that lacks an op or has one with other arguments."""
    assert _missing_kernels("sam_fused", SCHEMAS, ["xpu"]) == [f"{op} (xpu)" for op in SCHEMAS]  # no XPU kernels

    class Partial:  # the reference without fsam_direction_, and perturb_batched with too few arguments
        grad_sumsq, perturb_, restore_ = reference.grad_sumsq, reference.perturb_, reference.restore_

        @staticmethod
        def perturb_batched(params: list, grads: list) -> list:
            return params

    assert _missing_functions(Partial, SCHEMAS) == ["perturb_batched", "fsam_direction_"]


# ---- the table itself ------------------------------------------------------------------------------------------------


def test_names_order_and_auto_order_are_the_documented_ones() -> None:
    assert _backends.NAMES == ("torch", "cpu", "triton", "cuda")  # backends()'s keys and order: public
    assert _backends.auto_order("cuda") == ("cuda", "triton", "torch")  # README "Backends", docs/DESIGN.md section 4
    assert _backends.auto_order("cpu") == ("cpu", "torch")
    assert _backends.auto_order("mps") == ("torch",)


def test_every_namespace_is_defined_by_the_registry() -> None:
    """A backend's kernels can only register ops that _registry defined in its namespace."""
    assert {b.namespace for b in _backends.BACKENDS} - {None} <= set(NAMESPACES)


def test_the_reference_runs_everything_and_comes_last() -> None:
    ref = _backends.entry(_backends.REFERENCE)
    assert ref.devices is None and ref.dtypes is None and ref.auto_rank == 0 and ref.op_table() is reference
    assert all(b.auto_rank > 0 for b in _backends.BACKENDS if b is not ref)
    assert not ref.self_checks  # it is what the others are checked against


# ---- dispatch, ops.py and the benchmark read the table --------------------------------------------------------------


@pytest.fixture
def with_fake_backend(monkeypatch: pytest.MonkeyPatch) -> Iterator[Backend]:
    """The table plus one entry, "fake": the reference's ops declared as a CPU fp32 backend that `auto` prefers."""
    fake = Backend("fake", lambda: BackendStatus(True, "a test entry"), namespace=None, devices=("cpu",),
                   dtypes=(torch.float32,), auto_rank=99)
    table = (*_backends.BACKENDS, fake)
    monkeypatch.setattr(_backends, "BACKENDS", table)
    monkeypatch.setattr(_backends, "_BY_NAME", {b.name: b for b in table})
    monkeypatch.setattr(_backends, "NAMES", tuple(b.name for b in table))
    monkeypatch.setattr(_backends, "_status", {})
    monkeypatch.setattr(_backends, "_chosen", {})
    monkeypatch.delenv("SAM_FUSED_BACKEND", raising=False)
    _backends.auto_order.cache_clear()
    yield fake
    _backends.auto_order.cache_clear()


def test_dispatch_serves_a_backend_added_to_the_table(with_fake_backend: Backend) -> None:
    assert sam_fused.backends()["fake"] == BackendStatus(True, "a test entry")
    assert _backends.auto_order("cpu")[0] == "fake" and "fake" not in _backends.auto_order("cuda")
    assert _backends.choose("auto", CPU, torch.float32) == "fake"
    assert _backends.choose("fake", CPU, torch.float64) == "torch"  # a dtype it does not take goes to the reference
    with pytest.raises(RuntimeError, match="'fake' cannot run .* it does not run cuda tensors"):
        _backends.choose("fake", torch.device("cuda"), torch.float32)
    with pytest.raises(ValueError, match=r"choose from \('auto', 'torch', 'cpu', 'triton', 'cuda', 'fake'\)"):
        _backends.choose("bogus", CPU, torch.float32)


def test_ops_run_a_backend_added_to_the_table(with_fake_backend: Backend) -> None:
    grads = [torch.randn(5), torch.randn(3, 2)]
    expected = reference.grad_sumsq(grads)
    torch.testing.assert_close(ops.grad_sumsq(grads, backend="fake"), expected, rtol=0, atol=0)
    params = [torch.zeros(5), torch.zeros(3, 2)]
    backups = [torch.ones(5), torch.ones(3, 2)]
    ops.restore_sgd_(params, backups, grads, [], 0.1, backend="fake")  # no fused_sgd_dtypes: the reference's two steps
    for p, g in zip(params, grads):
        torch.testing.assert_close(p, 1 - 0.1 * g)


def test_the_bench_reads_the_table(with_fake_backend: Backend) -> None:
    assert baselines.impl_names() == ("auto", *_backends.NAMES, *baselines.BASELINES)
    assert "fake" in baselines.impl_names()
    usable, skipped = baselines.device_backends(CPU)
    assert sorted([*usable, *skipped]) == sorted(_backends.NAMES) and "fake" in usable
    usable, skipped = baselines.device_backends(torch.device("meta"))
    assert skipped["fake"] == "runs cpu tensors, the benchmark device is meta"


def _string_literals(node: ast.AST) -> list[str]:
    elts = node.keys if isinstance(node, ast.Dict) else node.elts  # type: ignore[attr-defined]
    return [e.value for e in elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]


def _backend_name_lists(path: Path) -> list[str]:
    """Tuple, list, set and dict literals in `path` naming two or more backends: a second list of backends."""
    names = set(_backends.NAMES)
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set, ast.Dict)):
            named = [s for s in _string_literals(node) if s in names]
            if len(named) >= 2:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {named}")
    return found


def test_no_module_keeps_its_own_list_of_backends() -> None:
    sources = [p for folder in ("sam_fused", "kernels", "bench") for p in sorted((ROOT / folder).rglob("*.py"))]
    found = [hit for p in sources if p.name != "_backends.py" for hit in _backend_name_lists(p)]
    assert found == []
