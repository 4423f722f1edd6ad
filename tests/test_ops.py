"""The op layer: the torch reference against docs/DESIGN.md section 3's formulas, dispatch, validation, opcheck."""

from __future__ import annotations

import pytest
import torch

import sam_fused
from sam_fused import ops
from sam_fused._registry import OPS

SHAPES = [(0,), (1,), (7,), (3, 5), (2, 3, 4, 5)]


def _lists(k: int = 1, dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[list, list]:
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(dtype) for s in SHAPES]
    grads = [torch.randn(((k,) if k > 1 else ()) + s, generator=gen).to(dtype) for s in SHAPES]
    return params, grads


def _t(p: torch.Tensor, eta: float) -> torch.Tensor:
    return p.double().abs() + eta


@pytest.mark.parametrize("k", [1, 2, 5])
@pytest.mark.parametrize("adaptive", [False, True])
def test_grad_sumsq_formula(k: int, adaptive: bool) -> None:
    params, grads = _lists(k)
    eta = 0.01
    expected = torch.zeros(k, dtype=torch.float64)
    for p, g in zip(params, grads):
        x = g.double() * (_t(p, eta) if adaptive else 1.0)
        expected += x.reshape(k, -1).pow(2).sum(1)
    got = ops.grad_sumsq(grads, params if adaptive else None, eta, micro_batches=k, backend="torch")
    assert got.dtype == torch.float64 and got.shape == (k,)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("adaptive,normalize", [(False, True), (True, True), (False, False), (True, False)])
def test_perturb_and_restore_formula(adaptive: bool, normalize: bool) -> None:
    params, grads = _lists()
    eta, rho = 0.01, 0.05
    original = [p.clone() for p in params]
    sumsq = ops.grad_sumsq(grads, params if adaptive else None, eta, backend="torch")
    backups = [torch.empty_like(p) for p in params]
    ops.perturb_(params, grads, backups, sumsq, rho, adaptive=adaptive, eta=eta, normalize=normalize, backend="torch")
    scale = rho / (sumsq.double().sqrt() + 1e-12) if normalize else rho
    for p, w, g, b in zip(params, original, grads, backups):
        t2 = _t(w, eta) ** 2 if adaptive else 1.0
        torch.testing.assert_close(p.double(), w.double() + scale * t2 * g.double(), rtol=1e-6, atol=1e-7)
        assert torch.equal(b, w)
    ops.restore_(params, backups, backend="torch")
    assert all(torch.equal(p, w) for p, w in zip(params, original))


@pytest.mark.parametrize("k", [1, 2, 5])
def test_perturb_batched_formula(k: int) -> None:
    params, grads = _lists(k)
    grads = [g.reshape(k, *p.shape) for p, g in zip(params, grads)]  # always [k, *p.shape], k=1 included
    sumsq = ops.grad_sumsq(grads, micro_batches=k, backend="torch")
    outs = ops.perturb_batched(params, grads, sumsq, 0.05, backend="torch")
    for p, g, out in zip(params, grads, outs):
        assert out.shape == g.shape and out.dtype == p.dtype
        for j in range(k):
            expected = p.double() + 0.05 / (sumsq[j].double().sqrt() + 1e-12) * g[j].double()
            torch.testing.assert_close(out[j].double(), expected, rtol=1e-6, atol=1e-7)


def test_fsam_direction_formula() -> None:
    params, grads = _lists()
    ema = [torch.zeros_like(g) for g in grads]
    s1 = ops.fsam_direction_([g.clone() for g in grads], ema, 1.0, 0.6, True, backend="torch")
    assert all(torch.equal(m, g) for m, g in zip(ema, grads))  # first step: m = g, d = g
    torch.testing.assert_close(s1, ops.grad_sumsq(grads, backend="torch"))
    m_prev = [m.clone() for m in ema]
    g2 = [torch.randn_like(g) for g in grads]
    d = [g.clone() for g in g2]
    s2 = ops.fsam_direction_(d, ema, 0.7, 0.6, False, params, 0.01, backend="torch")
    for di, mi, g, mp in zip(d, ema, g2, m_prev):
        torch.testing.assert_close(di, g - 0.7 * mp, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(mi, 0.6 * mp + 0.4 * g, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(s2, ops.grad_sumsq(d, params, 0.01, backend="torch"))


def test_zero_gradient_gives_zero_perturbation() -> None:
    params, grads = _lists()
    grads = [torch.zeros_like(g) for g in grads]
    original = [p.clone() for p in params]
    sumsq = ops.grad_sumsq(grads)
    ops.perturb_(params, grads, [torch.empty_like(p) for p in params], sumsq, 0.05)
    assert all(torch.equal(p, w) for p, w in zip(params, original))


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_gradient_gives_no_perturbation(bad: float) -> None:
    params, grads = _lists()
    grads[2][3] = bad
    original = [p.clone() for p in params]
    backups = [torch.empty_like(p) for p in params]
    sumsq = ops.grad_sumsq(grads)
    assert not torch.isfinite(sumsq).all()
    ops.perturb_(params, grads, backups, sumsq, 0.05)
    assert all(torch.equal(p, w) and torch.equal(b, w) for p, w, b in zip(params, original, backups))


def test_float64_runs_on_the_reference() -> None:
    params, grads = _lists(dtype=torch.float64)
    s = ops.grad_sumsq(grads)
    assert s.dtype == torch.float64  # fp64 in, fp64 arithmetic
    torch.testing.assert_close(s, sum((g * g).sum() for g in grads).reshape(1), rtol=1e-14, atol=0)
    assert sam_fused._backends.choose("auto", torch.device("cpu"), torch.float64) == "torch"


def test_backends_report() -> None:
    report = sam_fused.backends()
    assert tuple(report) == sam_fused._backends.NAMES  # every entry of the table, in its order
    assert report["torch"].available
    for name, status in report.items():
        assert isinstance(status.detail, str) and status.detail, name
    if not torch.cuda.is_available():
        assert not report["cuda"].available


def test_env_override_and_unknown_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sam_fused._backends, "_chosen", {})
    monkeypatch.setenv("SAM_FUSED_BACKEND", "torch")
    assert sam_fused._backends.choose("auto", torch.device("cpu"), torch.float32) == "torch"
    monkeypatch.setenv("SAM_FUSED_BACKEND", "bogus")
    with pytest.raises(ValueError, match="unknown sam_fused backend"):
        sam_fused._backends.choose("auto", torch.device("cpu"), torch.float32)
    with pytest.raises(RuntimeError, match="cannot run"):
        sam_fused._backends.choose("cuda", torch.device("cpu"), torch.float32)


def test_invalid_inputs_raise_clear_errors() -> None:
    params, grads = _lists()
    backups = [torch.empty_like(p) for p in params]
    s = ops.grad_sumsq(grads)
    with pytest.raises(ValueError, match="grads has 4 tensors but params has 5"):
        ops.perturb_(params, grads[:-1], backups, s, 0.05)
    with pytest.raises(ValueError, match=r"grads\[1\] has shape"):
        ops.perturb_(params, [grads[0], torch.zeros(2)] + grads[2:], backups, s, 0.05)
    with pytest.raises(ValueError, match=r"backups\[0\] has dtype"):
        ops.perturb_(params, grads, [backups[0].double()] + backups[1:], s, 0.05)
    with pytest.raises(ValueError, match=r"grads\[0\] is on meta"):
        ops.perturb_(params, [grads[0].to("meta")] + grads[1:], backups, s, 0.05)
    with pytest.raises(TypeError, match=r"grads\[3\] is a sparse"):
        ops.grad_sumsq(grads[:3] + [grads[3].to_sparse()], params[:4])
    with pytest.raises(TypeError, match=r"params\[0\] is complex"):
        ops.restore_([torch.zeros(2, dtype=torch.complex64)], [torch.zeros(2, dtype=torch.complex64)])
    with pytest.raises(TypeError, match="floating-point"):
        ops.grad_sumsq([torch.zeros(3, dtype=torch.int64)])
    for rho in (-1.0, float("inf"), 1e39, float("nan")):  # inf (or beyond fp32) would write inf weights
        with pytest.raises(ValueError, match="rho must be a finite number >= 0"):
            ops.perturb_(params, grads, backups, s, rho)
    with pytest.raises(ValueError, match="micro_batches"):
        ops.grad_sumsq(grads, micro_batches=0)
    with pytest.raises(ValueError, match="leading dim 2"):
        ops.grad_sumsq([torch.zeros(3, 4)], micro_batches=2)
    with pytest.raises(ValueError, match="lmbda"):
        ops.fsam_direction_(grads, [g.clone() for g in grads], 1.0, 1.5, False)


def test_non_contiguous_tensors() -> None:
    base = torch.randn(6, 8)
    p, g = base.t(), torch.randn(8, 6).t().contiguous().t()  # transposed views
    ref_p = p.contiguous().clone()
    backup = torch.empty_like(p)
    s = ops.grad_sumsq([g])
    torch.testing.assert_close(s, (g.double() ** 2).sum().reshape(1))
    ops.perturb_([p], [g], [backup], s, 0.05)
    torch.testing.assert_close(p, ref_p + (0.05 / (s.sqrt() + 1e-12)).float() * g)
    ops.restore_([p], [backup])
    assert torch.equal(p, ref_p)


def _opcheck_args(name: str) -> tuple:
    params, grads = _lists()
    params2, kgrads = _lists(k=2, seed=1)
    sumsq = ops.grad_sumsq(grads, backend="torch")
    return {
        "grad_sumsq": (grads, params, 0.01, 1),
        "perturb_": (params, grads, [torch.empty_like(p) for p in params], sumsq, 0.05, 1e-12, True, 0.01, True),
        "perturb_batched": (params2, kgrads, ops.grad_sumsq(kgrads, micro_batches=2), 0.05),
        "restore_": (params, [torch.randn_like(p) for p in params]),
        "fsam_direction_": (grads, [torch.randn_like(g) for g in grads], 1.0, 0.9, False, params, 0.01),
    }[name]


@pytest.mark.parametrize("name", OPS)
def test_opcheck(name: str) -> None:
    """torch.library.opcheck of torch.ops.sam_fused.<op> on CPU tensors: the compiled CPU kernel when it is built,
    else the reference (registered for CompositeExplicitAutograd)."""
    torch.library.opcheck(getattr(torch.ops.sam_fused, name), _opcheck_args(name))


def test_mixed_dtype_lists_are_grouped() -> None:
    """One list mixing fp32, bf16, fp64 and fp16 runs as one call per dtype (fp64 on the reference), and gives what
    the reference gives tensor by tensor."""
    gen = torch.Generator().manual_seed(4)
    dtypes = [torch.float32, torch.bfloat16, torch.float64, torch.float32, torch.float16]
    params = [torch.randn(3 + i, generator=gen).to(dt) for i, dt in enumerate(dtypes)]
    grads = [torch.randn(3 + i, generator=gen).to(dt) for i, dt in enumerate(dtypes)]
    sumsq = ops.grad_sumsq(grads)
    expected = sum(ops.grad_sumsq([g], backend="torch") for g in grads)
    torch.testing.assert_close(sumsq, expected, rtol=1e-6, atol=0)
    work, backups = [p.clone() for p in params], [torch.empty_like(p) for p in params]
    ops.perturb_(work, grads, backups, sumsq, 0.05)
    for p, g, w in zip(params, grads, work):
        ref = [p.clone()]
        ops.perturb_(ref, [g], [torch.empty_like(p)], sumsq, 0.05, backend="torch")
        torch.testing.assert_close(w, ref[0], rtol=0, atol=0 if p.dtype == torch.float64 else 1e-2)
    ops.restore_(work, backups)
    assert all(torch.equal(w, p) for w, p in zip(work, params))
