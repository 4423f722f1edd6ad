"""What only the Triton kernels show compiled and run on a CUDA device (marker `gpu`; skipped without one); their
parity with the torch reference, op by op, is tests/test_parity.py's (runner `triton_gpu`, also marked `gpu`).

No host synchronization (a whole perturb/restore step captured in a CUDA graph and replayed, and
torch.cuda.set_sync_debug_mode("error") around a steady-state step); the address-table cache on CUDA (deterministic
counts, tables pinned by a capture), tensors on a non-current device, channels_last in place, the aligned (vector)
kernels; the first-use self-check of the dispatcher. Tolerances as in docs/DESIGN.md section 4: fp32 within 1e-6
relative, bf16/fp16 within 1 ulp of the reference's rounding. tests/test_triton_interpret.py and
tests/test_triton_host.py cover the same semantics on CPU.
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers import assert_bits_equal, assert_matches, assert_step_ops_match, assert_sumsq
from parity import DTYPES, RUNNERS, Spec, Tensors, clone

from sam_fused import ops, reference

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device (the Triton kernels are tested on CPU by test_triton_interpret.py)",
                allow_module_level=True)
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("TRITON_INTERPRET=1 is set: the compiled kernels would not run", allow_module_level=True)
kernels = pytest.importorskip("sam_fused.kernels", reason="triton is not installed (pip install triton)")

T = torch.ops.sam_fused_triton
CUDA = torch.device("cuda")
TRITON = next(r for r in RUNNERS if r.name == "triton_gpu")


def _lists(dtype: torch.dtype, seed: int = 0, contiguous: bool = False) -> tuple[Tensors, Tensors]:
    """The triton_gpu runner's (params, grads); contiguous: without its transposed view."""
    specs = [Spec(s.shape) for s in TRITON.specs] if contiguous else None
    return TRITON.lists(dtype, seed=seed, specs=specs)


# ---------------------------------------------------------------------------------------------- address tables


def test_table_cache_rebuilt_after_grads_reallocated() -> None:
    """Deterministic: every tensor stays alive (no address can be reused) and the counts are the cache's own."""
    tables = kernels.tables
    tables.clear_cache()  # no entry of an earlier test can match the new tensors' addresses
    params, grads = _lists(torch.float32)  # position 5 transposed in both lists: same strides, indexed in place
    T.grad_sumsq(grads, params, 0.0, 1)
    builds, validations = tables.stats["builds"], tables.stats["validations"]
    for _ in range(3):
        T.grad_sumsq(grads, params, 0.0, 1)
    assert (tables.stats["builds"], tables.stats["validations"]) == (builds, validations)
    old = list(grads)  # alive, so the new tensors get new addresses
    grads[:] = [torch.randn_like(g) for g in grads]
    assert_sumsq(T.grad_sumsq(grads, params, 0.0, 1), reference.grad_sumsq(grads, params, 0.0, 1))
    assert (tables.stats["builds"], tables.stats["validations"]) == (builds + 1, validations + 1)
    assert all(o.data_ptr() != g.data_ptr() for o, g in zip(old, grads) if g.numel())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_tensors_on_a_device_other_than_the_current_one() -> None:
    """Tensors on cuda:1 while cuda:0 is current: every op launches under the tensors' device (was: illegal address)."""
    other = torch.device("cuda", 1)
    torch.cuda.set_device(0)
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen).to(other) for s in [(7,), (4097,), (3, 5, 7, 2)]]
    grads = [torch.randn(p.shape, generator=gen).to(other) for p in params]
    original = clone(params)
    s = T.grad_sumsq(grads, params, 0.01, 1)
    assert s.device == other
    assert_sumsq(s, reference.grad_sumsq(grads, params, 0.01, 1))
    kgrads = [g.unsqueeze(0) for g in grads]
    outs = T.perturb_batched(original, kgrads, s, 0.05)
    for out, e in zip(outs, reference.perturb_batched(original, kgrads, s, 0.05)):
        assert out.device == other
        assert_matches(out, e)
    assert_step_ops_match(T, params, grads, adaptive=True, eta=0.01)  # perturb_, restore_, fsam_direction_
    torch.cuda.synchronize(other)
    assert torch.cuda.current_device() == 0


def test_captured_graph_survives_cache_eviction() -> None:
    """Tables used during a capture are pinned: more calls than the cache holds must not free them before replay."""
    tables = kernels.tables
    params, grads = _lists(torch.float32, contiguous=True)
    backups = clone(params)
    original = clone(params)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        T.restore_(params, backups)  # warm-up: validated, tables built
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        T.restore_(params, backups)
    keep = [torch.randn(3 + i, device=CUDA) for i in range(tables.MAX_CACHED + 8)]
    for t in keep:  # evicts every unpinned entry
        T.grad_sumsq([t], None, 0.0, 1)
    torch.cuda.synchronize()
    junk = [torch.full((1 << 16,), -1, dtype=torch.int64, device=CUDA) for _ in range(64)]  # takes freed memory
    for p in params:
        p.add_(1.0)
    graph.replay()
    torch.cuda.synchronize()
    for i, (w, o) in enumerate(zip(params, original)):
        assert_bits_equal(w, o, f"params[{i}] restored by the replayed graph")
    del junk


@pytest.mark.parametrize("dtype", DTYPES)
def test_aligned_buckets_take_the_vector_kernels_and_match(dtype: torch.dtype) -> None:
    """Element counts that are multiples of the vector width: the VEC > 1 (16-byte ld/st.global.v4) kernels run."""
    vec = 16 // torch.empty(0, dtype=dtype).element_size()
    gen = torch.Generator().manual_seed(4)
    shapes = [(vec,), (4096 + vec,), (64, vec, 3), (1_000_000,)]
    params = [torch.randn(s, generator=gen).to(dtype).to(CUDA) for s in shapes]
    kgrads = [torch.randn(2, *s, generator=gen).to(dtype).to(CUDA) for s in shapes]
    assert kernels.tables.build([params, kgrads], [p.numel() for p in params], CUDA).vec == vec
    s = T.grad_sumsq(kgrads, params, 0.01, 2)
    assert_sumsq(s, reference.grad_sumsq(kgrads, params, 0.01, 2))
    for a, e in zip(T.perturb_batched(params, kgrads, s, 0.05), reference.perturb_batched(params, kgrads, s, 0.05)):
        assert_matches(a, e)
    assert_step_ops_match(T, params, [g[0].clone() for g in kgrads], adaptive=True, eta=0.01)


def test_channels_last_step_is_capturable() -> None:
    """channels_last params, grads and backups are indexed in place (no staging), so the step can be captured."""
    gen = torch.Generator().manual_seed(3)
    params = [torch.randn(4, 6, 5, 3, generator=gen).to(CUDA).contiguous(memory_format=torch.channels_last)]
    grads = [torch.randn(4, 6, 5, 3, generator=gen).to(CUDA).contiguous(memory_format=torch.channels_last)]
    backups = [torch.empty_like(params[0])]
    original = clone(params)

    def step() -> torch.Tensor:
        s = T.grad_sumsq(grads, params, 0.0, 1)
        T.perturb_(params, grads, backups, s, 0.05, 1e-12, False, 0.0, True)
        T.restore_(params, backups)
        return s

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        s = step()
    graph.replay()
    torch.cuda.synchronize()
    assert_sumsq(s, reference.grad_sumsq(grads, params, 0.0, 1))
    assert_bits_equal(params[0], original[0])
    assert params[0].is_contiguous(memory_format=torch.channels_last)


# --------------------------------------------------------------------------------------------------- no host sync


def test_step_is_capturable_in_a_cuda_graph() -> None:
    """grad_sumsq -> perturb_ and restore_ captured once, replayed with new gradient values: nothing syncs with the
    host (capture would fail) and the replay computes with the device-resident sumsq of the new gradients."""
    params, grads = _lists(torch.bfloat16, contiguous=True)
    original = clone(params)
    backups = [torch.empty_like(p) for p in params]

    def perturb() -> torch.Tensor:
        s = ops.grad_sumsq(grads, params, 0.01, backend="triton")
        ops.perturb_(params, grads, backups, s, 0.05, adaptive=True, eta=0.01, backend="triton")
        return s

    def restore() -> None:
        ops.restore_(params, backups, backend="triton")

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compiles the kernels and builds the address tables
        for _ in range(2):
            perturb()
            restore()
    torch.cuda.current_stream().wait_stream(side)
    g_perturb, g_restore = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(g_perturb):
        sumsq = perturb()
    with torch.cuda.graph(g_restore):
        restore()
    for step in range(2):
        new = _lists(torch.bfloat16, seed=10 + step, contiguous=True)[1]
        for g, n in zip(grads, new):
            g.copy_(n)
        g_perturb.replay()
        expected_s = reference.grad_sumsq(grads, original, 0.01)
        w_ref = clone(original)
        reference.perturb_(w_ref, grads, [torch.empty_like(p) for p in params], expected_s, 0.05, 1e-12, True, 0.01)
        torch.cuda.synchronize()
        assert_sumsq(sumsq, expected_s)
        for i, (w, r, b, o) in enumerate(zip(params, w_ref, backups, original)):
            assert_matches(w, r, f"step {step} params[{i}]")
            assert_bits_equal(b, o, f"step {step} backups[{i}]")
        g_restore.replay()
        torch.cuda.synchronize()
        for i, (w, o) in enumerate(zip(params, original)):
            assert_bits_equal(w, o, f"step {step} restored params[{i}]")


def test_no_host_sync_in_steady_state() -> None:
    params, grads = _lists(torch.float32, contiguous=True)
    backups = [torch.empty_like(p) for p in params]
    ema = [torch.zeros_like(g) for g in grads]

    def step() -> None:
        s = T.fsam_direction_(grads, ema, 1.0, 0.9, False, params, 0.01)
        T.perturb_(params, grads, backups, s, 0.05, 1e-12, True, 0.01, True)
        T.restore_(params, backups)

    step()  # compiles and builds the tables
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------- registration, dispatch


def test_self_check_passes() -> None:
    """The dispatcher's first-use check (what `auto` runs before trusting the backend on a device) finds no mismatch."""
    from sam_fused._backends import self_check_backend

    assert self_check_backend("triton", CUDA) is None
