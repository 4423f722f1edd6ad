"""What only the fused C++ CPU backend (csrc/cpu) has (docs/DESIGN.md sections 3-5, 7); its parity with the torch
reference, op by op, with plain and with streaming stores, is tests/test_parity.py's (runners `cpu`, `cpu_streaming`).

Here: streaming (non-temporal) stores on views whose storage is not 64-byte aligned, thread-count determinism, the
kernels registered for the CPU key, channels_last lists processed in place (no staging copies), the precise wording of
its input errors, the backends() report, and the fallback when the extension is missing.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch
from helpers import assert_matches
from parity import DTYPES, RUNNERS, Tensors, assert_all_bits_equal, clone

import sam_fused
from sam_fused import ops
from sam_fused._registry import OPS

if not sam_fused.backends()["cpu"].available:
    pytest.skip(f"sam_fused cpu backend unavailable: {sam_fused.backends()['cpu'].detail}", allow_module_level=True)

CPU = next(r for r in RUNNERS if r.name == "cpu")


@contextmanager
def num_threads(n: int) -> Iterator[None]:
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


# ---- what the C++ CPU kernels alone do ---------------------------------------------------------------------


def test_channels_last_layout_without_copies() -> None:
    """Dense non-contiguous layouts shared by every list (channels_last) are processed in place, in memory order."""
    w = torch.randn(4, 6, 5, 3).to(memory_format=torch.channels_last)
    g = torch.randn(4, 6, 5, 3).to(memory_format=torch.channels_last)
    b = torch.empty_like(w)
    expected_w = w.clone()
    ops.perturb_([expected_w], [g], [torch.empty_like(w)], torch.tensor([2.0]), 0.1, backend="torch")
    data_ptr = w.data_ptr()
    ops.perturb_([w], [g], [b], torch.tensor([2.0]), 0.1, backend="cpu")
    assert w.data_ptr() == data_ptr and w.is_contiguous(memory_format=torch.channels_last)
    assert_matches(w, expected_w, "channels_last params")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offsets", [(1, 0), (0, 3), (5, 5)])
def test_streaming_stores_on_unaligned_views(dtype: torch.dtype, offsets: tuple[int, int]) -> None:
    """Streaming stores need 64-byte aligned destinations: views starting a few elements into their storage (w and
    backup misaligned differently) take the plain head and tail and the streamed body, and stay exact."""
    gen = torch.Generator().manual_seed(5)
    sizes = [3, 100, 40_000, 70_001]
    w_off, b_off = offsets

    def view(n: int, off: int) -> torch.Tensor:
        return torch.randn(n + off, generator=gen).to(dtype)[off:]

    original = [view(n, w_off) for n in sizes]
    grads = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    sumsq = ops.grad_sumsq(grads, backend="torch")
    results = {}
    for kind, backend in (("0", "torch"), ("1", "cpu")):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("SAM_FUSED_CPU_STREAMING", kind)
            params = [view(n, w_off).copy_(o) for n, o in zip(sizes, original)]
            backups = [view(n, b_off) for n in sizes]
            ops.perturb_(params, grads, backups, sumsq, 0.05, backend=backend)
            assert_all_bits_equal(backups, original, f"{backend} backups")
            results[backend] = [p.clone() for p in params]
            restored = [view(n, b_off) for n in sizes]
            ops.restore_(restored, backups, backend=backend)
            assert_all_bits_equal(restored, original, f"{backend} restored")
    for i, (a, e) in enumerate(zip(results["cpu"], results["torch"])):
        assert_matches(a, e, f"params[{i}]")


def _every_op(dtype: torch.dtype) -> dict[str, Callable[[], object]]:
    """Each op on fresh copies of one fixed input; returns what it produced (outputs and mutated lists)."""
    (params, grads), (_, kgrads) = CPU.lists(dtype), CPU.lists(dtype, 5, lead=True)
    sumsq, ksumsq = torch.tensor([3.0]), torch.arange(1.0, 6.0)

    def perturb() -> Tensors:
        p, b = clone(params), [torch.empty_like(x) for x in params]
        ops.perturb_(p, grads, b, sumsq, 0.05, adaptive=True, eta=0.01, backend="cpu")
        return p + b

    def restore() -> Tensors:
        p = [torch.zeros_like(x) for x in params]
        ops.restore_(p, grads, backend="cpu")
        return p

    def fsam() -> Tensors:
        g, m = clone(grads), clone(params)  # params: an EMA with the grads' shapes
        s = ops.fsam_direction_(g, m, 1.0, 0.9, False, params, 0.01, backend="cpu")
        return g + m + [s]

    return {
        "grad_sumsq": lambda: [ops.grad_sumsq(grads, params, 0.01, backend="cpu"),
                               ops.grad_sumsq(kgrads, micro_batches=5, backend="cpu")],
        "perturb_": perturb,
        "perturb_batched": lambda: ops.perturb_batched(params, kgrads, ksumsq, 0.05, adaptive=True, backend="cpu"),
        "restore_": restore,
        "fsam_direction_": fsam,
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_results_do_not_depend_on_thread_count(dtype: torch.dtype) -> None:
    for name in OPS:
        with num_threads(1):
            one = _every_op(dtype)[name]()
        with num_threads(2):
            two = _every_op(dtype)[name]()
        assert_all_bits_equal(two, one, name)


@pytest.mark.parametrize("name", OPS)
def test_kernels_registered_for_the_cpu_key(name: str) -> None:
    """The C++ kernels serve torch.ops.sam_fused on CPU tensors (test_parity.py opchecks them there)."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"sam_fused::{name}", "CPU")


# ---- invalid inputs reaching the C++ ops directly ------------------------------------------------------------

_P = [torch.randn(3), torch.randn(2, 2)]
_G = [torch.randn(3), torch.randn(2, 2)]
_S = torch.tensor([1.0])
_C = torch.ops.sam_fused
# The C++ kernels' own wording (the errors every backend words alike are test_parity.py's).
INVALID: list[tuple[str, Callable[[], object], type, str]] = [
    ("shape", lambda: _C.restore_(_P, [torch.empty(3), torch.empty(4)]), ValueError,
     r"backups\[1\] has shape \[4\], expected \[2, 2\]"),
    ("dtype mix", lambda: _C.grad_sumsq([_G[0], _G[1].half()], None, 0.0, 1), ValueError, r"grads\[1\] has dtype Half"),
    ("fp64", lambda: _C.restore_([torch.zeros(2, dtype=torch.float64)], [torch.zeros(2, dtype=torch.float64)]),
     TypeError, r"params\[0\] has dtype Double; the CPU kernels support"),
    ("int", lambda: _C.fsam_direction_([torch.zeros(2, dtype=torch.int32)], [torch.zeros(2, dtype=torch.int32)], 1.0,
                                       0.5, False), TypeError, r"grads\[0\] has dtype Int"),
    ("sparse", lambda: _C.grad_sumsq([_G[0], _G[1].to_sparse()], _P, 0.0, 1), TypeError, r"grads\[1\] is a sparse"),
    ("k leading dim", lambda: _C.grad_sumsq(_G, None, 0.0, 3), ValueError,
     r"grads\[1\] has shape \[2, 2\]; expected leading dim 3"),
    ("k shape", lambda: _C.grad_sumsq([torch.zeros(2, 3)], [torch.zeros(2)], 0.0, 2), ValueError,
     r"grads\[0\] has shape \[2, 3\], expected \[2, 2\]"),
    ("k < 1", lambda: _C.grad_sumsq(_G, None, 0.0, 0), ValueError, "micro_batches must be >= 1"),
    ("batched sumsq", lambda: _C.perturb_batched(_P, [g.expand(2, *g.shape) for g in _G], torch.ones(3), 0.1),
     ValueError, r"grads\[0\] has shape \[2, 3\], expected \[3, 3\]"),
    ("empty sumsq", lambda: _C.perturb_(_P, _G, [torch.empty(3), torch.empty(2, 2)], torch.zeros(0), 0.1), ValueError,
     "sumsq is empty"),
    ("overlapping output", lambda: _C.restore_([torch.zeros(1).expand(3)], [torch.zeros(3)]), ValueError,
     r"params\[0\] is written in place but has internally overlapping memory"),
    ("ema length", lambda: _C.fsam_direction_(_G, _G[:1], 1.0, 0.5, True), ValueError,
     "ema has 1 tensors but grads has 2"),
    ("params shape", lambda: _C.fsam_direction_(_G, [g.clone() for g in _G], 1.0, 0.5, True, [_P[0], _P[0]]),
     ValueError, r"params\[1\] has shape \[3\], expected \[2, 2\]"),
]


@pytest.mark.parametrize("case,call,error,match", INVALID, ids=[c[0] for c in INVALID])
def test_invalid_inputs_raise(case: str, call: Callable[[], object], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        call()


def test_backends_report_cpu_available() -> None:
    status = sam_fused.backends()["cpu"]
    assert status.available and "C++" in status.detail
    for dtype in DTYPES:
        assert sam_fused._backends.choose("cpu", torch.device("cpu"), dtype) == "cpu"


def test_missing_extension_falls_back_with_one_warning() -> None:
    """Without sam_fused._C_cpu, import still works, warns once, reports why, and auto runs the reference."""
    code = (
        "import sys, warnings\n"
        "sys.modules['sam_fused._C_cpu'] = None\n"  # makes `import sam_fused._C_cpu` raise ImportError
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import torch, sam_fused\n"
        "    from sam_fused import ops\n"
        "    s = ops.grad_sumsq([torch.ones(4)])\n"
        "msgs = [str(x.message) for x in w if 'sam_fused' in str(x.message)]\n"
        "assert len(msgs) == 1 and 'torch reference' in msgs[0], msgs\n"
        "assert not sam_fused.backends()['cpu'].available\n"
        "assert sam_fused._backends.choose('auto', torch.device('cpu'), torch.float32) == 'torch'\n"
        "assert float(s) == 4.0\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def _staging_calls(fn: Callable[[], object]) -> list[str]:
    """The copies and allocations of tensors that `fn` dispatches (a staged tensor costs one of each)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return [e.name for e in prof.events() if e.name in ("aten::copy_", "aten::empty_like", "aten::clone")]


@pytest.mark.parametrize("cls", [sam_fused.SAM, sam_fused.FriendlySAM])
def test_channels_last_weights_are_not_staged(cls: type) -> None:
    """Backups (and F-SAM's EMA) are laid out like their channels_last weights, so that the kernels read and write
    them in place: a contiguous backup was copied in and out on every perturb_ and restore_ (ResNet-50: 12x slower)."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 4, 1))
    model.to(memory_format=torch.channels_last)
    model(torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)).square().sum().backward()
    assert model[0].weight.grad.is_contiguous(memory_format=torch.channels_last)
    opt = cls(model.parameters(), torch.optim.SGD, lr=0.1, backend="cpu")
    opt.first_step()  # allocates the backups (and the EMA) once
    opt.restore()
    assert _staging_calls(lambda: (opt.first_step(), opt.restore())) == []
    backups = opt._backups_for(opt._slots()[0])
    assert all(b.stride() == p.stride() for b, p in zip(backups, model.parameters()))
