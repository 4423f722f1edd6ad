"""SAM / ASAM / unnormalized SAM / F-SAM / mSAM against hand-written formulas (docs/DESIGN.md sections 1, 2, 5)."""

from __future__ import annotations

import io

import pytest
import torch
from helpers import (
    CPU_BACKENDS,
    HandSGD,
    assert_weights_close,
    loss_grad,
    make_data,
    make_model,
    mse,
    perturbation,
    sam_step,
    weights,
)

import sam_fused
from sam_fused.optim import Range

STEPS = 4
LR, MOMENTUM = 0.1, 0.9

pytestmark = pytest.mark.parametrize("backend", CPU_BACKENDS)


def _is_weight(name: str) -> bool:
    return name.endswith("weight")


def _groups(model: torch.nn.Module, **per_kind: dict) -> list[dict]:
    """Two param groups: weights and biases, each with its own options."""
    named = list(model.named_parameters())
    return [
        {"params": [p for n, p in named if _is_weight(n)], **per_kind.get("weight", {})},
        {"params": [p for n, p in named if not _is_weight(n)], **per_kind.get("bias", {})},
    ]


VARIANTS = {
    # name: (SAM kwargs or groups-builder, hand formula kwargs)
    "sam": (dict(rho=0.05), dict(rho=0.05)),
    "asam_port": (dict(rho=0.5, adaptive=True), dict(rho=0.5, adaptive=True)),
    "unnormalized": (dict(rho=0.05, normalize=False), dict(rho=0.05, normalize=False)),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_sam_variants_match_formula(backend: str, variant: str) -> None:
    sam_kw, hand_kw = VARIANTS[variant]
    model, (x, y) = make_model(), make_data()
    w, hand = weights(model), HandSGD(LR, MOMENTUM)
    opt = sam_fused.SAM(model.parameters(), torch.optim.SGD, lr=LR, momentum=MOMENTUM, backend=backend, **sam_kw)
    for _ in range(STEPS):
        sam_step(model, opt, x, y)
        e = perturbation(w, loss_grad(model, w, x, y), **hand_kw)
        w = hand.step(w, loss_grad(model, {k: w[k] + e[k] for k in w}, x, y))
    assert_weights_close(model, w)


def test_asam_official_convention(backend: str) -> None:
    """Official ASAM: eta=0.01, T only on weights (biases T=1), one norm over both groups."""
    model, (x, y) = make_model(), make_data()
    w, hand = weights(model), HandSGD(LR, MOMENTUM)
    groups = _groups(model, weight=dict(adaptive=True, eta=0.01), bias=dict(adaptive=False))
    opt = sam_fused.SAM(groups, torch.optim.SGD, rho=0.5, lr=LR, momentum=MOMENTUM, backend=backend)
    adaptive = {n: _is_weight(n) for n in w}
    for _ in range(STEPS):
        sam_step(model, opt, x, y)
        e = perturbation(w, loss_grad(model, w, x, y), 0.5, adaptive, eta=0.01)
        w = hand.step(w, loss_grad(model, {k: w[k] + e[k] for k in w}, x, y))
    assert_weights_close(model, w)


def test_param_groups_with_different_rho(backend: str) -> None:
    model, (x, y) = make_model(), make_data()
    w, hand = weights(model), HandSGD(LR)
    opt = sam_fused.SAM(_groups(model, weight=dict(rho=0.05), bias=dict(rho=0.3)), torch.optim.SGD, lr=LR,
                        backend=backend)
    for _ in range(STEPS):
        sam_step(model, opt, x, y)
        g = loss_grad(model, w, x, y)
        e1, e2 = perturbation(w, g, 0.05), perturbation(w, g, 0.3)  # same global norm, rho per group
        e = {k: e1[k] if _is_weight(k) else e2[k] for k in w}
        w = hand.step(w, loss_grad(model, {k: w[k] + e[k] for k in w}, x, y))
    assert_weights_close(model, w)


def test_lr_scheduler_on_sam_object(backend: str) -> None:
    model, (x, y) = make_model(), make_data()
    w = weights(model)
    opt = sam_fused.SAM(model.parameters(), torch.optim.SGD, lr=LR, backend=backend)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for step in range(STEPS):
        sam_step(model, opt, x, y)
        sched.step()
        e = perturbation(w, loss_grad(model, w, x, y), 0.05)
        w = HandSGD(LR * 0.5**step).step(w, loss_grad(model, {k: w[k] + e[k] for k in w}, x, y))
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(LR * 0.5**STEPS)
    assert_weights_close(model, w)


def _fsam_hand(model, x, y, steps, rho, sigma, lmbda):
    w, hand, m = weights(model), HandSGD(LR, MOMENTUM), None
    for _ in range(steps):
        g = loss_grad(model, w, x, y)
        if m is None:
            m, d = dict(g), g
        else:
            d = {k: g[k] - sigma * m[k] for k in g}
            m = {k: lmbda * m[k] + (1 - lmbda) * g[k] for k in g}
        e = perturbation(w, d, rho)
        w = hand.step(w, loss_grad(model, {k: w[k] + e[k] for k in w}, x, y))
    return w


def test_friendly_sam_matches_formula(backend: str) -> None:
    model, (x, y) = make_model(), make_data()
    expected = _fsam_hand(model, x, y, STEPS, rho=0.2, sigma=1.0, lmbda=0.6)
    opt = sam_fused.FriendlySAM(model.parameters(), torch.optim.SGD, rho=0.2, sigma=1.0, lmbda=0.6, lr=LR,
                                momentum=MOMENTUM, backend=backend)
    for _ in range(STEPS):
        sam_step(model, opt, x, y)
    assert_weights_close(model, expected)


@pytest.mark.parametrize("steps,sigma", [(1, 1.0), (STEPS, 0.0)])
def test_friendly_sam_reduces_to_sam(backend: str, steps: int, sigma: float) -> None:
    """F-SAM's first step is SAM's; with sigma=0 every step is SAM's (bit-identical on the same backend)."""
    models = make_model(), make_model()
    x, y = make_data()
    fsam = sam_fused.FriendlySAM(models[0].parameters(), torch.optim.SGD, sigma=sigma, lr=LR, backend=backend)
    sam = sam_fused.SAM(models[1].parameters(), torch.optim.SGD, lr=LR, backend=backend)
    for _ in range(steps):
        sam_step(models[0], fsam, x, y)
        sam_step(models[1], sam, x, y)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)


def _msam_hand(model, x, y, k, rho, steps):
    w, hand = weights(model), HandSGD(LR, MOMENTUM)
    xs, ys = x.chunk(k), y.chunk(k)
    for _ in range(steps):
        total = None
        for xj, yj in zip(xs, ys):
            e = perturbation(w, loss_grad(model, w, xj, yj), rho)
            gj = loss_grad(model, {n: w[n] + e[n] for n in w}, xj, yj)
            total = gj if total is None else {n: total[n] + gj[n] for n in w}
        w = hand.step(w, {n: total[n] / k for n in w})
    return w


@pytest.mark.parametrize("k", [1, 2, 4])
def test_msam_matches_formula(backend: str, k: int) -> None:
    model, (x, y) = make_model(), make_data()
    expected = _msam_hand(model, x, y, k, 0.05, STEPS)
    opt = sam_fused.SAM(model.parameters(), torch.optim.SGD, lr=LR, momentum=MOMENTUM, backend=backend)
    for _ in range(STEPS):
        loss = opt.msam_step(model, mse, x, y, micro_batches=k)
    assert loss.shape == () and torch.isfinite(loss)
    assert_weights_close(model, expected)


def test_msam_k1_is_sam_and_rho0_is_sgd(backend: str) -> None:
    x, y = make_data()
    m_msam, m_sam, m_sgd, m_msgd = (make_model() for _ in range(4))
    o_msam = sam_fused.SAM(m_msam.parameters(), torch.optim.SGD, lr=LR, backend=backend)
    o_sam = sam_fused.SAM(m_sam.parameters(), torch.optim.SGD, lr=LR, backend=backend)
    o_msgd = sam_fused.SAM(m_msgd.parameters(), torch.optim.SGD, rho=0.0, lr=LR, backend=backend)
    o_sgd = torch.optim.SGD(m_sgd.parameters(), lr=LR)
    for _ in range(STEPS):
        o_msam.msam_step(m_msam, mse, x, y, micro_batches=1)
        sam_step(m_sam, o_sam, x, y)
        o_msgd.msam_step(m_msgd, mse, x, y, micro_batches=4)
        o_sgd.zero_grad()
        mse(m_sgd(x), y).backward()
        o_sgd.step()
    for a, b in zip(m_msam.parameters(), m_sam.parameters()):
        assert torch.equal(a, b)
    assert_weights_close(m_msgd, weights(m_sgd))


def test_msam_takes_tuples_and_rejects_bad_splits(backend: str) -> None:
    model, (x, y) = make_model(), make_data()
    opt = sam_fused.SAM(model.parameters(), torch.optim.SGD, lr=LR, backend=backend)
    opt.msam_step(model, mse, (x,), (y,), micro_batches=2)
    with pytest.raises(ValueError, match="does not divide"):
        opt.msam_step(model, mse, x, y, micro_batches=3)
    with pytest.raises(ValueError, match="micro_batches"):
        opt.msam_step(model, mse, x, y, micro_batches=0)
    with pytest.raises(ValueError, match="batch size"):
        opt.msam_step(model, mse, x, y[:8], micro_batches=2)
    assert not opt.is_perturbed


def _train(model, opt, x, y, steps):
    for _ in range(steps):
        sam_step(model, opt, x, y)


@pytest.mark.parametrize("kind", ["sgd_momentum", "adamw", "fsam"])
def test_state_dict_round_trip_continues_identically(backend: str, kind: str) -> None:
    def build(model):
        if kind == "adamw":
            return sam_fused.SAM(model.parameters(), torch.optim.AdamW, lr=1e-2, backend=backend)
        cls = sam_fused.FriendlySAM if kind == "fsam" else sam_fused.SAM
        return cls(model.parameters(), torch.optim.SGD, lr=LR, momentum=MOMENTUM, backend=backend)

    x, y = make_data()
    model = make_model()
    opt = build(model)
    _train(model, opt, x, y, 2)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    _train(model, opt, x, y, 3)

    buf.seek(0)
    ckpt = torch.load(buf)
    resumed = make_model(seed=123)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(ckpt["model"])
    opt2 = build(resumed)
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.param_groups is opt2.base_optimizer.param_groups
    _train(resumed, opt2, x, y, 3)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_state_dict_refused_while_perturbed(backend: str) -> None:
    model, (x, y) = make_model(), make_data()
    opt = sam_fused.SAM(model.parameters(), torch.optim.SGD, lr=LR, backend=backend)
    mse(model(x), y).backward()
    opt.first_step()
    with pytest.raises(RuntimeError, match="perturbed"):
        opt.state_dict()
    opt.restore()
    assert "base_optimizer" in opt.state_dict()


def test_grad_scaler_matches_unscaled(backend: str) -> None:
    x, y = make_data()
    m1, m2 = make_model(), make_model()
    o1 = sam_fused.SAM(m1.parameters(), torch.optim.SGD, lr=LR, backend=backend)
    o2 = sam_fused.SAM(m2.parameters(), torch.optim.SGD, lr=LR, backend=backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for _ in range(STEPS):
        sam_step(m1, o1, x, y)
        scaler.scale(mse(m2(x), y)).backward()
        o2.first_step(zero_grad=True, grad_scaler=scaler)
        scaler.scale(mse(m2(x), y)).backward()
        o2.second_step(zero_grad=True, grad_scaler=scaler)
        scaler.update()
    assert_weights_close(m2, weights(m1))


def test_grad_scaler_skips_on_inf(backend: str) -> None:
    model, (x, y) = make_model(), make_data()
    w0 = weights(model)
    opt = sam_fused.SAM(model.parameters(), torch.optim.SGD, lr=LR, backend=backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    first = next(model.parameters())

    scaler.scale(mse(model(x), y)).backward()
    first.grad[0, 0] = float("inf")
    norm = opt.first_step(zero_grad=True, grad_scaler=scaler)
    assert not torch.isfinite(norm)
    assert_weights_close(model, w0, rtol=0, atol=0)  # no perturbation on a non-finite gradient

    scaler.scale(mse(model(x), y)).backward()
    first.grad[0, 0] = float("inf")
    opt.second_step(zero_grad=True, grad_scaler=scaler)
    scaler.update()
    assert_weights_close(model, w0, rtol=0, atol=0)  # restored, and the base step skipped
    assert not opt.is_perturbed
    assert scaler.get_scale() < 1024.0


def test_raising_closure_restores_weights(backend: str) -> None:
    model, (x, y) = make_model(), make_data()
    w0 = weights(model)
    opt = sam_fused.SAM(model.parameters(), torch.optim.SGD, lr=LR, backend=backend)
    mse(model(x), y).backward()

    def closure():
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        opt.step(closure)
    assert not opt.is_perturbed
    assert_weights_close(model, w0, rtol=0, atol=0)


def test_step_with_closure_equals_two_steps(backend: str) -> None:
    x, y = make_data()
    m1, m2 = make_model(), make_model()
    o1 = sam_fused.SAM(m1.parameters(), torch.optim.SGD, lr=LR, backend=backend)
    o2 = sam_fused.SAM(m2.parameters(), torch.optim.SGD, lr=LR, backend=backend)
    for _ in range(STEPS):
        sam_step(m1, o1, x, y)
        mse(m2(x), y).backward()
        loss = o2.step(lambda: mse(m2(x), y).backward() or torch.tensor(0.0))
        o2.zero_grad()
        assert loss is not None
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_restore_and_is_perturbed(backend: str) -> None:
    model, (x, y) = make_model(), make_data()
    w0 = weights(model)
    opt = sam_fused.SAM(model.parameters(), torch.optim.SGD, lr=LR, backend=backend)
    mse(model(x), y).backward()
    assert not opt.is_perturbed
    opt.first_step()
    assert opt.is_perturbed
    assert any(not torch.equal(p, w0[n]) for n, p in model.named_parameters())
    with pytest.raises(RuntimeError, match="already perturbed"):
        opt.first_step()
    opt.restore()
    assert not opt.is_perturbed
    assert_weights_close(model, w0, rtol=0, atol=0)


def test_params_without_grad_are_skipped(backend: str) -> None:
    model, (x, y) = make_model(), make_data()
    unused = torch.nn.Parameter(torch.randn(4))
    opt = sam_fused.SAM([*model.parameters(), unused], torch.optim.SGD, lr=LR, backend=backend)
    before = unused.detach().clone()
    w, hand = weights(model), HandSGD(LR)
    sam_step(model, opt, x, y)
    assert torch.equal(unused, before)
    e = perturbation(w, loss_grad(model, w, x, y), 0.05)  # the norm covers only params with gradients
    assert_weights_close(model, hand.step(w, loss_grad(model, {k: w[k] + e[k] for k in w}, x, y)))


def test_gradient_accumulation(backend: str) -> None:
    """Grads accumulated over several backward calls are used as one gradient (both passes)."""
    x, y = make_data()
    m1, m2 = make_model(), make_model()
    o1 = sam_fused.SAM(m1.parameters(), torch.optim.SGD, lr=LR, backend=backend)
    o2 = sam_fused.SAM(m2.parameters(), torch.optim.SGD, lr=LR, backend=backend)
    sam_step(m1, o1, x, y)
    for _ in range(2):  # two half batches, each loss / 2
        for xh, yh in zip(x.chunk(2), y.chunk(2)):
            (mse(m2(xh), yh) / 2).backward()
        if _ == 0:
            o2.first_step(zero_grad=True)
    o2.second_step(zero_grad=True)
    assert_weights_close(m2, weights(m1))


def test_base_optimizer_instance(backend: str) -> None:
    x, y = make_data()
    m1, m2 = make_model(), make_model()
    o1 = sam_fused.SAM(m1.parameters(), torch.optim.SGD, rho=0.1, lr=LR, momentum=MOMENTUM, backend=backend)
    base = torch.optim.SGD(m2.parameters(), lr=LR, momentum=MOMENTUM)
    o2 = sam_fused.SAM(m2.parameters(), base, rho=0.1, backend=backend)
    assert o2.base_optimizer is base and o2.param_groups is base.param_groups
    _train(m1, o1, x, y, STEPS)
    _train(m2, o2, x, y, STEPS)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="same parameters"):
        sam_fused.SAM(make_model().parameters(), base, backend=backend)


def test_batchnorm_running_stats_untouched_in_perturbed_pass(backend: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.BatchNorm1d(6), torch.nn.Linear(6, 3))
    x, y = make_data()
    bn = model[1]
    model(x)
    state = {k: v.clone() for k, v in bn.state_dict().items()}
    h = model[0](x * 3).detach()
    with sam_fused.running_stats_disabled(model):
        out = bn(h)
    for k, v in bn.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert bn.track_running_stats
    batch_stats = torch.nn.functional.batch_norm(h, None, None, bn.weight, bn.bias, training=True)
    torch.testing.assert_close(out, batch_stats)  # still normalizes with the batch's own statistics
    sam_fused.disable_running_stats(model)
    sam_fused.enable_running_stats(model)
    model(x)
    assert bn.num_batches_tracked.item() == state["num_batches_tracked"].item() + 1
    opt = sam_fused.SAM(model.parameters(), torch.optim.SGD, lr=LR, backend=backend)
    before = bn.running_mean.clone()
    opt.msam_step(model, mse, x, y, micro_batches=2)
    assert bn.num_batches_tracked.item() == state["num_batches_tracked"].item() + 3  # only the 2 clean passes count
    assert not torch.equal(bn.running_mean, before)


def test_invalid_hyperparameters(backend: str) -> None:
    params = list(make_model().parameters())
    with pytest.raises(ValueError, match="rho"):
        sam_fused.SAM(params, torch.optim.SGD, rho=-0.1, lr=LR, backend=backend)
    with pytest.raises(ValueError, match="eta"):
        sam_fused.SAM(params, torch.optim.SGD, adaptive=True, eta=-1.0, lr=LR, backend=backend)
    for lmbda in (-0.1, 1.5):
        with pytest.raises(ValueError, match="lmbda"):
            sam_fused.FriendlySAM(params, torch.optim.SGD, lmbda=lmbda, lr=LR, backend=backend)
    with pytest.raises(TypeError, match="base_optimizer"):
        sam_fused.SAM(params, "sgd", lr=LR)
    opt = sam_fused.SAM(params, torch.optim.SGD, lr=LR, backend=backend)
    with pytest.raises(ValueError, match="closure"):
        opt.step()
    with pytest.raises(ValueError, match="rho"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "rho": -1.0})


def test_sparse_and_complex_gradients_rejected(backend: str) -> None:
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = sam_fused.SAM(emb.parameters(), torch.optim.SGD, lr=LR, backend=backend)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[0\].*sparse"):
        opt.first_step()
    z = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))
    opt = sam_fused.SAM([z], torch.optim.SGD, lr=LR, backend=backend)
    z.grad = torch.randn(3, dtype=torch.complex64)
    with pytest.raises(TypeError, match="complex"):
        opt.first_step()
    assert not opt.is_perturbed


def test_failed_first_step_leaves_no_weight_perturbed(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure after the first param group was perturbed (here: the second perturb_ call raises) restores it."""
    model, (x, y) = make_model(), make_data()
    opt = sam_fused.SAM(_groups(model), torch.optim.SGD, lr=LR, backend=backend)
    mse(model(x), y).backward()
    before = {k: v.clone() for k, v in weights(model).items()}
    real, calls = sam_fused.optim.ops.perturb_, []

    def failing_second_call(*args: object, **kwargs: object) -> None:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected failure")
        real(*args, **kwargs)

    monkeypatch.setattr(sam_fused.optim.ops, "perturb_", failing_second_call)
    with pytest.raises(RuntimeError, match="injected failure"):
        opt.first_step()
    assert len(calls) == 2 and not opt.is_perturbed
    for k, v in weights(model).items():
        assert torch.equal(v, before[k]), k


def test_unknown_backend_rejected(backend: str) -> None:
    model, (x, y) = make_model(), make_data()
    opt = sam_fused.SAM(model.parameters(), torch.optim.SGD, lr=LR, backend="nope")
    mse(model(x), y).backward()
    with pytest.raises(ValueError, match="unknown sam_fused backend"):
        opt.first_step()
    assert not opt.is_perturbed


def test_compile_fullgraph_first_step_and_restore(backend: str) -> None:
    """first_step() and restore() compile with fullgraph=True and match eager."""
    x, y = make_data()
    m1, m2 = make_model(), make_model()
    o1 = sam_fused.SAM(m1.parameters(), torch.optim.SGD, lr=LR, backend=backend)
    o2 = sam_fused.SAM(m2.parameters(), torch.optim.SGD, lr=LR, backend=backend)
    torch._dynamo.reset()
    perturb = torch.compile(lambda: o2.first_step(), fullgraph=True)
    restore = torch.compile(lambda: o2.restore(), fullgraph=True)
    for m, o, first, rest in ((m1, o1, o1.first_step, o1.restore), (m2, o2, perturb, restore)):
        mse(m(x), y).backward()
        first()
        perturbed = weights(m)
        rest()
        o.zero_grad()
        m.perturbed = perturbed
    for k in m1.perturbed:
        torch.testing.assert_close(m1.perturbed[k], m2.perturbed[k], rtol=1e-6, atol=1e-7)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_compile_second_step_breaks_only_in_torch_optim(backend: str) -> None:
    """Documents what stops fullgraph for second_step: torch.optim's own step() inserts a graph break (its
    `_use_grad` wrapper calls torch._dynamo.graph_break()), and Optimizer.zero_grad is on Dynamo's skip list.
    The fused SGD second step (restore_sgd_) does not call it and compiles fullgraph. Without fullgraph the step
    compiles and matches eager either way."""
    x, y = make_data()
    model = make_model()
    opt = sam_fused.SAM(model.parameters(), torch.optim.SGD, lr=LR, backend=backend)
    torch._dynamo.reset()
    mse(model(x), y).backward()
    opt.first_step(zero_grad=True)
    mse(model(x), y).backward()
    torch.compile(lambda: opt.second_step(), fullgraph=True)()  # fused: restore_sgd_, no torch.optim step
    assert not opt.is_perturbed
    opt.zero_grad()
    opt.fused_second_step = False
    mse(model(x), y).backward()
    opt.first_step(zero_grad=True)
    mse(model(x), y).backward()
    with pytest.raises(torch._dynamo.exc.Unsupported, match="graph_break"):
        torch.compile(lambda: opt.second_step(), fullgraph=True)()
    assert opt.is_perturbed  # tracing failed before anything ran; the weights are as first_step left them
    opt.restore()

    m1, m2 = make_model(), make_model()
    o1 = sam_fused.SAM(m1.parameters(), torch.optim.SGD, lr=LR, backend=backend)
    o2 = sam_fused.SAM(m2.parameters(), torch.optim.SGD, lr=LR, backend=backend)
    second = torch.compile(lambda: o2.second_step(zero_grad=True))
    for _ in range(2):
        sam_step(m1, o1, x, y)
        mse(m2(x), y).backward()
        o2.first_step(zero_grad=True)
        mse(m2(x), y).backward()
        second()
    assert_weights_close(m2, weights(m1))


class PortSAM(torch.optim.Optimizer):
    """The common per-parameter-loop SAM port's behaviour, written from its description (plain SAM only): weight copies
    in state["old_p"], a base optimizer built over the shared param groups, torch.optim's state_dict."""

    def __init__(self, params, base_optimizer, rho: float = 0.05, adaptive: bool = False, **kwargs) -> None:
        super().__init__(params, dict(rho=rho, adaptive=adaptive, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        with_grad = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.norm(torch.stack([p.grad.norm(p=2) for p in with_grad]), p=2)
        for group in self.param_groups:
            scale = group["rho"] / (norm + 1e-12)
            for p in group["params"]:
                if p.grad is not None:
                    self.state[p]["old_p"] = p.data.clone()
                    p.add_(p.grad * scale.to(p))
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.data = self.state[p]["old_p"]
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.base_optimizer.param_groups = self.param_groups


def _checkpoint(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    return torch.load(buf)


def _resume(ckpt: dict) -> torch.nn.Module:
    model = make_model(seed=123)
    model.load_state_dict(ckpt["model"])
    return model


def test_loads_a_checkpoint_of_the_port(backend: str) -> None:
    """Switching mid-training from the port: its checkpoint (param groups + stale old_p copies, no base optimizer state)
    loads with a warning; training then goes on exactly as the port resumed from the same checkpoint would."""
    x, y = make_data()
    model = make_model()
    port = PortSAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=LR, momentum=MOMENTUM)
    _train(model, port, x, y, 3)
    port.param_groups[0]["lr"] = 0.03  # as an LR scheduler would have set it
    ckpt = _checkpoint(model, port)
    assert all(set(s) == {"old_p"} for s in ckpt["opt"]["state"].values())

    ours_model = _resume(ckpt)
    ours = sam_fused.SAM(ours_model.parameters(), torch.optim.SGD, rho=0.5, lr=LR, momentum=MOMENTUM,
                         backend=backend)
    _train(ours_model, ours, x, y, 1)  # some state of its own, which the load must replace
    ours_model.load_state_dict(ckpt["model"])
    with pytest.warns(UserWarning, match="SGD's state .* starts empty"):
        ours.load_state_dict(ckpt["opt"])
    group = ours.param_groups[0]
    assert group["lr"] == 0.03 and group["rho"] == 0.05 and group["eta"] == 0.0 and group["normalize"] is True
    assert ours.param_groups is ours.base_optimizer.param_groups
    assert not ours.base_optimizer.state and not any(ours.state.values())  # old_p dropped, momentum starts anew

    port_model = _resume(ckpt)
    port2 = PortSAM(port_model.parameters(), torch.optim.SGD, rho=0.05, lr=LR, momentum=MOMENTUM)
    port2.load_state_dict(ckpt["opt"])
    _train(ours_model, ours, x, y, 3)
    _train(port_model, port2, x, y, 3)
    assert_weights_close(ours_model, weights(port_model))


def test_the_port_loads_our_checkpoint(backend: str) -> None:
    x, y = make_data()
    model = make_model()
    opt = sam_fused.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=LR, momentum=MOMENTUM, backend=backend)
    _train(model, opt, x, y, 2)
    opt.param_groups[0]["lr"] = 0.03
    ckpt = _checkpoint(model, opt)
    port_model = _resume(ckpt)
    port = PortSAM(port_model.parameters(), torch.optim.SGD, rho=0.05, lr=LR, momentum=MOMENTUM)
    port.load_state_dict(ckpt["opt"])
    assert port.param_groups[0]["lr"] == 0.03 and port.base_optimizer.param_groups[0]["lr"] == 0.03
    _train(port_model, port, x, y, 1)


def test_refuses_a_state_dict_it_cannot_place(backend: str) -> None:
    """A base optimizer's own state_dict (momentum buffers, no 'base_optimizer' entry) is neither format: refused."""
    x, y = make_data()
    model = make_model()
    opt = sam_fused.SAM(model.parameters(), torch.optim.SGD, lr=LR, momentum=MOMENTUM, backend=backend)
    _train(model, opt, x, y, 2)
    before = opt.state_dict()
    with pytest.raises(ValueError, match="momentum_buffer.*base_optimizer.load_state_dict"):
        opt.load_state_dict(opt.base_optimizer.state_dict())
    assert opt.base_optimizer.state and torch.equal(  # nothing was lost
        opt.state_dict()["base_optimizer"]["state"][0]["momentum_buffer"],
        before["base_optimizer"]["state"][0]["momentum_buffer"])


def test_first_step_returns_a_0dim_norm(backend: str) -> None:
    model, (x, y) = make_model(), make_data()
    opt = sam_fused.SAM(model.parameters(), torch.optim.SGD, lr=LR, backend=backend)
    assert opt.first_step() is None  # no gradient anywhere: nothing to perturb
    mse(model(x), y).backward()
    expected = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters()))
    norm = opt.first_step()
    assert norm.shape == () and norm.dtype == torch.float64
    assert f"{norm:.4f}" == f"{expected.item():.4f}"  # formats like clip_grad_norm_'s result
    torch.testing.assert_close(norm.double(), expected, rtol=1e-6, atol=0)
    opt.restore()


# ---- never silently wrong: bad input raises, and leaves nothing changed ----------------------------------------------


def _snapshot(params) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def _unchanged(params, before) -> bool:
    return all(torch.equal(p.detach(), b) for p, b in zip(params, before))


def test_failing_first_step_leaves_every_weight_as_it_was(backend: str) -> None:
    """The fp32 bucket is valid, the bf16 one is not (an fp32 gradient): the call raises after the fp32 bucket ran;
    the op layer puts it back, so no weight stays perturbed while is_perturbed says False."""
    good = torch.nn.Parameter(torch.randn(5))
    half = torch.nn.Parameter(torch.randn(3).bfloat16())
    half.grad_dtype = None  # torch allows a gradient of another dtype only when asked to
    good.grad, half.grad = torch.randn(5), torch.randn(3)  # half's gradient has the wrong dtype
    opt = sam_fused.SAM([good, half], torch.optim.SGD, lr=LR, backend=backend)
    before = _snapshot([good, half])
    with pytest.raises(ValueError, match="dtype"):
        opt.first_step()
    assert not opt.is_perturbed and _unchanged([good, half], before)


def test_expanded_parameter_is_refused_before_anything_is_written(backend: str) -> None:
    good = torch.nn.Parameter(torch.randn(5))
    expanded = torch.nn.Parameter(torch.randn(1).expand(4))
    good.grad, expanded.grad = torch.randn(5), torch.randn(4)
    opt = sam_fused.SAM([good, expanded], torch.optim.SGD, lr=LR, backend=backend)
    before = _snapshot([good, expanded])
    with pytest.raises(ValueError, match=r"params\[1\] has elements that share memory|overlap"):
        opt.first_step()
    assert not opt.is_perturbed and _unchanged([good, expanded], before)


def test_parameter_listed_twice_is_refused(backend: str) -> None:
    model = make_model()
    params = list(model.parameters())
    with pytest.warns(UserWarning, match="duplicate"), pytest.raises(ValueError, match="listed twice"):
        sam_fused.SAM(params + params[-1:], torch.optim.SGD, lr=LR, backend=backend)
    opt = sam_fused.SAM(params[:2], torch.optim.SGD, lr=LR, backend=backend)
    with pytest.raises(ValueError, match="more than one parameter group"):  # torch's own check, across groups
        opt.add_param_group({"params": params[1:]})
    assert len(opt.param_groups) == 1


def test_overlapping_parameters_are_refused(backend: str) -> None:
    buffer = torch.randn(10)
    a, b = torch.nn.Parameter(buffer[:6]), torch.nn.Parameter(buffer[4:])
    with pytest.raises(ValueError, match="overlaps the memory"):
        sam_fused.SAM([a, b], torch.optim.SGD, lr=LR, backend=backend)
    disjoint = [torch.nn.Parameter(buffer[:5]), torch.nn.Parameter(buffer[5:])]  # views of one buffer, apart: fine
    sam_fused.SAM(disjoint, torch.optim.SGD, lr=LR, backend=backend)


@pytest.mark.parametrize("key, value", [("rho", float("inf")), ("rho", 1e39), ("rho", -1.0), ("rho", float("nan")),
                                        ("eta", -1.0), ("eta", float("inf")), ("sigma", float("nan")),
                                        ("sigma", float("inf")), ("lmbda", 1.5)])
def test_bad_hyperparameter_is_refused_everywhere(backend: str, key: str, value: float) -> None:
    """At construction, in add_param_group (nothing added), edited into param_groups (the next step raises, nothing
    perturbed), and in a state_dict being loaded (nothing loaded)."""
    x, y = make_data()
    model = make_model()
    params = list(model.parameters())
    match = rf"{key} must be"
    with pytest.raises(ValueError, match=match):
        sam_fused.FriendlySAM(params, torch.optim.SGD, lr=LR, backend=backend, **{key: value})

    opt = sam_fused.FriendlySAM(params[:2], torch.optim.SGD, lr=LR, backend=backend)
    with pytest.raises(ValueError, match=rf"param_groups\[1\]: {match}"):
        opt.add_param_group({"params": params[2:], key: value})
    assert len(opt.param_groups) == 1 and opt.param_groups is opt.base_optimizer.param_groups

    opt = sam_fused.FriendlySAM(params, torch.optim.SGD, lr=LR, momentum=MOMENTUM, backend=backend)
    _train(model, opt, x, y, 1)
    good_state = opt.state_dict()
    bad_state = opt.state_dict()
    bad_state["param_groups"][0][key] = value
    before = _snapshot(params)
    with pytest.raises(ValueError, match=rf"state_dict's param_groups\[0\]: {match}"):
        opt.load_state_dict(bad_state)
    assert opt.param_groups[0][key] == good_state["param_groups"][0][key]

    opt.param_groups[0][key] = value
    mse(model(x), y).backward()
    with pytest.raises(ValueError, match=rf"param_groups\[0\]: {match}"):
        opt.first_step()
    assert not opt.is_perturbed and _unchanged(params, before)


def test_sam_checkpoint_loads_into_friendly_sam(backend: str) -> None:
    """Missing F-SAM keys keep the FriendlySAM's own values (it used to raise a bare KeyError('sigma') next step)."""
    x, y = make_data()
    model = make_model()
    sam = sam_fused.SAM(model.parameters(), torch.optim.SGD, lr=LR, momentum=MOMENTUM, backend=backend)
    _train(model, sam, x, y, 1)
    fsam = sam_fused.FriendlySAM(model.parameters(), torch.optim.SGD, sigma=0.5, lmbda=0.6, lr=LR, backend=backend)
    fsam.load_state_dict(sam.state_dict())
    assert fsam.param_groups[0]["sigma"] == 0.5 and fsam.param_groups[0]["momentum"] == MOMENTUM
    _train(model, fsam, x, y, 1)


class _DampedSAM(sam_fused.SAM):
    """A variant with one extra hyperparameter, declared as a new variant would declare it."""

    HYPERPARAMETERS = {"damping": Range(0.0, 1.0, "a number in [0, 1]")}

    def __init__(self, params, base_optimizer, damping: float = 0.5, **kwargs) -> None:
        super().__init__(params, base_optimizer, damping=damping, **kwargs)


def test_a_variant_declares_its_hyperparameters_in_one_place(backend: str) -> None:
    """The declaration alone makes `damping` a per-group hyperparameter of the variant: kept from the base
    optimizer's keyword arguments, checked at construction and each step, copied into an adopted base optimizer."""
    model = make_model()
    params = list(model.parameters())
    assert list(_DampedSAM.hyperparameters()) == ["rho", "adaptive", "eta", "normalize", "damping"]
    assert "damping" not in sam_fused.SAM.hyperparameters()
    with pytest.raises(ValueError, match=r"param_groups\[0\]: damping must be a number in \[0, 1\], got 2"):
        _DampedSAM(params, torch.optim.SGD, damping=2, lr=LR, backend=backend)
    opt = _DampedSAM(params, torch.optim.SGD, lr=LR, backend=backend)  # SGD would refuse a `damping` argument
    assert opt.param_groups[0]["damping"] == 0.5
    opt.param_groups[0]["damping"] = -1.0
    with pytest.raises(ValueError, match=r"param_groups\[0\]: damping must be"):
        opt.msam_step(model, mse, *make_data(), micro_batches=2)
    adopted = _DampedSAM(params, torch.optim.SGD(params, lr=LR), damping=0.25, backend=backend)
    assert adopted.base_optimizer.param_groups[0]["damping"] == 0.25


def test_msam_refuses_an_empty_batch_and_an_active_perturbation(backend: str) -> None:
    x, y = make_data()
    model = make_model()
    opt = sam_fused.SAM(model.parameters(), torch.optim.SGD, lr=LR, backend=backend)
    before = _snapshot(model.parameters())
    for method in ("fast", "sequential"):
        with pytest.raises(ValueError, match="batch is empty"):
            opt.msam_step(model, mse, x[:0], y[:0], micro_batches=2, method=method)
    mse(model(x), y).backward()
    opt.first_step(zero_grad=True)
    for method in ("auto", "fast", "sequential"):
        with pytest.raises(RuntimeError, match="perturbed"):
            opt.msam_step(model, mse, x, y, micro_batches=2, method=method)
    assert opt.is_perturbed
    opt.restore()
    assert _unchanged(model.parameters(), before)


# ---- fp64 in, fp64 arithmetic ---------------------------------------------------------------------------------------


def test_fp64_weights_are_not_rounded_to_fp32(backend: str) -> None:
    w0 = torch.tensor([1.0 + 1e-10, 0.1, -3.3], dtype=torch.float64)
    g = torch.tensor([1e-3, -2e-3, 5e-4], dtype=torch.float64)
    for rho in (0.0, 1e-9):
        p = torch.nn.Parameter(w0.clone())
        p.grad = g.clone()
        opt = sam_fused.SAM([p], torch.optim.SGD, rho=rho, lr=LR, backend=backend)
        norm = opt.first_step()
        assert norm.dtype == torch.float64
        expected = w0 + rho * g / (g.norm() + 1e-12)  # fp64 throughout: rho=0 leaves w exactly, 1e-9 moves it right
        torch.testing.assert_close(p.detach(), expected, rtol=1e-15, atol=0)
        assert torch.equal(torch.sign(p.detach() - w0), torch.sign(rho * g))
        opt.restore()
        assert torch.equal(p.detach(), w0)


def test_fp64_friendly_sam_ema_is_fp64(backend: str) -> None:
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    g1 = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    g2 = torch.tensor([0.3, -0.1, 1.0 / 3.0], dtype=torch.float64)
    opt = sam_fused.FriendlySAM([p], torch.optim.SGD, rho=0.0, sigma=0.5, lmbda=0.9, lr=LR, backend=backend)
    for g in (g1, g2):
        p.grad = g.clone()
        opt.first_step()
        opt.restore()
    ema = opt.state[p]["fsam_ema"]
    assert torch.equal(ema, g1 * 0.9 + g2 * (1 - 0.9))  # the reference's order, in fp64
    assert torch.equal(p.grad, g2 - g1 * 0.5)


def _scaled_step(model, opt, scaler, x, y, poison: bool = False) -> torch.Tensor:
    first = next(model.parameters())
    scaler.scale(mse(model(x), y)).backward()
    if poison:
        first.grad[0, 0] = float("inf")  # a GradScaler overflow
    norm = opt.first_step(zero_grad=True, grad_scaler=scaler)
    scaler.scale(mse(model(x), y)).backward()
    if poison:
        first.grad[0, 0] = float("inf")
    opt.second_step(zero_grad=True, grad_scaler=scaler)
    scaler.update()
    return norm


def test_fsam_overflow_step_advances_nothing(backend: str) -> None:
    """A skipped (overflow) step must leave F-SAM's EMA as it was: it used to write inf into it, after which F-SAM never
    perturbed again. The run with the overflow matches a run without that step, bit for bit."""
    x, y = make_data()
    runs = []
    for poison_at, steps in ((1, 5), (None, 4)):  # the same 4 good steps, with and without an overflow after the 1st
        model = make_model()
        opt = sam_fused.FriendlySAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=LR, backend=backend)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)  # halved by the overflow: unscaling stays exact
        for step in range(steps):
            if step == poison_at:
                emas = [opt.state[p]["fsam_ema"].clone() for p in model.parameters()]
                norm = _scaled_step(model, opt, scaler, x, y, poison=True)
                assert not torch.isfinite(norm) and not opt.is_perturbed
                assert all(torch.equal(opt.state[p]["fsam_ema"], e) for p, e in zip(model.parameters(), emas))
            else:
                assert torch.isfinite(_scaled_step(model, opt, scaler, x, y))
        runs.append((model, opt))
    (a, opt_a), (b, opt_b) = runs
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb) and torch.equal(opt_a.state[pa]["fsam_ema"], opt_b.state[pb]["fsam_ema"])


# -- gradients whose squares overflow: every finite gradient perturbs exactly (issue 13, item 2) -----------------------


def _huge_case(dtype: torch.dtype, big: float) -> tuple[torch.nn.Parameter, torch.Tensor]:
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0, -3.0], dtype=dtype))
    p.grad = torch.tensor([big, 0.0, 0.0], dtype=dtype)
    return p, p.detach().clone()


@pytest.mark.parametrize("dtype,big", [(torch.float32, 2e19), (torch.float32, 1e20), (torch.float32, 1e36),
                                       (torch.bfloat16, 1e20), (torch.float64, 1e200), (torch.float64, 1.7e308)])
@pytest.mark.parametrize("variant", [sam_fused.SAM, sam_fused.FriendlySAM])
def test_finite_gradient_whose_square_overflows_is_perturbed(backend: str, variant: type, dtype: torch.dtype,
                                                             big: float) -> None:
    """A gradient [big, 0, 0]: e = [rho, 0, 0] exactly. Its square overflowed the fp32 (fp64) sum of squares, and the
    step used to be skipped as if the gradient were non-finite."""
    p, w = _huge_case(dtype, big)
    opt = variant([p], torch.optim.SGD, rho=0.05, lr=0.1, backend=backend)
    norm = opt.first_step()
    assert opt.is_perturbed and torch.isfinite(norm)
    torch.testing.assert_close(norm, torch.tensor(p.grad[0].item(), dtype=torch.float64), rtol=1e-12, atol=0)
    expected = w.double() + torch.tensor([0.05, 0.0, 0.0], dtype=torch.float64)
    assert torch.equal(p.detach(), expected.to(dtype))  # e rounds to exactly rho; the sum then rounds once
    opt.restore()
    assert torch.equal(p.detach(), w)


def test_norm_beyond_rho_over_fp32_min_perturbs_nearly_exactly(backend: str) -> None:
    """Above rho / 1.2e-38 (4e36 for rho = 0.05) the fp32 scale is subnormal: e keeps its direction and ~5 digits."""
    p, w = _huge_case(torch.float32, 3e38)
    opt = sam_fused.SAM([p], torch.optim.SGD, rho=0.05, lr=0.1, backend=backend)
    assert torch.isfinite(opt.first_step())
    torch.testing.assert_close(p.detach() - w, torch.tensor([0.05, 0.0, 0.0]), rtol=1e-4, atol=0)
    opt.restore()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_asam_with_squares_beyond_fp32(backend: str, dtype: torch.dtype) -> None:
    """ASAM, T * g = 1e21: its square overflowed the fp32 sum. e = rho * T^2 g / ||T g|| (T^2 g = 1e26 is in range)."""
    p = torch.nn.Parameter(torch.tensor([1e5, 1.0], dtype=dtype))
    p.grad = torch.tensor([1e16, 3.0], dtype=dtype)
    w = p.detach().clone()
    opt = sam_fused.SAM([p], torch.optim.SGD, rho=0.05, adaptive=True, eta=0.01, lr=0.1, backend=backend)
    assert torch.isfinite(opt.first_step())
    t = w.double().abs() + 0.01
    g = p.grad.double()
    expected = w.double() + 0.05 * t * t * g / (t * g).norm()
    torch.testing.assert_close(p.detach().double(), expected, rtol=1e-6, atol=0)
    opt.restore()


def test_fp64_overflow_with_fp32_params_in_the_model(backend: str) -> None:
    """One global norm of ~1e200 (an fp64 parameter): the fp32 parameter's e = rho * g / 1e200 underflows to 0, the fp64
    one gets exactly rho; norm reported as ~1e200."""
    big, w_big = _huge_case(torch.float64, 1e200)
    small = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    small.grad = torch.tensor([3.0, -4.0])
    opt = sam_fused.SAM([big, small], torch.optim.SGD, rho=0.05, lr=0.1, backend=backend)
    norm = opt.first_step()
    torch.testing.assert_close(norm, torch.tensor(1e200, dtype=torch.float64), rtol=1e-12, atol=0)
    assert torch.equal(big.detach(), w_big + torch.tensor([0.05, 0.0, 0.0], dtype=torch.float64))
    assert torch.equal(small.detach(), torch.tensor([1.0, 2.0]))
    assert torch.equal(small.grad, torch.tensor([3.0, -4.0])) and big.grad[0].item() == 1e200  # grads untouched
    opt.restore()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_truly_non_finite_gradient_still_skips(backend: str, dtype: torch.dtype, bad: float) -> None:
    p, w = _huge_case(dtype, 1e30 if dtype != torch.float64 else 1e200)
    p.grad[1] = bad
    opt = sam_fused.SAM([p], torch.optim.SGD, rho=0.05, lr=0.1, backend=backend)
    norm = opt.first_step()
    assert not torch.isfinite(norm) and torch.equal(p.detach(), w)
    opt.restore()
    assert torch.equal(p.detach(), w)


def test_backups_follow_parameters_changed_in_place(backend: str) -> None:
    """Backups are reused from step to step while the parameters are the same tensors in the same memory; a
    parameter given new memory, a new dtype, or a new shape over the same memory gets a new backup."""
    p = torch.nn.Parameter(torch.randn(6, dtype=torch.float64))
    opt = sam_fused.SAM([p], torch.optim.SGD, lr=0.1, backend=backend)
    for new in (lambda: torch.randn(6), lambda: p.data.view(2, 3), lambda: torch.randn(5).half(),
                lambda: torch.randn(3, 4).t()):
        p.data = new()
        p.grad = torch.randn_like(p)
        w = p.detach().clone()
        for _ in range(2):
            opt.first_step()
            assert not torch.equal(p, w)
            opt.restore()
            assert torch.equal(p, w) and p.stride() == w.stride()
