"""The Triton kernels compiled and run on a CUDA device (marker `gpu`; skipped without one).

Parity with the torch reference run on the same CUDA tensors, for every op and dtype; bit-exact backups and restore;
no host synchronization (a whole perturb/restore step captured in a CUDA graph and replayed, and
torch.cuda.set_sync_debug_mode("error") around a steady-state step); the address-table cache on CUDA (deterministic
counts, tables pinned by a capture), tensors on a non-current device, channels_last in place, the aligned (vector)
kernels; opcheck on CUDA; the first-use self-check of the dispatcher. Tolerances as in docs/DESIGN.md section 4:
fp32 within 1e-6 relative, bf16/fp16 within 1 ulp of the reference's rounding. tests/test_triton_interpret.py and
tests/test_triton_host.py cover the same semantics on CPU.
"""

from __future__ import annotations

import os

import pytest
import torch
from helpers import T_MODES, assert_bits_equal, assert_matches, assert_sumsq, random_tensor

from sam_fused import ops, reference
from sam_fused._registry import OPS

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device (the Triton kernels are tested on CPU by test_triton_interpret.py)",
                allow_module_level=True)
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("TRITON_INTERPRET=1 is set: the compiled kernels would not run", allow_module_level=True)
kernels = pytest.importorskip("sam_fused.kernels", reason="triton is not installed (pip install triton)")

T = torch.ops.sam_fused_triton
CUDA = torch.device("cuda")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(0,), (1,), (7,), (4097,), (3, 5, 7, 2), (9, 6), (70_001,), (1_000_003,)]
TRANSPOSED = {5}  # non-contiguous (transposed) entries of SHAPES


def _lists(dtype: torch.dtype, k: int = 1, seed: int = 0, always_lead: bool = False,
           contiguous: bool = False) -> tuple[list, list]:
    gen = torch.Generator().manual_seed(seed)
    lead = k if (k > 1 or always_lead) else None
    nc = set() if contiguous else TRANSPOSED
    params = [random_tensor(s, dtype, gen, transposed=i in nc, device=CUDA) for i, s in enumerate(SHAPES)]
    grads = [random_tensor(s, dtype, gen, lead, transposed=i in nc, device=CUDA) for i, s in enumerate(SHAPES)]
    return params, grads


def _clone(ts: list) -> list:
    return [t.clone() for t in ts]


# ------------------------------------------------------------------------------------------------------- op parity


@pytest.mark.parametrize("t_mode", list(T_MODES))
@pytest.mark.parametrize("k", [1, 2, 5])
@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_sumsq(dtype: torch.dtype, k: int, t_mode: str) -> None:
    with_t, eta = T_MODES[t_mode]
    params, grads = _lists(dtype, k)
    p = params if with_t else None
    got = T.grad_sumsq(grads, p, eta, k)
    assert got.dtype == torch.float64
    assert_sumsq(got, reference.grad_sumsq(grads, p, eta, k))
    assert_bits_equal(T.grad_sumsq(grads, p, eta, k), got, "deterministic")


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("t_mode", list(T_MODES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_perturb_backup_and_restore(dtype: torch.dtype, t_mode: str, normalize: bool) -> None:
    adaptive, eta = T_MODES[t_mode]
    params, grads = _lists(dtype)
    original = _clone(params)
    sumsq = reference.grad_sumsq(grads, params if adaptive else None, eta)
    w_ref, b_ref = _clone(params), [torch.empty_like(p) for p in params]
    reference.perturb_(w_ref, grads, b_ref, sumsq, 0.05, 1e-12, adaptive, eta, normalize)
    backups = [torch.empty_like(p) for p in params]
    T.perturb_(params, grads, backups, sumsq, 0.05, 1e-12, adaptive, eta, normalize)
    for i, (w, r, b, o) in enumerate(zip(params, w_ref, backups, original)):
        assert_matches(w, r, f"params[{i}]")
        assert_bits_equal(b, o, f"backups[{i}]")
    T.restore_(params, backups)
    for i, (w, o) in enumerate(zip(params, original)):
        assert_bits_equal(w, o, f"restored params[{i}]")


@pytest.mark.parametrize("variant", ["sam", "asam eta=0.01", "asam unnormalized"])
@pytest.mark.parametrize("k", [1, 2, 5])
@pytest.mark.parametrize("dtype", DTYPES)
def test_perturb_batched(dtype: torch.dtype, k: int, variant: str) -> None:
    adaptive, eta, normalize = {"sam": (False, 0.0, True), "asam eta=0.01": (True, 0.01, True),
                                "asam unnormalized": (True, 0.0, False)}[variant]
    params, grads = _lists(dtype, k, always_lead=True)
    sliced = grads if k > 1 else [g[0] for g in grads]
    sumsq = reference.grad_sumsq(sliced, params if adaptive else None, eta, k)
    got = T.perturb_batched(params, grads, sumsq, 0.05, 1e-12, adaptive, eta, normalize)
    expected = reference.perturb_batched(params, grads, sumsq, 0.05, 1e-12, adaptive, eta, normalize)
    for i, (a, e) in enumerate(zip(got, expected)):
        assert a.device == e.device
        assert_matches(a, e, f"out[{i}]")


@pytest.mark.parametrize("with_t", [False, True])
@pytest.mark.parametrize("first", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fsam_direction(dtype: torch.dtype, first: bool, with_t: bool) -> None:
    params, grads = _lists(dtype)
    _, ema = _lists(dtype, seed=1)
    p = params if with_t else None
    g_ref, m_ref = _clone(grads), _clone(ema)
    s_ref = reference.fsam_direction_(g_ref, m_ref, 0.7, 0.6, first, p, 0.01)
    s_got = T.fsam_direction_(grads, ema, 0.7, 0.6, first, p, 0.01)
    assert s_got.dtype == torch.float64
    assert_sumsq(s_got, s_ref)
    for i in range(len(grads)):
        assert_matches(grads[i], g_ref[i], f"grads[{i}]")
        assert_matches(ema[i], m_ref[i], f"ema[{i}]")


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_and_nonfinite_gradients(dtype: torch.dtype) -> None:
    params, grads = _lists(dtype)
    zeros = [torch.zeros_like(p) for p in params]
    s0 = T.grad_sumsq(zeros, params, 0.01, 1)
    assert torch.equal(s0.cpu(), torch.zeros(1, dtype=torch.float64))
    original, backups = _clone(params), [torch.empty_like(p) for p in params]
    T.perturb_(params, zeros, backups, s0, 0.05, 1e-12, True, 0.01, True)
    for p, o in zip(params, original):
        assert_bits_equal(p, o, "zero gradient => zero perturbation")
    grads[3][100] = float("inf")
    s_inf = T.grad_sumsq(grads, None, 0.0, 1)
    assert not torch.isfinite(s_inf).any()
    T.perturb_(params, grads, backups, s_inf, 0.05, 1e-12, False, 0.0, True)
    for p, o, b in zip(params, original, backups):
        assert_bits_equal(p, o, "non-finite gradient => weights untouched")
        assert_bits_equal(b, o, "backup still written")


# Gradients whose squares overflow fp32 (|g| > 1.8e19): fp64 sums, so the step is taken (it was skipped with fp32 sums).

@pytest.mark.parametrize("dtype, big", [(torch.float32, 2e19), (torch.float32, 1e20), (torch.bfloat16, 1e20)])
def test_huge_finite_gradient_is_perturbed(dtype: torch.dtype, big: float) -> None:
    w = torch.tensor([1.0, -2.0, 3.0], dtype=dtype, device=CUDA)
    g = torch.tensor([big, 0.0, 0.0], dtype=dtype, device=CUDA)
    sumsq = T.grad_sumsq([g], None, 0.0, 1)
    expected = ops.grad_sumsq([g], backend="torch")
    assert sumsq.dtype == torch.float64 and torch.isfinite(sumsq).all()
    assert torch.equal(sumsq, expected)  # one nonzero term, squared exactly in fp64
    got, w_ref = [w.clone()], [w.clone()]
    reference.perturb_(w_ref, [g], [torch.empty_like(w)], expected, 0.05)
    T.perturb_(got, [g], [torch.empty_like(w)], sumsq, 0.05, 1e-12, False, 0.0, True)
    assert_bits_equal(got[0], w_ref[0])
    torch.testing.assert_close(got[0], w + torch.tensor([0.05, 0.0, 0.0], dtype=dtype, device=CUDA))


def test_huge_adaptive_gradient_has_a_finite_norm() -> None:
    """ASAM with t * g = 1e40: finite fp64 sum; the update is the reference's to the bit (subnormal fp32 scale: the
    kernels must not flush it to zero)."""
    w = torch.tensor([1e10, 1.0, -2.0], device=CUDA)
    g = torch.tensor([1e30, 0.5, 1.0], device=CUDA)
    sumsq = T.grad_sumsq([g], [w], 0.01, 1)
    expected = ops.grad_sumsq([g], [w], 0.01, backend="torch")
    assert torch.isfinite(sumsq).all()
    torch.testing.assert_close(sumsq, expected, rtol=1e-12, atol=0)
    got, w_ref = [w.clone()], [w.clone()]
    reference.perturb_(w_ref, [g], [torch.empty_like(w)], expected, 0.05, 1e-12, True, 0.01)
    T.perturb_(got, [g], [torch.empty_like(w)], sumsq, 0.05, 1e-12, True, 0.01, True)
    assert_bits_equal(got[0], w_ref[0])
    extreme = torch.full((64,), torch.finfo(torch.float32).max, device=CUDA)
    assert torch.isfinite(T.grad_sumsq([extreme], [extreme], 0.0, 1)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_perturb_batched_with_one_huge_slice(dtype: torch.dtype) -> None:
    params, kgrads = _lists(dtype, 2, always_lead=True)
    kgrads[3][0, 1] = 1e20  # slice 0 huge, slice 1 ordinary
    sumsq = T.grad_sumsq(kgrads, None, 0.0, 2)
    expected = ops.grad_sumsq(kgrads, micro_batches=2, backend="torch")
    assert torch.isfinite(sumsq).all()
    torch.testing.assert_close(sumsq, expected, rtol=1e-9, atol=0)
    outs = T.perturb_batched(params, kgrads, sumsq, 0.05, 1e-12, False, 0.0, True)
    expected = reference.perturb_batched(params, kgrads, sumsq, 0.05)
    for i, (out, e) in enumerate(zip(outs, expected)):
        assert_matches(out, e, f"out[{i}]")
    assert_bits_equal(outs[3][0], expected[3][0], "the huge slice")


@pytest.mark.parametrize("with_t", [False, True])
@pytest.mark.parametrize("first", [True, False])
def test_fsam_direction_with_huge_values(first: bool, with_t: bool) -> None:
    params = [torch.tensor([1.5, -0.5, 2.0], device=CUDA)]
    grads = [torch.tensor([3e19, 1.0, -4e19], device=CUDA)]
    ema = [torch.tensor([2e19, 0.5, 0.0], device=CUDA)]
    p = params if with_t else None
    g_ref, m_ref = _clone(grads), _clone(ema)
    s_ref = reference.fsam_direction_(g_ref, m_ref, 0.7, 0.6, first, p, 0.01)
    s_got = T.fsam_direction_(grads, ema, 0.7, 0.6, first, p, 0.01)
    assert s_got.dtype == torch.float64 and torch.isfinite(s_got).all()
    torch.testing.assert_close(s_got, s_ref, rtol=1e-12, atol=0)
    got, w_ref = _clone(params), _clone(params)
    reference.perturb_(w_ref, g_ref, [torch.empty_like(w_ref[0])], s_ref, 0.05, 1e-12, with_t, 0.01)
    T.perturb_(got, grads, [torch.empty_like(got[0])], s_got, 0.05, 1e-12, with_t, 0.01, True)
    assert_bits_equal(got[0], w_ref[0])


def test_perturb_scale_is_fp64_rounded_once() -> None:
    """The compiled scale: fp64 sqrt.rn / div.rn with rho and eps passed as fp64, rounded once to fp32 (w = 0, g = 1:
    out[j] = scale_j exactly), over sums from 0 to far beyond the fp32 range."""
    gen = torch.Generator().manual_seed(7)
    k = 4096
    sumsq = torch.empty(k, dtype=torch.float64).uniform_(-130.0, 177.0, generator=gen).exp()
    sumsq[:4] = torch.tensor([0.0, 1e-300, 1.0, 1e77], dtype=torch.float64)
    sumsq = sumsq.to(CUDA)
    w, g = [torch.zeros(1, device=CUDA)], [torch.ones(k, 1, device=CUDA)]
    for rho, eps in [(0.05, 1e-12), (0.1234567891234, 3.3e-13)]:
        got = T.perturb_batched(w, g, sumsq, rho, eps, False, 0.0, True)[0]
        assert_bits_equal(got, reference.perturb_batched(w, g, sumsq, rho, eps)[0], f"rho={rho} eps={eps}")


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_nonfinite_gradient_beside_a_huge_one(bad: float) -> None:
    w = torch.tensor([1.0, -2.0, 3.0], device=CUDA)
    g = torch.tensor([1e20, bad, 0.0], device=CUDA)
    sumsq = T.grad_sumsq([g], [w], 0.01, 1)
    assert sumsq.dtype == torch.float64 and not torch.isfinite(sumsq).any()
    got, backup = [w.clone()], [torch.empty_like(w)]
    T.perturb_(got, [g], backup, sumsq, 0.05, 1e-12, True, 0.01, True)
    assert_bits_equal(got[0], w, "weights untouched")
    assert_bits_equal(backup[0], w, "backup still written")


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
    original = _clone(params)
    s = T.grad_sumsq(grads, params, 0.01, 1)
    assert s.device == other
    assert_sumsq(s, reference.grad_sumsq(grads, params, 0.01, 1))
    backups = [torch.empty_like(p) for p in params]
    w_ref = _clone(params)
    reference.perturb_(w_ref, grads, [torch.empty_like(p) for p in params], s, 0.05, 1e-12, True, 0.01)
    T.perturb_(params, grads, backups, s, 0.05, 1e-12, True, 0.01, True)
    for w, r in zip(params, w_ref):
        assert_matches(w, r)
    kgrads = [g.unsqueeze(0) for g in grads]
    outs = T.perturb_batched(original, kgrads, s, 0.05)
    for out, e in zip(outs, reference.perturb_batched(original, kgrads, s, 0.05)):
        assert out.device == other
        assert_matches(out, e)
    T.restore_(params, backups)
    for w, o in zip(params, original):
        assert_bits_equal(w, o)
    ema = [torch.zeros_like(g) for g in grads]
    g_ref, e_ref = _clone(grads), _clone(ema)
    assert_sumsq(T.fsam_direction_(grads, ema, 0.7, 0.6, False, params, 0.01),
                 reference.fsam_direction_(g_ref, e_ref, 0.7, 0.6, False, params, 0.01))
    torch.cuda.synchronize(other)
    assert torch.cuda.current_device() == 0


def test_captured_graph_survives_cache_eviction() -> None:
    """Tables used during a capture are pinned: more calls than the cache holds must not free them before replay."""
    tables = kernels.tables
    params, grads = _lists(torch.float32, contiguous=True)
    backups = _clone(params)
    original = _clone(params)
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
    grads = [g[0].clone() for g in kgrads]
    s1 = reference.grad_sumsq(grads, params, 0.01)
    original, w_ref = _clone(params), _clone(params)
    backups = [torch.empty_like(p) for p in params]
    reference.perturb_(w_ref, grads, [torch.empty_like(p) for p in params], s1, 0.05, 1e-12, True, 0.01)
    T.perturb_(params, grads, backups, s1, 0.05, 1e-12, True, 0.01, True)
    for w, r, b, o in zip(params, w_ref, backups, original):
        assert_matches(w, r)
        assert_bits_equal(b, o)
    T.restore_(params, backups)
    for w, o in zip(params, original):
        assert_bits_equal(w, o)
    ema = [torch.randn_like(g) for g in grads]
    g_ref, e_ref = _clone(grads), _clone(ema)
    assert_sumsq(T.fsam_direction_(grads, ema, 0.7, 0.6, False, params, 0.01),
                 reference.fsam_direction_(g_ref, e_ref, 0.7, 0.6, False, params, 0.01))
    for a, e in zip(grads + ema, g_ref + e_ref):
        assert_matches(a, e)


def test_channels_last_step_is_capturable() -> None:
    """channels_last params, grads and backups are indexed in place (no staging), so the step can be captured."""
    gen = torch.Generator().manual_seed(3)
    params = [torch.randn(4, 6, 5, 3, generator=gen).to(CUDA).contiguous(memory_format=torch.channels_last)]
    grads = [torch.randn(4, 6, 5, 3, generator=gen).to(CUDA).contiguous(memory_format=torch.channels_last)]
    backups = [torch.empty_like(params[0])]
    original = _clone(params)

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
    original = _clone(params)
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
        w_ref = _clone(original)
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


def _opcheck_args(name: str) -> tuple:
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen).to(CUDA) for s in [(3,), (2, 5)]]
    grads = [torch.randn_like(p) for p in params]
    kgrads = [torch.randn(2, *p.shape, device=CUDA) for p in params]
    sumsq = reference.grad_sumsq(grads)
    return {
        "grad_sumsq": (kgrads, params, 0.01, 2),
        "perturb_": (params, grads, [torch.empty_like(p) for p in params], sumsq, 0.05, 1e-12, True, 0.01, True),
        "perturb_batched": (params, kgrads, reference.grad_sumsq(kgrads, None, 0.0, 2), 0.05),
        "restore_": (params, [torch.randn_like(p) for p in params]),
        "fsam_direction_": (grads, [torch.randn_like(g) for g in grads], 1.0, 0.9, False, params, 0.01),
    }[name]


@pytest.mark.parametrize("name", OPS)
def test_opcheck(name: str) -> None:
    torch.library.opcheck(getattr(T, name), _opcheck_args(name))


def test_self_check_passes() -> None:
    """The dispatcher's first-use check (what `auto` runs before trusting the backend on a device) finds no mismatch."""
    from sam_fused._backends import self_check_backend

    assert self_check_backend("triton", CUDA) is None
