"""The Triton kernels (kernels/, torch.ops.sam_fused_triton) executed by the Triton interpreter on CPU tensors and
compared with the torch reference (docs/DESIGN.md sections 3-5 and 7.2).

tests/conftest.py sets TRITON_INTERPRET=1 when there is no CUDA device. This checks the kernels' semantics: indexing
through the address tables, masking, micro-batch slices, order of operations and rounding, determinism, validation.
GPU compilation is checked without a GPU by compiling every kernel specialization to a cubin for sm_80 in a
subprocess (kernels/aot.py); running them on a GPU, and their speed, are left to tests/test_triton_gpu.py.
Tolerances (docs/DESIGN.md section 4): fp32 within 1e-6 relative; bf16/fp16 within 1 ulp of the reference's own
rounding; backups and restore bit-exact; the fp64 sums of squares as tests/helpers.py assert_sumsq says. Gradients
whose squares overflow fp32 must give a finite fp64 sum and the reference's update to the bit. The interpreter is
slow: shapes are small, with one tensor > 65,536 elements.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from helpers import T_MODES, assert_bits_equal, assert_matches, assert_sumsq, random_tensor

from sam_fused import ops, reference
from sam_fused._registry import OPS

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 (tests/conftest.py sets it when CUDA is unavailable); "
                "on a GPU the compiled kernels are tested by test_triton_gpu.py", allow_module_level=True)
kernels = pytest.importorskip("sam_fused.kernels", reason="triton is not installed (pip install triton)")

T = torch.ops.sam_fused_triton
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# empty, size 1, odd sizes, one crossing a work-unit boundary (4096 elements), 4-D, and a non-contiguous (transposed)
SHAPES = [(0,), (1,), (7,), (4097,), (3, 5, 7, 2), (9, 6)]
TRANSPOSED = {5}  # indices of SHAPES built as transposed (non-contiguous) views


# ---------------------------------------------------------------------------------------------------------- helpers


def _lists(dtype: torch.dtype, k: int = 1, seed: int = 0, shapes: list = SHAPES,
           always_lead: bool = False) -> tuple[list, list]:
    """params [*shape] and grads ([k, *shape] when k > 1 or always_lead)."""
    gen = torch.Generator().manual_seed(seed)
    lead = k if (k > 1 or always_lead) else None
    transposed = TRANSPOSED if shapes is SHAPES else set()
    params = [random_tensor(s, dtype, gen, transposed=i in transposed) for i, s in enumerate(shapes)]
    grads = [random_tensor(s, dtype, gen, lead, transposed=i in transposed) for i, s in enumerate(shapes)]
    return params, grads


def _clone(ts: list) -> list:
    return [t.clone() for t in ts]  # clone() keeps the (transposed) strides


# ------------------------------------------------------------------------------------------------------- op parity


@pytest.mark.parametrize("t_mode", list(T_MODES))
@pytest.mark.parametrize("k", [1, 2, 5])
@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_sumsq(dtype: torch.dtype, k: int, t_mode: str) -> None:
    with_t, eta = T_MODES[t_mode]
    params, grads = _lists(dtype, k)
    p = params if with_t else None
    got = T.grad_sumsq(grads, p, eta, k)
    assert got.shape == (k,) and got.dtype == torch.float64 and got.device == grads[0].device
    assert_sumsq(got, reference.grad_sumsq(grads, p, eta, k))


def test_grad_sumsq_is_deterministic() -> None:
    params, grads = _lists(torch.bfloat16, 2)
    a, b = T.grad_sumsq(grads, params, 0.01, 2), T.grad_sumsq(grads, params, 0.01, 2)
    assert_bits_equal(a, b)


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
    assert not params[5].is_contiguous()  # a transposed view, updated through a contiguous copy written back
    assert torch.equal(params[5], original[5]) == torch.equal(w_ref[5], original[5])
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
    original = _clone(params)
    sliced = grads if k > 1 else [g[0] for g in grads]  # grad_sumsq takes [*p.shape] grads when k = 1
    sumsq = reference.grad_sumsq(sliced, params if adaptive else None, eta, k)
    got = T.perturb_batched(params, grads, sumsq, 0.05, 1e-12, adaptive, eta, normalize)
    expected = reference.perturb_batched(params, grads, sumsq, 0.05, 1e-12, adaptive, eta, normalize)
    assert len(got) == len(params)
    for i, (a, e) in enumerate(zip(got, expected)):
        assert_matches(a, e, f"out[{i}]")
    for p, o in zip(params, original):
        assert_bits_equal(p, o, "params must not be modified")


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
        assert_matches(grads[i], g_ref[i], f"grads[{i}] (direction)")
        assert_matches(ema[i], m_ref[i], f"ema[{i}]")
        if first:
            assert_bits_equal(ema[i], grads[i], f"ema[{i}] = g on the first step")


def test_fsam_direction_over_steps() -> None:
    """Several F-SAM steps in a row (the EMA carries over), bf16 storage."""
    dtype = torch.bfloat16
    ema, ema_ref = [torch.empty(s, dtype=dtype) for s in SHAPES[:5]], [torch.empty(s, dtype=dtype) for s in SHAPES[:5]]
    for step in range(3):
        _, grads = _lists(dtype, seed=10 + step, shapes=SHAPES[:5])
        g_ref = _clone(grads)
        s_got = T.fsam_direction_(grads, ema, 1.0, 0.9, step == 0, None, 0.0)
        s_ref = reference.fsam_direction_(g_ref, ema_ref, 1.0, 0.9, step == 0, None, 0.0)
        assert_sumsq(s_got, s_ref)
        for a, e in zip(grads + ema, g_ref + ema_ref):
            assert_matches(a, e, f"step {step}")


def test_large_tensor() -> None:
    """One tensor of > 65,536 elements (many work units, a ragged last one), fp32 and k = 2 slices."""
    gen = torch.Generator().manual_seed(3)
    w = [torch.randn(70_001, generator=gen)]
    g = [torch.randn(70_001, generator=gen)]
    gk = [torch.randn(2, 70_001, generator=gen)]
    assert_sumsq(T.grad_sumsq(g, w, 0.01, 1), reference.grad_sumsq(g, w, 0.01, 1))
    assert_sumsq(T.grad_sumsq(gk, None, 0.0, 2), reference.grad_sumsq(gk, None, 0.0, 2))
    sumsq = reference.grad_sumsq(g)
    original, w_ref = _clone(w), _clone(w)
    reference.perturb_(w_ref, g, [torch.empty_like(w[0])], sumsq, 0.05)
    backup = [torch.empty_like(w[0])]
    T.perturb_(w, g, backup, sumsq, 0.05, 1e-12, False, 0.0, True)
    assert_matches(w[0], w_ref[0])
    assert_bits_equal(backup[0], original[0])
    T.restore_(w, backup)
    assert_bits_equal(w[0], original[0])


# ------------------------------------------------------------------------------------------------- safety rules


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_gradient_gives_zero_perturbation(dtype: torch.dtype, adaptive: bool) -> None:
    params, _ = _lists(dtype, shapes=SHAPES[:5])
    zeros = [torch.zeros_like(p) for p in params]
    sumsq = T.grad_sumsq(zeros, params if adaptive else None, 0.01, 1)
    assert torch.equal(sumsq, torch.zeros(1, dtype=torch.float64))
    original, backups = _clone(params), [torch.empty_like(p) for p in params]
    T.perturb_(params, zeros, backups, sumsq, 0.05, 1e-12, adaptive, 0.01, True)
    outs = T.perturb_batched(original, [z.unsqueeze(0) for z in zeros], sumsq, 0.05, 1e-12, adaptive, 0.01, True)
    for p, o, out in zip(params, original, outs):
        assert not p.isnan().any() and not out.isnan().any()
        assert_bits_equal(p, o, "w + 0")
        assert torch.equal(out[0], o)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, on masked-off lanes (0 * inf)
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_gradient_gives_no_perturbation(dtype: torch.dtype, bad: float) -> None:
    params, grads = _lists(dtype, shapes=SHAPES[:5])
    grads[3][100] = bad
    sumsq = T.grad_sumsq(grads, None, 0.0, 1)
    assert not torch.isfinite(sumsq).any()
    original, backups = _clone(params), [torch.empty_like(p) for p in params]
    T.perturb_(params, grads, backups, sumsq, 0.05, 1e-12, True, 0.01, True)
    for i, (p, o, b) in enumerate(zip(params, original, backups)):
        assert_bits_equal(p, o, f"params[{i}] untouched")
        assert_bits_equal(b, o, f"backups[{i}] still written")
    # perturb_batched: only the non-finite micro-batch is left unperturbed
    _, kgrads = _lists(dtype, 2, seed=4, shapes=SHAPES[:5])
    kgrads[3][1, 5] = bad
    ksumsq = T.grad_sumsq(kgrads, None, 0.0, 2)
    assert torch.isfinite(ksumsq[0]) and not torch.isfinite(ksumsq[1])
    outs = T.perturb_batched(params, kgrads, ksumsq, 0.05, 1e-12, False, 0.0, True)
    expected = reference.perturb_batched(params, kgrads, ksumsq, 0.05)
    for p, out, e in zip(params, outs, expected):
        assert_bits_equal(out[1], p, "slice with non-finite gradients = w")
        assert_matches(out[0], e[0])


# Gradients whose squares overflow fp32 (|g| > 1.8e19): the sums are fp64, so a finite gradient always has a finite
# norm and is perturbed; before, the fp32 sum was inf and the step was skipped as if the gradient were non-finite.

@pytest.mark.parametrize("dtype, big", [(torch.float32, 2e19), (torch.float32, 1e20), (torch.bfloat16, 1e20)])
def test_huge_finite_gradient_is_perturbed(dtype: torch.dtype, big: float) -> None:
    w = torch.tensor([1.0, -2.0, 3.0], dtype=dtype)
    g = torch.tensor([big, 0.0, 0.0], dtype=dtype)
    sumsq = T.grad_sumsq([g], None, 0.0, 1)
    expected = ops.grad_sumsq([g], backend="torch")
    assert sumsq.dtype == torch.float64 and torch.isfinite(sumsq).all()
    assert torch.equal(sumsq, expected)  # one nonzero term, squared exactly in fp64
    got, w_ref = [w.clone()], [w.clone()]
    reference.perturb_(w_ref, [g], [torch.empty_like(w)], expected, 0.05)
    T.perturb_(got, [g], [torch.empty_like(w)], sumsq, 0.05, 1e-12, False, 0.0, True)
    assert_bits_equal(got[0], w_ref[0])
    torch.testing.assert_close(got[0], w + torch.tensor([0.05, 0.0, 0.0], dtype=dtype))  # w + rho * g / |g|


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy: t * t * g = 1e50 in fp32 -> inf
def test_huge_adaptive_gradient_has_a_finite_norm() -> None:
    """ASAM with t * g = 1e40 beyond the fp32 range: finite fp64 sum, and the reference's update to the bit (the
    huge element's t * t * g overflows fp32 there too, the others move by a subnormal fp32 scale)."""
    w = torch.tensor([1e10, 1.0, -2.0])
    g = torch.tensor([1e30, 0.5, 1.0])
    sumsq = T.grad_sumsq([g], [w], 0.01, 1)
    expected = ops.grad_sumsq([g], [w], 0.01, backend="torch")
    assert torch.isfinite(sumsq).all()
    torch.testing.assert_close(sumsq, expected, rtol=1e-12, atol=0)
    got, w_ref = [w.clone()], [w.clone()]
    reference.perturb_(w_ref, [g], [torch.empty_like(w)], expected, 0.05, 1e-12, True, 0.01)
    T.perturb_(got, [g], [torch.empty_like(w)], sumsq, 0.05, 1e-12, True, 0.01, True)
    assert_bits_equal(got[0], w_ref[0])
    extreme = torch.full((64,), torch.finfo(torch.float32).max)  # the largest possible terms: (t * g)^2 = 1.3e154
    assert torch.isfinite(T.grad_sumsq([extreme], [extreme], 0.0, 1)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # fp16 cannot hold such gradients
def test_perturb_batched_with_one_huge_slice(dtype: torch.dtype) -> None:
    params, kgrads = _lists(dtype, 2, seed=6, shapes=[(3,), (2, 4)])
    kgrads[0][0, 1] = 1e20  # slice 0 huge, slice 1 ordinary
    sumsq = T.grad_sumsq(kgrads, None, 0.0, 2)
    expected = ops.grad_sumsq(kgrads, micro_batches=2, backend="torch")
    assert torch.isfinite(sumsq).all()
    torch.testing.assert_close(sumsq, expected, rtol=1e-12, atol=0)
    outs = T.perturb_batched(params, kgrads, sumsq, 0.05, 1e-12, False, 0.0, True)
    for out, e in zip(outs, reference.perturb_batched(params, kgrads, sumsq, 0.05)):
        assert_bits_equal(out, e)


@pytest.mark.parametrize("with_t", [False, True])
@pytest.mark.parametrize("first", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fsam_direction_with_huge_values(dtype: torch.dtype, first: bool, with_t: bool) -> None:
    params = [torch.tensor([1.5, -0.5, 2.0], dtype=dtype)]
    grads = [torch.tensor([3e19, 1.0, -4e19], dtype=dtype)]
    ema = [torch.tensor([2e19, 0.5, 0.0], dtype=dtype)]
    p = params if with_t else None
    g_ref, m_ref = _clone(grads), _clone(ema)
    s_ref = reference.fsam_direction_(g_ref, m_ref, 0.7, 0.6, first, p, 0.01)
    s_got = T.fsam_direction_(grads, ema, 0.7, 0.6, first, p, 0.01)
    assert s_got.dtype == torch.float64 and torch.isfinite(s_got).all()
    torch.testing.assert_close(s_got, s_ref, rtol=1e-12, atol=0)
    assert_bits_equal(grads[0], g_ref[0])
    assert_bits_equal(ema[0], m_ref[0])
    got, w_ref = _clone(params), _clone(params)
    reference.perturb_(w_ref, g_ref, [torch.empty_like(w_ref[0])], s_ref, 0.05, 1e-12, with_t, 0.01)
    T.perturb_(got, grads, [torch.empty_like(got[0])], s_got, 0.05, 1e-12, with_t, 0.01, True)
    assert_bits_equal(got[0], w_ref[0])


def test_perturb_scale_is_fp64_rounded_once() -> None:
    """scale = rho / (sqrt(sumsq) + eps) in fp64 with rho and eps as given (not rounded to fp32 first), then rounded
    once to fp32: with w = 0 and g = 1, out[j] = scale_j exactly, over sums from 0 to far beyond the fp32 range."""
    gen = torch.Generator().manual_seed(7)
    k = 512
    sumsq = torch.empty(k, dtype=torch.float64).uniform_(-130.0, 177.0, generator=gen).exp()
    sumsq[:4] = torch.tensor([0.0, 1e-300, 1.0, 1e77], dtype=torch.float64)
    w, g = [torch.zeros(1)], [torch.ones(k, 1)]
    for rho, eps in [(0.05, 1e-12), (0.1234567891234, 3.3e-13)]:
        got = T.perturb_batched(w, g, sumsq, rho, eps, False, 0.0, True)[0]
        assert_bits_equal(got, reference.perturb_batched(w, g, sumsq, rho, eps)[0], f"rho={rho} eps={eps}")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, on masked-off lanes (0 * inf)
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_nonfinite_gradient_beside_a_huge_one(bad: float) -> None:
    """A real inf/NaN still makes the fp64 sum non-finite, and the weights are left untouched."""
    w = torch.tensor([1.0, -2.0, 3.0])
    g = torch.tensor([1e20, bad, 0.0])
    sumsq = T.grad_sumsq([g], [w], 0.01, 1)
    assert sumsq.dtype == torch.float64 and not torch.isfinite(sumsq).any()
    got, backup = [w.clone()], [torch.empty_like(w)]
    T.perturb_(got, [g], backup, sumsq, 0.05, 1e-12, True, 0.01, True)
    assert_bits_equal(got[0], w, "weights untouched")
    assert_bits_equal(backup[0], w, "backup still written")


@pytest.mark.parametrize("dtype", DTYPES)
def test_restore_is_bit_exact_on_special_values(dtype: torch.dtype) -> None:
    iv = torch.int32 if dtype == torch.float32 else torch.int16
    gen = torch.Generator().manual_seed(5)
    n = 3000
    bits = torch.randint(torch.iinfo(iv).min, torch.iinfo(iv).max, (n,), generator=gen, dtype=iv)  # NaN payloads,
    backup = bits.view(dtype)  # subnormals, -0.0, infinities: every bit pattern must come back unchanged
    params = [torch.zeros(n, dtype=dtype), torch.zeros(1, dtype=dtype)]
    backups = [backup, torch.tensor([-0.0], dtype=dtype)]
    T.restore_(params, backups)
    for p, b in zip(params, backups):
        assert torch.equal(p.view(iv), b.view(iv))


# ------------------------------------------------------------------------------------------ address-table cache


def test_table_cache_hit_and_rebuild_after_grads_reallocated() -> None:
    tables = kernels.tables
    tables.clear_cache()  # no entry of an earlier test can match the new tensors' addresses
    params, grads = _lists(torch.float32, shapes=SHAPES[:5])
    T.grad_sumsq(grads, params, 0.0, 1)
    builds = tables.stats["builds"]
    got = T.grad_sumsq(grads, params, 0.0, 1)  # same tensors: the cached tables are reused
    assert tables.stats["builds"] == builds
    assert_sumsq(got, reference.grad_sumsq(grads, params, 0.0, 1))
    old = list(grads)  # keep the old gradients alive so that the new ones get new addresses
    grads[:] = [torch.randn_like(g) for g in grads]  # same list object, new tensors (zero_grad(set_to_none=True))
    got = T.grad_sumsq(grads, params, 0.0, 1)
    assert tables.stats["builds"] == builds + 1
    assert_sumsq(got, reference.grad_sumsq(grads, params, 0.0, 1))
    assert not torch.equal(got, reference.grad_sumsq(old, params, 0.0, 1))


def test_set_to_none_between_steps() -> None:
    """A model's grads freed and reallocated by zero_grad(set_to_none=True), several times: always the new values."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    params = list(model.parameters())
    for step in range(3):
        model.zero_grad(set_to_none=True)
        model(torch.randn(4, 5) * (step + 1)).pow(2).sum().backward()
        grads = [p.grad for p in params]
        assert_sumsq(T.grad_sumsq(grads, None, 0.0, 1), reference.grad_sumsq(grads))


# ----------------------------------------------------------------------------------- validation and integration


def test_invalid_inputs_raise_clear_errors() -> None:
    params, grads = _lists(torch.float32, shapes=[(3,), (4, 2)])
    backups = [torch.empty_like(p) for p in params]
    s = torch.ones(1)
    with pytest.raises(ValueError, match="grads has 1 tensors but params has 2"):
        T.perturb_(params, grads[:1], backups, s, 0.05)
    with pytest.raises(ValueError, match=r"grads\[1\] has shape \(8,\), expected \(4, 2\)"):
        T.perturb_(params, [grads[0], grads[1].reshape(8)], backups, s, 0.05)
    with pytest.raises(ValueError, match=r"backups\[0\] has dtype"):
        T.perturb_(params, grads, [backups[0].half(), backups[1]], s, 0.05)
    with pytest.raises(TypeError, match=r"params\[0\] has dtype torch.float64; the Triton kernels support"):
        T.restore_([torch.zeros(2, dtype=torch.float64)], [torch.zeros(2, dtype=torch.float64)])
    with pytest.raises(TypeError, match=r"grads\[0\] has dtype torch.int32"):
        T.grad_sumsq([torch.zeros(3, dtype=torch.int32)], None, 0.0, 1)
    with pytest.raises(ValueError, match="micro_batches"):
        T.grad_sumsq(grads, None, 0.0, 0)
    with pytest.raises(ValueError, match=r"grads\[0\] has shape \(3,\); expected leading dim 2"):
        T.grad_sumsq(grads, None, 0.0, 2)
    with pytest.raises(ValueError, match=r"grads\[0\] has shape \(3,\), expected \(3, 3\)"):
        T.perturb_batched(params, grads, torch.ones(3), 0.05)  # k = sumsq.numel() = 3
    with pytest.raises(ValueError, match="sumsq has 0 elements"):
        T.perturb_(params, grads, backups, torch.ones(0), 0.05)
    # lists the dispatcher would route elsewhere (sparse, meta) reach the Python implementations only when called
    # directly; they must still be refused with a clear error
    impl = kernels.IMPLS
    with pytest.raises(TypeError, match=r"grads\[1\] is a sparse"):
        impl["grad_sumsq"]([grads[0], grads[1].to_sparse()], None, 0.0, 1)
    with pytest.raises(ValueError, match=r"ema\[1\] is on meta"):
        impl["fsam_direction_"](grads, [grads[0].clone(), grads[1].to("meta")], 1.0, 0.9, True)
    with pytest.raises(ValueError, match=r"params\[0\] is on meta; the Triton kernels run CUDA tensors"):
        impl["restore_"]([params[0].to("meta")], [params[0].to("meta")])


def test_mixed_dtypes_in_one_call() -> None:
    """A direct call with fp32 and bf16 tensors: one launch per dtype bucket, sums added."""
    p32, g32 = _lists(torch.float32, shapes=[(5,), (3, 3)])
    p16, g16 = _lists(torch.bfloat16, seed=1, shapes=[(4,)])
    params, grads = [p32[0], p16[0], p32[1]], [g32[0], g16[0], g32[1]]
    assert_sumsq(T.grad_sumsq(grads, params, 0.01, 1), reference.grad_sumsq(grads, params, 0.01, 1))
    sumsq = reference.grad_sumsq(grads)
    w_ref = _clone(params)
    reference.perturb_(w_ref, grads, [torch.empty_like(p) for p in params], sumsq, 0.05)
    T.perturb_(params, grads, [torch.empty_like(p) for p in params], sumsq, 0.05)
    for a, e in zip(params, w_ref):
        assert_matches(a, e)


def test_ops_layer_with_backend_triton() -> None:
    """sam_fused.ops routes CPU tensors to the Triton kernels when backend='triton' under the interpreter."""
    params, grads = _lists(torch.float32, shapes=[(7,), (2, 3)])
    s = ops.grad_sumsq(grads, backend="triton")
    assert_sumsq(s, reference.grad_sumsq(grads))
    original, backups = _clone(params), [torch.empty_like(p) for p in params]
    ops.perturb_(params, grads, backups, s, 0.05, backend="triton")
    ops.restore_(params, backups, backend="triton")
    assert all(torch.equal(p, o) for p, o in zip(params, original))


def test_expanded_weight_is_refused_before_anything_is_written() -> None:
    """A good tensor followed by an expanded one: the Triton ops used to write the first, then fail on the second."""
    params = [torch.randn(5), torch.randn(1).expand(4)]
    grads = [torch.randn(5), torch.randn(4)]
    before = _clone(params)
    backups = [torch.empty_like(p) for p in params]
    with pytest.raises(ValueError, match=r"params\[1\] has elements that share memory"):
        T.perturb_(params, grads, backups, reference.grad_sumsq(grads), 0.05)
    with pytest.raises(ValueError, match=r"params\[1\] has elements that share memory"):
        T.restore_(params, [torch.randn(5), torch.randn(4)])
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def _opcheck_args(name: str) -> tuple:
    params, grads = _lists(torch.float32, shapes=[(3,), (2, 5)])
    _, kgrads = _lists(torch.float32, 2, seed=1, shapes=[(3,), (2, 5)])
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
    """torch.library.opcheck of torch.ops.sam_fused_triton.<op> on CPU tensors (kernels run by the interpreter)."""
    torch.library.opcheck(getattr(T, name), _opcheck_args(name))


@pytest.mark.slow
def test_kernels_compile_for_a_gpu_without_a_gpu() -> None:
    """Every kernel specialization through the whole Triton compiler (TTIR .. PTX .. cubin via the bundled ptxas) for
    sm_80 and sm_90, in a subprocess without TRITON_INTERPRET; the PTX must compute the scale with
    sqrt.rn.f64/div.rn.f64 and have no approximate sqrt/division, no fma, no atomics, and the aligned (VEC > 1)
    specializations must use 16-byte vector loads/stores (~35 s per arch on a cold Triton cache)."""
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("this triton build has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "sam_fused.kernels.aot", "--arch", "80", "90"], env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
    for arch in (80, 90):
        assert f"ok: every Triton kernel specialization compiled for sm_{arch}" in run.stdout


def test_aot_flags_scalar_accesses_in_an_aligned_specialization() -> None:
    """kernels/aot.py's PTX check itself: an aligned specialization without vector accesses is a problem."""
    from sam_fused.kernels import aot

    scalar = "ld.global.b32 %r1, [%rd1];\nst.global.b32 [%rd2], %r1;"
    assert aot.check_ptx("copy VEC=1", {"VEC": 1}, scalar) == []
    assert len(aot.check_ptx("copy VEC=4", {"VEC": 4}, scalar)) == 2
    assert len(aot.check_ptx("sumsq VEC=4", {"VEC": 4}, scalar)) == 1  # reads only: no store expected
    vector = "ld.global.v4.b32 {%r1, %r2, %r3, %r4}, [%rd1];\nst.global.v4.b32 [%rd2], {%r1, %r2, %r3, %r4};"
    assert aot.check_ptx("copy VEC=4", {"VEC": 4}, vector) == []
