"""The host side of the Triton backend (kernels/checks.py, kernels/tables.py), run under the Triton interpreter.

What runs on the host decides which memory the kernels touch, so its defects reproduce without a GPU (issue 14):
  * the device guard: every launch happens inside on_device(tensors' device), which enters torch.cuda.device for
    CUDA tensors (recorded here through patched guards; the real cuda:1 run is in test_triton_gpu.py);
  * tables used during a CUDA graph capture are pinned, never evicted (capture mocked);
  * validation runs on a cache miss only, and the cache key covers everything validation reads;
  * the tensor-op table build equals a per-unit Python loop;
  * dense layouts shared by a position (channels_last) are indexed in place; mismatched ones are staged;
  * the host picks the aligned (vector) kernels only for 16-byte aligned buckets, and they compute the same.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest
import torch
from helpers import assert_bits_equal, assert_matches, assert_step_ops_match, assert_sumsq

from sam_fused import _checks as shared
from sam_fused import reference

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 (tests/conftest.py sets it when CUDA is unavailable)",
                allow_module_level=True)
kernels = pytest.importorskip("sam_fused.kernels", reason="triton is not installed (pip install triton)")
from sam_fused.kernels import checks, fsam_direction, grad_sumsq, perturb, tables  # noqa: E402
from sam_fused.kernels.numerics import CHUNK  # noqa: E402

T = torch.ops.sam_fused_triton
SHAPES = [(3,), (4097,), (2, 3, 5, 4), (0,)]


@pytest.fixture(autouse=True)
def _fresh_cache() -> Iterator[None]:
    tables.clear_cache()
    yield
    tables.clear_cache()


def _lists(shapes: list = SHAPES, seed: int = 0, fmt: torch.memory_format = torch.contiguous_format) -> tuple:
    gen = torch.Generator().manual_seed(seed)

    def make(s: tuple) -> torch.Tensor:
        t = torch.randn(s, generator=gen)
        return t.contiguous(memory_format=fmt) if t.dim() == 4 else t

    return [make(s) for s in shapes], [make(s) for s in shapes]


def _run_every_op(params: list, grads: list) -> None:
    backups = [torch.empty_like(p) for p in params]
    s = T.grad_sumsq(grads, params, 0.01, 1)
    T.perturb_(params, grads, backups, s, 0.05, 1e-12, True, 0.01, True)
    T.perturb_batched(params, [g.unsqueeze(0) for g in grads], s, 0.05, 1e-12, False, 0.0, True)
    T.restore_(params, backups)
    T.fsam_direction_(grads, [torch.zeros_like(g) for g in grads], 1.0, 0.9, False, params, 0.01)


# --------------------------------------------------------------------------------------------- 1. device guard


class _Guard:
    """Stands in for torch.cuda.device: records the devices entered and which are active."""

    entered: list = []
    active: list = []

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> None:
        _Guard.entered.append(self.device)
        _Guard.active.append(self.device)

    def __exit__(self, *exc: object) -> None:
        _Guard.active.pop()


def test_on_device_enters_the_cuda_device_of_the_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    _Guard.entered, _Guard.active = [], []
    monkeypatch.setattr(torch.cuda, "device", _Guard)
    with checks.on_device(torch.device("cuda", 1)):
        assert _Guard.active == [torch.device("cuda", 1)]
    with checks.on_device(torch.device("cpu")):  # CPU tensors (interpreter): nothing to switch
        pass
    assert _Guard.entered == [torch.device("cuda", 1)] and _Guard.active == []


def test_every_launch_happens_under_the_guard_of_the_tensors_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton launches on the current CUDA device: each kernel launch must run inside on_device(tensors' device)."""
    _Guard.entered, _Guard.active = [], []
    launches: list = []

    def guard(device: torch.device) -> contextlib.AbstractContextManager:
        return _Guard(device)

    class Spy:
        def __init__(self, name: str, kernel: object) -> None:
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid: tuple):
            def launch(*args: object, **kwargs: object) -> object:
                launches.append((self.name, list(_Guard.active)))
                return self.kernel[grid](*args, **kwargs)
            return launch

    for module in (grad_sumsq, perturb, fsam_direction):
        monkeypatch.setattr(module, "on_device", guard)
    spied = [(grad_sumsq, "_sumsq_partials"), (grad_sumsq, "combine_partials"), (perturb, "_perturb_kernel"),
             (perturb, "_perturb_batched_kernel"), (perturb, "_copy_kernel"), (fsam_direction, "_fsam_kernel")]
    for module, name in spied:
        monkeypatch.setattr(module, name, Spy(name, getattr(module, name)))
    _run_every_op(*_lists(SHAPES[:2]))
    names = {name for name, _ in launches}
    assert names == {"_sumsq_partials", "combine_partials", "_perturb_kernel", "_perturb_batched_kernel",
                     "_copy_kernel", "_fsam_kernel"}
    for name, active in launches:
        assert active == [torch.device("cpu")], f"{name} launched outside the device guard"


# ---------------------------------------------------------------------------------- 2. pinned during capture


def test_capturing_asks_torch_about_the_stream_of_the_tensors_device(monkeypatch: pytest.MonkeyPatch) -> None:
    _Guard.entered, _Guard.active = [], []
    monkeypatch.setattr(torch.cuda, "device", _Guard)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: _Guard.active == [torch.device("cuda", 1)])
    assert tables.capturing(torch.device("cuda", 1))
    assert not tables.capturing(torch.device("cpu"))


def test_tables_used_during_a_capture_are_never_evicted(monkeypatch: pytest.MonkeyPatch) -> None:
    """A captured graph replays its tables at every launch: evicting them would let it read freed memory."""
    capture = {"on": False}
    monkeypatch.setattr(tables, "capturing", lambda device: capture["on"])
    params, grads = _lists(SHAPES[:2])
    expected = reference.grad_sumsq(grads, params)
    T.grad_sumsq(grads, params, 0.0, 1)  # warm-up: validated, tables built
    capture["on"] = True
    assert_sumsq(T.grad_sumsq(grads, params, 0.0, 1), expected)  # "captured": the entry is pinned
    with pytest.raises(RuntimeError, match="not built yet"):  # a build during capture is refused
        T.grad_sumsq([torch.randn(5)], None, 0.0, 1)
    capture["on"] = False
    keep = [torch.randn(3 + i) for i in range(tables.MAX_CACHED + 8)]  # alive: distinct addresses
    for t in keep:  # more calls than the cache holds: every unpinned entry of before is evicted
        T.grad_sumsq([t], None, 0.0, 1)
    assert len(tables._cache) == tables.MAX_CACHED
    capture["on"] = True
    builds = tables.stats["builds"]
    assert_sumsq(T.grad_sumsq(grads, params, 0.0, 1), expected)  # "replay": still cached, no build
    assert tables.stats["builds"] == builds
    tables.clear_cache()
    with pytest.raises(RuntimeError, match="not built yet"):
        T.grad_sumsq(grads, params, 0.0, 1)


# ------------------------------------------------------------------------------ 3. validation on a miss only


def test_validation_runs_on_a_cache_miss_only(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = shared.check_lists
    monkeypatch.setattr(shared, "check_lists", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    params, grads = _lists()
    backups = [torch.empty_like(p) for p in params]
    s = reference.grad_sumsq(grads)
    for _ in range(3):
        T.perturb_(params, grads, backups, s, 0.05, 1e-12, False, 0.0, True)
        T.restore_(params, backups)
    assert calls == ["params", "params"]  # perturb_ and restore_, once each
    grads[1] = torch.randn_like(grads[1])  # a new tensor: a miss, validated again
    T.perturb_(params, grads, backups, s, 0.05, 1e-12, False, 0.0, True)
    assert calls == ["params"] * 3


def test_the_cache_key_covers_what_validation_reads() -> None:
    """Each variant below has the same data_ptr as a validated, cached call, and must still be refused."""
    params, grads = _lists()
    backups = [torch.empty_like(p) for p in params]
    s = reference.grad_sumsq(grads)
    T.perturb_(params, grads, backups, s, 0.05, 1e-12, False, 0.0, True)
    g0 = grads[0]
    bad = {
        "shape": ([g0.reshape(1, 3)] + grads[1:], ValueError, r"grads\[0\] has shape \(1, 3\)"),
        "dtype": ([g0.view(torch.int32)] + grads[1:], TypeError, r"grads\[0\] has dtype torch.int32"),
        "not a tensor": ([[1.0, 2.0, 3.0]] + grads[1:], TypeError, r"grads\[0\] is a list"),
    }
    for gs, exc, match in bad.values():  # the Python impl directly: the dispatcher would refuse a list of floats
        with pytest.raises(exc, match=match):
            kernels.IMPLS["perturb_"](params, gs, backups, s, 0.05, 1e-12, False, 0.0, True)
    expanded = params[0][:1].expand(3)  # same data_ptr and shape as params[0], stride 0: elements share memory
    assert expanded.data_ptr() == params[0].data_ptr()
    with pytest.raises(ValueError, match=r"params\[0\] has elements that share memory"):
        T.perturb_([expanded] + params[1:], grads, backups, s, 0.05, 1e-12, False, 0.0, True)
    with pytest.raises(ValueError, match=r"grads has 3 tensors but params has 4"):
        T.perturb_(params, grads[:3], backups, s, 0.05, 1e-12, False, 0.0, True)
    meta = [p.to("meta") for p in params]
    with pytest.raises(ValueError, match=r"params\[0\] is on meta"):
        kernels.IMPLS["restore_"](meta, meta)
    k2 = [torch.randn(2, *p.shape) for p in params]  # k is part of the key too
    T.grad_sumsq(k2, None, 0.0, 2)
    with pytest.raises(ValueError, match="expected leading dim 4"):
        T.grad_sumsq(k2, None, 0.0, 4)


def test_table_build_matches_a_per_unit_loop() -> None:
    numels = [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 0, 3 * CHUNK, 7]
    ts = [torch.empty(max(n, 1)) for n in numels]
    plan = tables.build([ts, ts[::-1]], numels, torch.device("cpu"))
    unit_tensor = [i for i, n in enumerate(numels) for _ in range(0, n, CHUNK)]
    unit_offset = [s for n in numels for s in range(0, n, CHUNK)]
    assert plan.num_units == len(unit_tensor)
    assert plan.unit_tensor.tolist() == unit_tensor and plan.unit_offset.tolist() == unit_offset
    assert plan.numels.tolist() == numels
    assert plan.addr(0).tolist() == [t.data_ptr() for t in ts]
    assert plan.addr(1).tolist() == [t.data_ptr() for t in ts[::-1]]
    assert all(v.data_ptr() % 16 == 0 for v in (*plan.addrs, plan.numels, plan.unit_tensor, plan.unit_offset))


# ------------------------------------------------------------------------------------------------- 4. layouts


def _staged(op: str, lists: list, lead: tuple = (), k: int = 1) -> set:
    call = checks.prepare(op, lists, lambda: torch.device("cpu"), k, lead)
    assert call is not None
    return {i for b in call.buckets for i in b.staged}


def test_channels_last_everywhere_runs_in_place_and_matches() -> None:
    params, grads = _lists(fmt=torch.channels_last)
    assert not params[2].is_contiguous() and params[2].is_contiguous(memory_format=torch.channels_last)
    backups = [torch.empty_like(p) for p in params]  # channels_last too
    assert _staged("perturb_", [params, grads, backups]) == set()
    original = [p.clone() for p in params]
    s = T.grad_sumsq(grads, params, 0.01, 1)
    assert_sumsq(s, reference.grad_sumsq(grads, params, 0.01, 1))
    w_ref = [p.clone() for p in params]
    reference.perturb_(w_ref, grads, [torch.empty_like(p) for p in params], s, 0.05, 1e-12, True, 0.01)
    T.perturb_(params, grads, backups, s, 0.05, 1e-12, True, 0.01, True)
    for w, r, b, o in zip(params, w_ref, backups, original):
        assert_matches(w, r)
        assert_bits_equal(b, o)
    builds = tables.stats["builds"]
    T.restore_(params, backups)
    T.restore_(params, backups)
    assert tables.stats["builds"] == builds + 1  # restore_'s own tables, once: no per-call staging
    for w, o in zip(params, original):
        assert_bits_equal(w, o)
    ema, e_ref = [torch.zeros_like(g) for g in grads], [torch.zeros_like(g) for g in grads]
    g_ref = [g.clone() for g in grads]
    assert_sumsq(T.fsam_direction_(grads, ema, 0.7, 0.6, False, params, 0.01),
                 reference.fsam_direction_(g_ref, e_ref, 0.7, 0.6, False, params, 0.01))
    for a, e in zip(grads + ema, g_ref + e_ref):
        assert_matches(a, e)


def test_mismatched_layouts_are_staged_and_match() -> None:
    params, _ = _lists(fmt=torch.channels_last)
    _, grads = _lists(seed=1)  # contiguous grads beside channels_last params
    assert _staged("perturb_", [params, grads, params]) == {2}
    kgrads = [torch.randn(*p.shape, 2).movedim(-1, 0) for p in params]  # dense, but slice j is not a block
    assert _staged("perturb_batched", [params, kgrads], (False, True), 2) == {0, 1, 2}
    s = reference.grad_sumsq(grads, params, 0.01, 1)
    w_ref = [p.clone() for p in params]
    reference.perturb_(w_ref, grads, [torch.empty_like(p) for p in params], s, 0.05, 1e-12, True, 0.01)
    T.perturb_(params, grads, [torch.empty_like(p) for p in params], s, 0.05, 1e-12, True, 0.01, True)
    for w, r in zip(params, w_ref):
        assert_matches(w, r)
    ks = reference.grad_sumsq(kgrads, None, 0.0, 2)
    assert_sumsq(T.grad_sumsq(kgrads, None, 0.0, 2), ks)
    for a, e in zip(T.perturb_batched(params, kgrads, ks, 0.05), reference.perturb_batched(params, kgrads, ks, 0.05)):
        assert_matches(a, e)


# ------------------------------------------------------------------------------------- 5. aligned (vector) path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_aligned_buckets_take_the_vector_path_and_match(dtype: torch.dtype) -> None:
    vec = 16 // torch.empty(0, dtype=dtype).element_size()
    gen = torch.Generator().manual_seed(2)
    shapes = [(vec,), (CHUNK + vec,), (2, vec, 3), (0,)]
    params = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    kgrads = [torch.randn(2, *s, generator=gen).to(dtype) for s in shapes]
    cpu = torch.device("cpu")
    assert tables.build([params, kgrads], [p.numel() for p in params], cpu).vec == vec
    shifted = torch.empty(vec + 1, dtype=dtype)[1:]  # data_ptr not 16-byte aligned
    assert tables.build([[shifted]], [vec], cpu).vec == 1
    assert tables.build([[torch.empty(vec + 1, dtype=dtype)]], [vec + 1], cpu).vec == 1  # ragged element count
    s = T.grad_sumsq(kgrads, params, 0.01, 2)
    assert_sumsq(s, reference.grad_sumsq(kgrads, params, 0.01, 2))
    for a, e in zip(T.perturb_batched(params, kgrads, s, 0.05), reference.perturb_batched(params, kgrads, s, 0.05)):
        assert_matches(a, e)
    assert_step_ops_match(T, params, [g[1].clone() for g in kgrads], adaptive=False, eta=0.0)
