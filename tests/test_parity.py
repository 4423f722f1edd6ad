"""Every backend's ops against the torch reference (docs/DESIGN.md sections 3-5, 7), one suite for all of them.

The runners (tests/parity.py): `torch` (the reference through the op layer: the suite's own setup, exact), `cpu` and
`cpu_streaming` (the C++ kernels with plain and with non-temporal stores), `triton_interp` (the Triton kernels under
the interpreter), `cuda_emu` (the CUDA kernels' source under a CPU emulation), and on a GPU (marker `gpu`) `cuda_gpu`
and `triton_gpu`. What only some backends have (streaming stores on unaligned views, thread counts, address tables,
the planner, launch splitting, streams and graphs) stays in that backend's own test file.

Tolerances (docs/DESIGN.md section 4): elementwise fp32 within 1e-6 relative, bf16/fp16 within 1 ulp of the
reference's rounding (the CUDA GPU runner: one eps); backups and restore bit-exact; fp64 sums of squares within the
runner's sums_rtol (1e-6 where the CPU kernels add fp32 block sums). Finite gradients whose squares overflow fp32 give
a finite fp64 sum and the reference's update to the bit; a real inf/NaN gradient skips the step.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_bits_equal, assert_sumsq
from parity import (
    OPCHECK_CASES,
    T_MODES,
    Runner,
    Spec,
    Tensors,
    assert_all_bits_equal,
    bits_list,
    clone,
    computes,
    grid,
    opcheck_args,
    opcheck_grid,
    runner_params,
)

from sam_fused import reference


@pytest.fixture(params=runner_params())
def runner(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Runner:
    r: Runner = request.param
    reason = r.why_not()
    if reason:
        pytest.skip(reason)
    for key, value in r.env.items():
        monkeypatch.setenv(key, value)
    return r


def run(runner: Runner, name: str, *args: object) -> object:
    return getattr(runner.ops(), name)(*args)


def assert_close_list(runner: Runner, actual: Tensors, expected: Tensors, what: str) -> None:
    assert len(actual) == len(expected), what
    for i, (a, e) in enumerate(zip(actual, expected)):
        runner.close(a, e, f"{what}[{i}]")


# ---- parity, op by op ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 5])
@pytest.mark.parametrize("runner,dtype,t_mode", grid(t_modes=True, which=computes), indirect=["runner"])
def test_grad_sumsq(runner: Runner, dtype: torch.dtype, k: int, t_mode: str) -> None:
    adaptive, eta = T_MODES[t_mode]
    params, grads = runner.lists(dtype, k)
    p = params if adaptive else None
    got = run(runner, "grad_sumsq", grads, p, eta, k)
    assert got.shape == (k,) and got.dtype == torch.float64 and got.device == grads[0].device
    assert_sumsq(got, reference.grad_sumsq(grads, p, eta, k), runner.sums_rtol)
    if runner.gpu:  # cheap there; the slow CPU runners are checked by test_reductions_are_deterministic
        assert_bits_equal(run(runner, "grad_sumsq", grads, p, eta, k), got, "deterministic")


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("runner,dtype,t_mode", grid(t_modes=True), indirect=["runner"])
def test_perturb_backup_and_restore(runner: Runner, dtype: torch.dtype, t_mode: str, normalize: bool) -> None:
    adaptive, eta = T_MODES[t_mode]
    original, grads = runner.lists(dtype)
    sumsq = reference.grad_sumsq(grads, original if adaptive else None, eta)
    w_ref = clone(original)
    reference.perturb_(w_ref, grads, [torch.empty_like(p) for p in original], sumsq, 0.05, 1e-12, adaptive, eta,
                       normalize)
    params, backups = clone(original), [torch.full_like(p, 7.0) for p in original]
    run(runner, "perturb_", params, grads, backups, sumsq, 0.05, 1e-12, adaptive, eta, normalize)
    assert_close_list(runner, params, w_ref, "params")
    assert_all_bits_equal(backups, original, "backups")
    run(runner, "restore_", params, backups)
    assert_all_bits_equal(params, original, "restored params")
    assert all(p.stride() == o.stride() for p, o in zip(params, original))  # in place, layout kept


@pytest.mark.parametrize("variant", ["sam", "asam eta=0.01", "asam unnormalized"])
@pytest.mark.parametrize("k", [1, 2, 5])
@pytest.mark.parametrize("runner,dtype", grid(which=computes), indirect=["runner"])
def test_perturb_batched(runner: Runner, dtype: torch.dtype, k: int, variant: str) -> None:
    adaptive, eta, normalize = {"sam": (False, 0.0, True), "asam eta=0.01": (True, 0.01, True),
                                "asam unnormalized": (True, 0.0, False)}[variant]
    params, grads = runner.lists(dtype, k, lead=True)
    original = clone(params)
    sliced = grads if k > 1 else [g[0] for g in grads]  # grad_sumsq takes [*p.shape] grads when k = 1
    sumsq = reference.grad_sumsq(sliced, params if adaptive else None, eta, k)
    if k == 5:
        sumsq[2] = float("inf")  # that slice's copy is the unperturbed weight
    got = run(runner, "perturb_batched", params, grads, sumsq, 0.05, 1e-12, adaptive, eta, normalize)
    expected = reference.perturb_batched(params, grads, sumsq, 0.05, 1e-12, adaptive, eta, normalize)
    assert all(a.device == e.device for a, e in zip(got, expected))
    if runner.fake_layout:
        assert all(a.stride() == torch.empty_like(g).stride() for a, g in zip(got, grads))
    assert_close_list(runner, got, expected, "out")
    assert_all_bits_equal(params, original, "params must not be modified")


@pytest.mark.parametrize("first", [True, False])
@pytest.mark.parametrize("runner,dtype,t_mode", grid(t_modes=True, which=computes), indirect=["runner"])
def test_fsam_direction(runner: Runner, dtype: torch.dtype, first: bool, t_mode: str) -> None:
    adaptive, eta = T_MODES[t_mode]
    params, grads0 = runner.lists(dtype)
    ema0 = runner.ema(dtype, seed=2)
    p = params if adaptive else None
    g_ref, m_ref = clone(grads0), clone(ema0)
    s_ref = reference.fsam_direction_(g_ref, m_ref, 0.7, 0.6, first, p, eta)
    grads, ema = clone(grads0), clone(ema0)
    s = run(runner, "fsam_direction_", grads, ema, 0.7, 0.6, first, p, eta)
    assert s.dtype == torch.float64
    if first:  # the EMA starts at g, so d = g
        assert_all_bits_equal(ema, grads0, "ema = g on the first step")
        assert_all_bits_equal(grads, grads0, "d = g on the first step")
    assert_close_list(runner, grads, g_ref, "d")
    assert_close_list(runner, ema, m_ref, "ema")
    assert_sumsq(s, s_ref, runner.sums_rtol)
    # The sum is of the direction as stored: recomputing it from the runner's own d must agree.
    assert_sumsq(s, reference.grad_sumsq(grads, p, eta), runner.sums_rtol)


@pytest.mark.parametrize("runner", runner_params(computes), indirect=True)
def test_fsam_direction_over_steps(runner: Runner) -> None:
    """Several F-SAM steps in a row (the EMA carries over), bf16 storage."""
    dtype = torch.bfloat16
    ema = [torch.empty(s.shape, dtype=dtype, device=runner.device) for s in runner.specs]
    ema_ref = clone(ema)
    for step in range(3):
        _, grads = runner.lists(dtype, seed=10 + step)
        g_ref = clone(grads)
        s = run(runner, "fsam_direction_", grads, ema, 1.0, 0.9, step == 0, None, 0.0)
        s_ref = reference.fsam_direction_(g_ref, ema_ref, 1.0, 0.9, step == 0, None, 0.0)
        assert_sumsq(s, s_ref, runner.sums_rtol)
        assert_close_list(runner, grads + ema, g_ref + ema_ref, f"step {step}")


def test_large_tensor(runner: Runner) -> None:
    """One tensor of > 65,536 elements (many work units and chunks, a ragged last one), fp32, and k = 2 slices."""
    gen = torch.Generator().manual_seed(3)
    w, g, gk = ([torch.randn(shape, generator=gen).to(runner.device)] for shape in [70_001, 70_001, (2, 70_001)])
    assert_sumsq(run(runner, "grad_sumsq", g, w, 0.01, 1), reference.grad_sumsq(g, w, 0.01, 1), runner.sums_rtol)
    assert_sumsq(run(runner, "grad_sumsq", gk, None, 0.0, 2), reference.grad_sumsq(gk, None, 0.0, 2), runner.sums_rtol)
    sumsq = reference.grad_sumsq(g)
    original, w_ref, backup = clone(w), clone(w), [torch.empty_like(w[0])]
    reference.perturb_(w_ref, g, [torch.empty_like(w[0])], sumsq, 0.05)
    run(runner, "perturb_", w, g, backup, sumsq, 0.05, 1e-12, False, 0.0, True)
    runner.close(w[0], w_ref[0])
    assert_bits_equal(backup[0], original[0])
    run(runner, "restore_", w, backup)
    assert_bits_equal(w[0], original[0])


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy (interpreter), NaN bits
@pytest.mark.parametrize("runner,dtype", grid(), indirect=["runner"])
def test_restore_is_bit_exact_for_any_bits(runner: Runner, dtype: torch.dtype) -> None:
    """Arbitrary bit patterns (NaN payloads, -0.0, subnormals, inf) survive backup (a perturb_ whose non-finite sumsq
    leaves w alone) and restore, aligned or not."""
    original = bits_list(runner.specs, "param", dtype, runner.device, seed=3)
    params, backups = clone(original), [torch.empty_like(p) for p in original]
    grads = [torch.zeros_like(p) for p in params]
    nan = torch.tensor([float("nan")], device=runner.device)
    run(runner, "perturb_", params, grads, backups, nan, 0.05, 1e-12, False, 0.0, True)
    assert_all_bits_equal(params, original, "params")
    assert_all_bits_equal(backups, original, "backups")
    backups = bits_list(runner.specs, "grad", dtype, runner.device, seed=5)  # misaligned where params are not
    params = [torch.zeros_like(p) for p in original]
    run(runner, "restore_", params, backups)
    assert_all_bits_equal(params, backups, "restored")


# ---- zero, non-finite and huge gradients -----------------------------------------------------------------------


@pytest.mark.parametrize("runner,dtype,t_mode", grid(t_modes=True, edge=True), indirect=["runner"])
def test_zero_gradient_gives_zero_perturbation(runner: Runner, dtype: torch.dtype, t_mode: str) -> None:
    adaptive, eta = T_MODES[t_mode]
    original, _ = runner.lists(dtype)
    zeros = [torch.zeros_like(p) for p in original]
    sumsq = run(runner, "grad_sumsq", zeros, original if adaptive else None, eta, 1)
    assert torch.equal(sumsq.cpu(), torch.zeros(1, dtype=torch.float64))
    params, backups = clone(original), [torch.empty_like(p) for p in original]
    run(runner, "perturb_", params, zeros, backups, sumsq, 0.05, 1e-12, adaptive, eta, True)
    assert_all_bits_equal(params, original, "w + 0")
    for k, s in ((1, sumsq), (2, torch.zeros(2, device=runner.device))):  # an fp32 sumsq too
        outs = run(runner, "perturb_batched", original, [torch.zeros(k, *p.shape, dtype=dtype, device=p.device)
                                                         for p in original], s, 0.05, 1e-12, adaptive, eta, True)
        for o, p in zip(outs, original):
            assert not o.isnan().any() and all(torch.equal(o[j], p) for j in range(k))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, on masked-off lanes (0 * inf)
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("runner,dtype,t_mode", grid(t_modes=True, edge=True), indirect=["runner"])
def test_non_finite_gradient_skips_the_step(runner: Runner, dtype: torch.dtype, bad: float, t_mode: str) -> None:
    """Widening to fp64 must not hide a genuinely non-finite gradient, also next to a huge finite one; per
    micro-batch, only the slice with the non-finite norm stays unperturbed."""
    adaptive, eta = T_MODES[t_mode]
    original, grads = runner.lists(dtype)
    big = grads[runner.big]
    big[70] = 1e4 if dtype == torch.float16 else 2e19
    big[40_000 % big.numel()] = bad  # in a later chunk where there are several
    p = original if adaptive else None
    sumsq = run(runner, "grad_sumsq", grads, p, eta, 1)
    assert sumsq.dtype == torch.float64 and not torch.isfinite(sumsq).any()
    assert torch.isnan(sumsq).item() == torch.isnan(reference.grad_sumsq(grads, p, eta)).item()
    params, backups = clone(original), [torch.empty_like(x) for x in original]
    run(runner, "perturb_", params, grads, backups, sumsq, 0.05, 1e-12, adaptive, eta, True)
    assert_all_bits_equal(params, original, "params untouched")
    assert_all_bits_equal(backups, original, "backups still written")
    ema = [torch.zeros_like(x) for x in grads]
    assert not torch.isfinite(run(runner, "fsam_direction_", clone(grads), ema, 1.0, 0.5, False, p, eta)).any()
    if adaptive:
        return  # the per-micro-batch part has no T factor: once per dtype and value is enough

    _, kgrads = runner.lists(dtype, 2, seed=4)
    kgrads[runner.big][1, 5] = bad
    ksumsq = run(runner, "grad_sumsq", kgrads, None, 0.0, 2)
    assert torch.isfinite(ksumsq[0]) and not torch.isfinite(ksumsq[1])
    outs = run(runner, "perturb_batched", original, kgrads, ksumsq, 0.05, 1e-12, False, 0.0, True)
    expected = reference.perturb_batched(original, kgrads, ksumsq, 0.05)
    assert_all_bits_equal([o[1] for o in outs], original, "slice with non-finite gradients = w")
    assert_close_list(runner, [o[0] for o in outs], [e[0] for e in expected], "finite slice")
    assert not torch.equal(outs[runner.big][0], original[runner.big])


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize("runner,dtype", grid(), indirect=["runner"])
def test_non_finite_sumsq_leaves_weights(runner: Runner, dtype: torch.dtype, bad: float) -> None:
    params, grads = runner.lists(dtype)
    w, backups = clone(params), [torch.empty_like(p) for p in params]
    run(runner, "perturb_", w, grads, backups, torch.tensor([bad], device=runner.device), 0.05, 1e-12, True, 0.0, True)
    assert_all_bits_equal(w, params, "params")
    assert_all_bits_equal(backups, params, "backups")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, on masked-off lanes (0 * inf)
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_gradient_beside_a_huge_one(runner: Runner, bad: float) -> None:
    w = torch.tensor([1.0, -2.0, 3.0], device=runner.device)
    g = torch.tensor([1e20, bad, 0.0], device=runner.device)
    sumsq = run(runner, "grad_sumsq", [g], [w], 0.01, 1)
    assert sumsq.dtype == torch.float64 and not torch.isfinite(sumsq).any()
    got, backup = [w.clone()], [torch.empty_like(w)]
    run(runner, "perturb_", got, [g], backup, sumsq, 0.05, 1e-12, True, 0.01, True)
    assert_bits_equal(got[0], w, "weights untouched")
    assert_bits_equal(backup[0], w, "backup still written")


# Finite gradients whose squares overflow fp32 (|g| > ~1.8e19): every term is squared in fp64 and the scale computed
# in fp64, so the sums stay finite and the step is taken (with fp32 sums it was skipped as if non-finite).
# (dtype, gradient, weights, adaptive, eta, expected w' - w or None)
_F32_MAX = torch.finfo(torch.float32).max
BIG_DTYPES = [torch.float32, torch.bfloat16]  # fp16 cannot hold gradients whose squares overflow fp32
HUGE = [
    (torch.float32, [2e19, 0.0, 0.0], [1.0, 2.0, 3.0], False, 0.0, [0.05, 0.0, 0.0]),
    (torch.float32, [1e20, 0.0, 0.0], [0.5, 1.0, -2.0], False, 0.0, [0.05, 0.0, 0.0]),
    (torch.float32, [3e20, -4e20, 1.0], [1.0, 2.0, 3.0], False, 0.0, [0.03, -0.04, 0.0]),
    (torch.float32, [_F32_MAX, -_F32_MAX, 1.0], [1.0, 2.0, 3.0], False, 0.0, None),  # sumsq 2.3e77
    (torch.bfloat16, [1e20, 0.0, 0.0], [1.0, -2.0, 3.0], False, 0.0, [0.05, 0.0, 0.0]),
    # ASAM, t * g = 1e25: w' - w = rho * t^2 g / |t g| = rho * t
    (torch.float32, [1e15, 0.0, 0.0], [1e10, 1.0, -2.0], True, 0.01, [5e8, 0.0, 0.0]),
    # ASAM, t * g = 1e20 (its square beyond fp32): scale = 0.05 / 1e20, t^2 g = 1e30, so w moves by 5e8
    (torch.float32, [1e10, 0.0, 3.0, -1.0], [1e10, 1e10, 0.5, -3.0], True, 0.01, [5e8, 0.0, 0.0, 0.0]),
    # ASAM, t * g = 1e40 beyond fp32 itself (t * t * g = inf in the fp32 update, as in the reference; the other
    # elements move by a subnormal fp32 scale, which must not be flushed to zero)
    (torch.float32, [1e30, 0.0, 0.0], [1e10, 1.0, -2.0], True, 0.01, None),
    (torch.float32, [1e30, 0.5, 1.0], [1e10, 1.0, -2.0], True, 0.01, None),
    (torch.float32, [1e30, 0.0, 3.0, -1.0], [1e10, 1e10, 0.5, -3.0], True, 0.01, None),
]


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy: t * t * g = 1e50 in fp32 -> inf
@pytest.mark.parametrize("dtype,grad,weights,adaptive,eta,delta", HUGE)
def test_huge_finite_gradient_is_perturbed(runner: Runner, dtype: torch.dtype, grad: list[float],
                                           weights: list[float], adaptive: bool, eta: float,
                                           delta: list[float] | None) -> None:
    g, w = [torch.tensor(grad).to(runner.device, dtype)], [torch.tensor(weights).to(runner.device, dtype)]
    p = w if adaptive else None
    sumsq = run(runner, "grad_sumsq", g, p, eta, 1)
    expected = reference.grad_sumsq(g, p, eta)
    assert sumsq.dtype == torch.float64 and torch.isfinite(sumsq).all() and sumsq.item() > 3.4e38
    if sum(x != 0 for x in grad) == 1 and not adaptive:
        assert torch.equal(sumsq, expected)  # one nonzero term, squared exactly in fp64
    assert_sumsq(sumsq, expected, runner.huge_rtol)
    got, w_ref = clone(w), clone(w)
    reference.perturb_(w_ref, g, [torch.empty_like(w[0])], expected, 0.05, 1e-12, adaptive, eta)
    backups = [torch.empty_like(w[0])]
    run(runner, "perturb_", got, g, backups, sumsq, 0.05, 1e-12, adaptive, eta, True)
    assert_bits_equal(backups[0], w[0], "backups")
    assert_bits_equal(got[0], w_ref[0], "params")
    assert not torch.equal(got[0], w[0])
    if delta is not None:
        step = torch.tensor(delta, dtype=torch.float64, device=runner.device)
        torch.testing.assert_close(got[0], (w[0].double() + step).to(dtype))


@pytest.mark.parametrize("runner", runner_params(computes), indirect=True)
def test_largest_terms_have_a_finite_sum(runner: Runner) -> None:
    extreme = torch.full((64,), torch.finfo(torch.float32).max, device=runner.device)  # (t * g)^2 = 1.3e154
    assert torch.isfinite(run(runner, "grad_sumsq", [extreme], [extreme], 0.0, 1)).all()


@pytest.mark.parametrize("runner,dtype,t_mode", grid(BIG_DTYPES, t_modes=True, which=computes, edge=True),
                         indirect=["runner"])
def test_huge_finite_gradients_batched_and_sliced(runner: Runner, dtype: torch.dtype, t_mode: str) -> None:
    """perturb_batched with one slice above the fp32 square range and one ordinary slice; grad_sumsq per slice over
    several chunks (the huge value sits in the big tensor, whose sum spans chunks and vector packets)."""
    adaptive, eta = T_MODES[t_mode]
    for value in [2e19] if adaptive else [2e19, 1e20]:
        _huge_slice(runner, dtype, adaptive, eta, value)


def _huge_slice(runner: Runner, dtype: torch.dtype, adaptive: bool, eta: float, value: float) -> None:
    params, grads = runner.lists(dtype, 2, seed=14)
    big = runner.big
    grads[big][0, 70], params[big][70] = value, 2.0  # t >= 2: (t g)^2 > 3.4e38
    p = params if adaptive else None
    sumsq = run(runner, "grad_sumsq", grads, p, eta, 2)
    expected = reference.grad_sumsq(grads, p, eta, 2)
    assert torch.isfinite(sumsq).all() and sumsq[0] > 3.4e38
    assert_sumsq(sumsq[:1], expected[:1], runner.huge_rtol)
    assert_sumsq(sumsq, expected, runner.sums_rtol)
    got = run(runner, "perturb_batched", params, grads, sumsq, 0.05, 1e-12, adaptive, eta, True)
    assert_all_bits_equal(got, reference.perturb_batched(params, grads, sumsq, 0.05, 1e-12, adaptive, eta), "out")
    # The huge slice moves element 70 by about rho * t^2 g / |t g| = rho * t (the rest of the slice is tiny beside).
    w = params[big][70].double()
    step = 0.05 * (w.abs() + eta if adaptive else 1.0)
    torch.testing.assert_close(got[big][0, 70].double(), w + step, rtol=1e-2 if dtype == torch.bfloat16 else 1e-6,
                               atol=0.0)
    alone = run(runner, "perturb_batched", params, [g[1:] for g in grads], sumsq[1:], 0.05, 1e-12, adaptive, eta,
                True)
    assert_all_bits_equal([o[1] for o in got], [o[0] for o in alone], "ordinary slice as if alone")


@pytest.mark.parametrize("first", [True, False])
@pytest.mark.parametrize("sigma,lmbda", [(0.7, 0.6), (1.0, 0.5)])
@pytest.mark.parametrize("runner,dtype,t_mode", grid(BIG_DTYPES, t_modes=True, which=computes, edge=True),
                         indirect=["runner"])
def test_fsam_direction_with_huge_values(runner: Runner, dtype: torch.dtype, sigma: float, lmbda: float,
                                         first: bool, t_mode: str) -> None:
    adaptive, eta = T_MODES[t_mode]
    specs = runner.specs + [Spec((3,))]
    params, grads = runner.lists(dtype, seed=15, specs=specs)
    ema = runner.ema(dtype, seed=16) + [torch.tensor([2e19, 0.5, 0.0], dtype=dtype, device=runner.device)]
    params[-1].copy_(torch.tensor([1.5, -0.5, 2.0]))
    grads[-1].copy_(torch.tensor([3e19, 1.0, -4e19]))
    big, seven = runner.big, [s.shape for s in specs].index((7,))
    grads[big][70], ema[big][70] = 3e20, 1e20  # d = 3e20 - sigma 1e20: squares beyond fp32 either way
    grads[big][5], ema[big][5] = 3e19, 1e19
    grads[seven][5] = -1e30  # a vector tail element (7 elements: no full packet)
    grads[seven][0], ema[seven][0] = -1e20, 1e20
    p = params if adaptive else None
    g_ref, m_ref = clone(grads), clone(ema)
    s_ref = reference.fsam_direction_(g_ref, m_ref, sigma, lmbda, first, p, eta)
    s = run(runner, "fsam_direction_", grads, ema, sigma, lmbda, first, p, eta)
    assert torch.isfinite(s).all() and s.item() > 1e40  # above the fp32 range
    assert_all_bits_equal(grads, g_ref, "d")
    assert_all_bits_equal(ema, m_ref, "ema")
    assert_sumsq(s, s_ref, runner.huge_rtol)
    assert_sumsq(s, reference.grad_sumsq(grads, p, eta), runner.huge_rtol)  # of the stored d
    got, w_ref = clone(params), clone(params)
    reference.perturb_(w_ref, g_ref, [torch.empty_like(x) for x in params], s_ref, 0.05, 1e-12, adaptive, eta)
    run(runner, "perturb_", got, grads, [torch.empty_like(x) for x in params], s, 0.05, 1e-12, adaptive, eta, True)
    assert_all_bits_equal(got, w_ref, "perturbed by the huge direction")


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("rho,eps", [(0.05, 1e-12), (0.3, 1e-12), (2 / 3, 1e-12), (0.1234567891234, 3.3e-13)])
@pytest.mark.parametrize("runner", runner_params(computes), indirect=True)
def test_scale_is_fp64_rounded_once(runner: Runner, rho: float, eps: float, normalize: bool) -> None:
    """scale = rho / (sqrt(sumsq) + eps) in fp64 from rho and eps as given, rounded once to fp32: with w = 0 and
    g = 1 each slice's output is that fp32 scale (fp32 rho and eps would be off by an ulp for rho = 0.3, 2/3)."""
    sums = torch.tensor([0.0, 1e-300, 1.0, 3.0, 1e6 + 1, 4e38, 1e77, 1e80], dtype=torch.float64)
    k = sums.numel()
    params, grads = [torch.zeros(5, device=runner.device)], [torch.ones(k, 5, device=runner.device)]
    out = run(runner, "perturb_batched", params, grads, sums.to(runner.device), rho, eps, False, 0.0, normalize)
    scales = [rho / (s ** 0.5 + eps) if normalize else rho for s in sums.tolist()]
    assert torch.equal(out[0].cpu(), torch.tensor(scales, dtype=torch.float32)[:, None].expand(k, 5))
    expected = reference.perturb_batched(params, grads, sums.to(runner.device), rho, eps, False, 0.0, normalize)
    assert_bits_equal(out[0], expected[0])


@pytest.mark.parametrize("runner", runner_params(computes), indirect=True)
def test_scale_over_many_sums(runner: Runner) -> None:
    """The same over sums from 0 to far beyond the fp32 range, one micro-batch each."""
    gen = torch.Generator().manual_seed(7)
    k = runner.scale_k
    sumsq = torch.empty(k, dtype=torch.float64).uniform_(-130.0, 177.0, generator=gen).exp()
    sumsq[:4] = torch.tensor([0.0, 1e-300, 1.0, 1e77], dtype=torch.float64)
    sumsq = sumsq.to(runner.device)
    w, g = [torch.zeros(1, device=runner.device)], [torch.ones(k, 1, device=runner.device)]
    for rho, eps in [(0.05, 1e-12), (0.1234567891234, 3.3e-13)]:
        got = run(runner, "perturb_batched", w, g, sumsq, rho, eps, False, 0.0, True)[0]
        assert_bits_equal(got, reference.perturb_batched(w, g, sumsq, rho, eps)[0], f"rho={rho} eps={eps}")


# ---- determinism, validation, opcheck --------------------------------------------------------------------------


@pytest.mark.parametrize("runner,dtype", grid(BIG_DTYPES, which=computes, slow_dtypes=[torch.bfloat16]),
                         indirect=["runner"])
def test_reductions_are_deterministic(runner: Runner, dtype: torch.dtype) -> None:
    params, grads = runner.lists(dtype, 2, seed=11)
    first = run(runner, "grad_sumsq", grads, params, 0.01, 2)
    for _ in range(4 if runner.gpu else 1):
        assert_bits_equal(run(runner, "grad_sumsq", grads, params, 0.01, 2), first)
    ema = [torch.ones(g.shape[1:], dtype=dtype, device=runner.device) for g in grads]
    d = [g[0].clone() for g in grads]
    sums = {run(runner, "fsam_direction_", clone(d), clone(ema), 1.0, 0.9, False, None, 0.0).item()
            for _ in range(5 if runner.gpu else 2)}
    assert len(sums) == 1


def _invalid_cases(dev: str) -> dict[str, tuple[str, tuple, type, str]]:
    """Invalid calls every validating backend refuses with the same words: name -> (op, args, error, match)."""
    p = [torch.zeros(3, device=dev), torch.zeros(2, 2, device=dev)]
    g = [torch.ones(3, device=dev), torch.ones(2, 2, device=dev)]
    b = [torch.empty_like(t) for t in p]
    s = torch.ones(1, device=dev)
    return {
        "length": ("perturb_", (p, g[:1], b, s, 0.05), ValueError, "grads has 1 tensors but params has 2"),
        "shape": ("perturb_", (p, [g[0], torch.ones(4, device=dev)], b, s, 0.05), ValueError, r"grads\[1\] has shape"),
        "backup dtype": ("perturb_", (p, g, [b[0], b[1].half()], s, 0.05), ValueError, r"backups\[1\] has dtype"),
        "k < 1": ("grad_sumsq", (g, None, 0.0, 0), ValueError, "micro_batches"),
        "k leading dim": ("grad_sumsq", ([torch.ones(3, 4, device=dev)], None, 0.0, 2), ValueError,
                          r"grads\[0\] has shape .*; expected leading dim 2"),
        "batched k": ("perturb_batched", (p, [torch.ones(2, *t.shape, device=dev) for t in p],
                                          torch.ones(3, device=dev), 0.05), ValueError, r"grads\[0\] has shape"),
    }


INVALID = ["length", "shape", "backup dtype", "k < 1", "k leading dim", "batched k"]


@pytest.mark.parametrize("case", INVALID)
@pytest.mark.parametrize("runner", runner_params(lambda r: r.validates and computes(r)), indirect=True)
def test_invalid_inputs_raise(runner: Runner, case: str) -> None:
    name, args, error, match = _invalid_cases(runner.device)[case]
    with pytest.raises(error, match=match):
        getattr(runner.kernels(), name)(*args)


@pytest.mark.parametrize("case", OPCHECK_CASES)
@pytest.mark.parametrize("runner,dtype", opcheck_grid(), indirect=["runner"])
def test_opcheck(runner: Runner, dtype: torch.dtype, case: str) -> None:
    op = getattr(runner.kernels(), case.split()[0])
    torch.library.opcheck(op, opcheck_args(runner, dtype)[case])
