"""restore_sgd_ and SAM's fused second step against torch.optim.SGD itself, bit for bit (issue 3, stretch).

The reference is torch's own code path: restore_ followed by torch.optim.SGD.step() (single- and multi-tensor), on
copies of the same tensors. fp32 on the CPU must match exactly, in every element (vector body and scalar tails),
for every momentum / nesterov / weight decay / dampening combination and any thread count.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import make_data, make_model, mse

import sam_fused
from sam_fused import ops

FUSED = "cpu" if sam_fused.backends()["cpu"].available else None
BACKENDS = ["torch"] + ([FUSED] if FUSED else [])
# Sizes: empty, 1, odd, a vector body with a tail, > 65,536 (several work chunks), non-contiguous (2-D transposed).
SHAPES = [(0,), (1,), (7,), (33,), (65_537 + 6,), (130, 517), (3, 5, 2)]
HYPER = [  # (weight_decay, momentum, dampening, nesterov)
    (0.0, 0.0, 0.0, False),
    (5e-4, 0.0, 0.0, False),
    (0.0, 0.9, 0.0, False),
    (1e-2, 0.9, 0.0, True),
    (5e-4, 0.8, 0.1, False),
]
LR = 0.0731


def _tensors(seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = [torch.randn(s, generator=gen) for s in SHAPES]
    out[-2] = out[-2].t().contiguous().t()  # non-contiguous, column-major
    return out


def _copy(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.empty_strided(t.shape, t.stride()).copy_(t) for t in ts]


def _torch_sgd(backups: list[torch.Tensor], grads: list[torch.Tensor], bufs: list[torch.Tensor], hyper: tuple,
               foreach: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """restore, then torch.optim.SGD.step() with the given momentum buffers in its state."""
    wd, momentum, dampening, nesterov = hyper
    params = [torch.nn.Parameter(torch.full_like(b, float("nan"))) for b in backups]  # restore must overwrite all
    opt = torch.optim.SGD(params, lr=LR, momentum=momentum, dampening=dampening, weight_decay=wd, nesterov=nesterov,
                          foreach=foreach)
    for p, g, b in zip(params, grads, _copy(bufs) if momentum else [None] * len(params)):
        p.grad = g.clone()
        if b is not None:
            opt.state[p]["momentum_buffer"] = b
    with torch.no_grad():
        ops.restore_(params, backups, backend="torch")
    opt.step()
    return [p.detach() for p in params], [opt.state[p]["momentum_buffer"] for p in params] if momentum else []


def _bits_equal(a: list[torch.Tensor], b: list[torch.Tensor], what: str) -> None:
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.shape == y.shape, f"{what}[{i}]"
        assert torch.equal(x.contiguous().view(torch.int32), y.contiguous().view(torch.int32)), f"{what}[{i}] differs"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hyper", HYPER)
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_restore_sgd_equals_torch_sgd_bitwise(backend: str, hyper: tuple, foreach: bool, threads: int) -> None:
    backups, grads, bufs = _tensors(0), _tensors(1), _tensors(2)
    expected_w, expected_buf = _torch_sgd(backups, grads, bufs, hyper, foreach)
    wd, momentum, dampening, nesterov = hyper
    params = [torch.full_like(b, float("nan")) for b in backups]
    got_bufs = _copy(bufs) if momentum else []
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ops.restore_sgd_(params, backups, grads, got_bufs, LR, wd, momentum, dampening, nesterov, backend=backend)
    finally:
        torch.set_num_threads(before)
    _bits_equal(params, expected_w, "params")
    _bits_equal(got_bufs, expected_buf, "momentum_buffers")


@pytest.mark.skipif(FUSED is None, reason="sam_fused cpu backend unavailable")
def test_restore_sgd_cpu_kernel_opcheck_and_errors() -> None:
    small = [t for t in _tensors(0) if math.prod(t.shape) < 1000]
    args = (small, _copy(small), [torch.randn_like(t) for t in small], [torch.randn_like(t) for t in small],
            0.1, 1e-3, 0.9, 0.0, True)
    assert torch._C._dispatch_has_kernel_for_dispatch_key("sam_fused::restore_sgd_", "CPU")
    torch.library.opcheck(torch.ops.sam_fused.restore_sgd_, args)
    op, w = torch.ops.sam_fused.restore_sgd_, [torch.randn(3)]
    with pytest.raises(TypeError, match="float32"):
        op([w[0].bfloat16()], [w[0].bfloat16()], [w[0].bfloat16()], [], 0.1)
    with pytest.raises(ValueError, match="momentum_buffers has 0 tensors but params has 1"):
        op(w, w, w, [], 0.1, 0.0, 0.9)
    with pytest.raises(ValueError, match=r"grads\[0\] has shape"):
        op(w, w, [torch.randn(4)], [], 0.1)


# ---- SAM.second_step ----------------------------------------------------------------------------------------


def _train(opt_kwargs: dict, fused: bool, steps: int = 4, cls: type = sam_fused.SAM,
           **sam_kwargs: object) -> tuple[dict, dict, int]:
    """SAM steps on a small model; returns (weights, momentum buffers, how many fused second steps ran)."""
    model, (x, y) = make_model(), make_data()
    opt = cls(model.parameters(), torch.optim.SGD, backend=FUSED or "torch", **sam_kwargs, **opt_kwargs)
    opt.fused_second_step = fused
    calls = []
    real = ops.restore_sgd_

    def spy(*args: object, **kwargs: object) -> None:
        calls.append(1)
        real(*args, **kwargs)

    ops.restore_sgd_ = spy
    try:
        for _ in range(steps):
            mse(model(x), y).backward()
            opt.first_step(zero_grad=True)
            mse(model(x), y).backward()
            opt.second_step(zero_grad=True)
    finally:
        ops.restore_sgd_ = real
    bufs = {n: opt.base_optimizer.state[p].get("momentum_buffer") for n, p in model.named_parameters()}
    return {n: p.detach().clone() for n, p in model.named_parameters()}, bufs, len(calls)


@pytest.mark.parametrize("opt_kwargs", [
    dict(lr=0.1),
    dict(lr=0.1, momentum=0.9),
    dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4),
    dict(lr=0.05, momentum=0.8, dampening=0.1, weight_decay=1e-3),
])
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("cls", [sam_fused.SAM, sam_fused.FriendlySAM])
def test_sam_fused_second_step_equals_unfused_bitwise(opt_kwargs: dict, adaptive: bool, cls: type) -> None:
    w_fused, buf_fused, fused_calls = _train(opt_kwargs, True, cls=cls, adaptive=adaptive)
    w_plain, buf_plain, plain_calls = _train(opt_kwargs, False, cls=cls, adaptive=adaptive)
    # With momentum, torch's first step creates the buffers (a clone of the gradient): that step is not fused.
    assert plain_calls == 0 and fused_calls == (3 if opt_kwargs.get("momentum") else 4)
    for n in w_plain:
        _bits_equal([w_fused[n]], [w_plain[n]], n)
        if buf_plain[n] is not None:
            _bits_equal([buf_fused[n]], [buf_plain[n]], f"buffer {n}")


def test_unsupported_base_optimizers_take_the_unfused_path() -> None:
    """AdamW, maximize, step hooks, bf16 weights: second_step runs restore() + the base step (no fused call)."""
    model = make_model()
    cases = {
        "adamw": sam_fused.SAM(model.parameters(), torch.optim.AdamW, lr=0.1),
        "maximize": sam_fused.SAM(model.parameters(), torch.optim.SGD, lr=0.1, maximize=True),
    }
    hooked = sam_fused.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    hooked.base_optimizer.register_step_post_hook(lambda *args: None)
    cases["hook"] = hooked
    x, y = make_data()
    for name, opt in cases.items():
        mse(model(x), y).backward()
        opt.first_step(zero_grad=True)
        mse(model(x), y).backward()
        assert opt._fused_sgd_plan() is None, name
        opt.second_step(zero_grad=True)
    half = make_model().bfloat16()
    opt = sam_fused.SAM(half.parameters(), torch.optim.SGD, lr=0.1)
    mse(half(x.bfloat16()), y.bfloat16()).backward()
    opt.first_step(zero_grad=True)
    mse(half(x.bfloat16()), y.bfloat16()).backward()
    assert opt._fused_sgd_plan() is None
    opt.second_step()


def test_fused_second_step_failures_leave_no_weight_perturbed(monkeypatch: pytest.MonkeyPatch) -> None:
    """A refused first call falls back to restore() + SGD.step(); a failure in a later group restores the groups not
    stepped yet and propagates."""
    x, y = make_data()
    real = ops.restore_sgd_
    for fail_on, expect_error in ((1, False), (2, True)):
        model = make_model()
        named = list(model.named_parameters())
        groups = [{"params": [p for n, p in named if n.endswith("weight")]},
                  {"params": [p for n, p in named if n.endswith("bias")]}]
        opt = sam_fused.SAM(groups, torch.optim.SGD, lr=0.1, backend=FUSED or "torch")
        calls: list[int] = []

        def flaky(*args: object, calls: list[int] = calls, fail_on: int = fail_on, **kwargs: object) -> None:
            calls.append(1)
            if len(calls) == fail_on:
                raise ValueError("refused")
            real(*args, **kwargs)

        monkeypatch.setattr(ops, "restore_sgd_", flaky)
        mse(model(x), y).backward()
        before = {n: p.detach().clone() for n, p in named}
        opt.first_step(zero_grad=True)
        mse(model(x), y).backward()
        if expect_error:
            with pytest.raises(ValueError, match="refused"):
                opt.second_step()
            assert torch.equal(named[1][1], before[named[1][0]])  # the bias group was restored, not stepped
        else:
            opt.second_step()  # fell back: restore + torch's step
            assert not torch.equal(named[0][1], before[named[0][0]])
        assert not opt.is_perturbed


def test_half_precision_gradients_take_the_unfused_path() -> None:
    model, (x, y) = make_model(), make_data()
    opt = sam_fused.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    mse(model(x), y).backward()
    opt.first_step(zero_grad=True)
    mse(model(x), y).backward()
    for p in model.parameters():
        if hasattr(p, "grad_dtype"):
            p.grad_dtype = None  # torch >= 2.10 refuses a gradient dtype other than the tensor's unless told
        p.grad = p.grad.half()
    assert opt._fused_sgd_plan() is None
    opt.second_step()
    assert not opt.is_perturbed
