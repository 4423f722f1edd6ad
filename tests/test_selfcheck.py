"""The first-use self-check (sam_fused/selfcheck.py) and how the dispatcher uses it (sam_fused/_backends.py).

It must catch a backend that is wrong only for fp16, only for misaligned views, or only past one launch's tensor
limit; it is cached per (backend, device, dtype); it never runs, and never records a failure, during CUDA-graph
capture; and torch's sync debug mode "error" does not make it fail. No GPU here: capture and the debug mode are
mocked, and a fake op table (the reference with one bug) stands in for a backend's kernels.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from sam_fused import _backends, reference, selfcheck

CPU = torch.device("cpu")
CUDA = torch.device("cuda", 0)  # only a key here: the mocked self-check never touches it


class FakeBackend:
    """An op table: the reference, except that perturb_ adds 1 to the weights of the tensors `buggy(tensor, list)`
    selects."""

    def __init__(self, buggy: Callable[[torch.Tensor, list], bool]) -> None:
        self.buggy = buggy

    def __getattr__(self, name: str) -> object:
        return getattr(reference, name)

    def perturb_(self, params: list, *args: object) -> None:
        reference.perturb_(params, *args)
        for p in params:
            if p.numel() and self.buggy(p, params):
                p.add_(1.0)


# The compiled backends that run CPU tensors natively. Not the Triton interpreter: ~50 s per dtype on this list;
# test_triton_interpret.py compares its ops with the reference.
CPU_COMPILED = [b.name for b in _backends.BACKENDS if b.devices is not None and "cpu" in b.devices]


@pytest.mark.parametrize("backend", CPU_COMPILED)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16))
def test_correct_backends_pass(backend: str, dtype: torch.dtype) -> None:
    if not _backends.status(backend).available:
        pytest.skip(_backends.status(backend).detail)
    assert selfcheck.self_check(_backends.op_table(backend), CPU, dtype) is None


def test_the_list_covers_what_kernels_treat_apart() -> None:
    params, grads = selfcheck._lists(CPU, torch.float32)
    assert len(params) > 1_263  # the most tensors one CUDA launch holds (mta_planner.h, depth 1, large budget)
    assert any(p.numel() > 65_536 for p in params)  # several chunks on every backend
    assert any(p.data_ptr() % 16 for p in params) and any(g.data_ptr() % 16 for g in grads)  # misaligned views
    assert any(p.data_ptr() % 64 == 0 and p.numel() > 1 for p in params)  # and aligned ones
    assert any(p.numel() % 2 == 1 and p.numel() > 1 for p in params)


def test_catches_a_bug_in_fp16_only() -> None:
    fake = FakeBackend(lambda p, ps: p.dtype == torch.float16)
    assert selfcheck.self_check(fake, CPU, torch.float32) is None
    assert selfcheck.self_check(fake, CPU, torch.bfloat16) is None
    failure = selfcheck.self_check(fake, CPU)
    assert failure is not None and "perturb_" in failure and "float16" in failure


def test_catches_a_bug_in_misaligned_views_only() -> None:
    fake = FakeBackend(lambda p, ps: p.data_ptr() % 16 != 0)  # e.g. a 16-byte vector load assumed aligned
    failure = selfcheck.self_check(fake, CPU, torch.float32)
    assert failure is not None and "perturb_" in failure


def test_catches_a_bug_past_one_launch_only() -> None:
    fake = FakeBackend(lambda p, ps: len(ps) > 1_263 and p is ps[-1])  # e.g. the last launch of a list is dropped
    failure = selfcheck.self_check(fake, CPU, torch.float32)
    assert failure is not None and "perturb_" in failure


def test_an_op_that_raises_fails_the_check() -> None:
    class Broken(FakeBackend):
        def fsam_direction_(self, *args: object) -> None:
            raise RuntimeError("no kernel image for this device")

    failure = selfcheck.self_check(Broken(lambda p, ps: False), CPU, torch.float32)
    assert failure is not None and "no kernel image" in failure


@pytest.fixture
def dispatcher(monkeypatch: pytest.MonkeyPatch) -> dict:
    """A mocked CUDA world for _verified_on: capture flag, sync debug mode, and a recording self-check."""
    world = {"capturing": False, "mode": 0, "calls": [], "modes_seen": [], "fail": set()}
    monkeypatch.setattr(_backends, "_verified", {})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: world["capturing"])
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: world["mode"])
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda mode: world.__setitem__("mode", mode))

    def self_check(table: object, device: torch.device, dtype: torch.dtype) -> str | None:
        world["calls"].append((table, device, dtype))
        world["modes_seen"].append(world["mode"])
        return "perturb_" if dtype in world["fail"] else None

    monkeypatch.setattr(selfcheck, "self_check", self_check)
    return world


def test_capture_before_the_check_raises_and_records_nothing(dispatcher: dict) -> None:
    dispatcher["capturing"] = True
    with pytest.raises(RuntimeError, match="before capturing"):
        _backends._verified_on("cuda", CUDA, torch.float32)
    assert dispatcher["calls"] == [] and _backends._verified == {}
    dispatcher["capturing"] = False  # after a warm-up step outside the capture, the backend is checked and used
    assert _backends._verified_on("cuda", CUDA, torch.float32)
    dispatcher["capturing"] = True  # a verified (backend, device, dtype) runs inside the capture
    assert _backends._verified_on("cuda", CUDA, torch.float32)
    assert dispatcher["calls"] == [(_backends.op_table("cuda"), CUDA, torch.float32)]


def test_checked_and_cached_per_dtype(dispatcher: dict) -> None:
    dispatcher["fail"] = {torch.float16}
    with pytest.warns(RuntimeWarning, match="float16"):
        assert not _backends._verified_on("triton", CUDA, torch.float16)
    assert _backends._verified_on("triton", CUDA, torch.float32)
    assert _backends._verified_on("triton", CUDA, torch.float32)
    triton = _backends.op_table("triton")
    assert dispatcher["calls"] == [(triton, CUDA, torch.float16), (triton, CUDA, torch.float32)]


def test_sync_debug_error_mode_is_off_during_the_check_only(dispatcher: dict) -> None:
    dispatcher["mode"] = 2  # torch.cuda.set_sync_debug_mode("error"): the check's host reads would raise
    assert _backends._verified_on("cuda", CUDA, torch.bfloat16)
    assert dispatcher["modes_seen"] == [0] and dispatcher["mode"] == 2


def test_cpu_devices_need_no_check(dispatcher: dict) -> None:
    dispatcher["capturing"] = True
    assert _backends._verified_on("cpu", CPU, torch.float16)
    assert dispatcher["calls"] == []


def test_only_backends_marked_self_checks_are_checked(dispatcher: dict) -> None:
    for backend in _backends.BACKENDS:
        assert _backends._verified_on(backend.name, CUDA, torch.float32)
    checked = {name for name, _, _ in _backends._verified}
    assert checked == {b.name for b in _backends.BACKENDS if b.self_checks}
    assert _backends.REFERENCE not in checked  # the reference is never checked against itself
