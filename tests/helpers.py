"""Shared test helpers: which backends run here, a tiny functional model, hand-written SAM-family formulas."""

from __future__ import annotations

import torch
from torch.func import functional_call

import sam_fused
from sam_fused import _backends, reference

# Backends whose optimizer-level behaviour is tested on CPU tensors (the Triton interpreter has its own op tests).
# The backends made for CPU tensors that are usable here, from the backend table (Triton runs CPU tensors only under
# its interpreter, which has its own test files).
CPU_BACKENDS = [b.name for b in _backends.BACKENDS
                if (b.devices is None or "cpu" in b.devices) and sam_fused.backends()[b.name].available]


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


def make_data(n: int = 16, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=gen), torch.randn(n, 3, generator=gen)


def mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (out - y).pow(2).mean()


def loss_grad(model: torch.nn.Module, w: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> dict:
    """Gradient of the mean loss at weights `w` (a name -> tensor dict), without touching the model."""
    w = {k: v.detach().requires_grad_(True) for k, v in w.items()}
    loss = mse(functional_call(model, w, (x,)), y)
    grads = torch.autograd.grad(loss, list(w.values()))
    return dict(zip(w.keys(), grads))


def perturbation(w: dict, g: dict, rho: float, adaptive: dict | bool = False, eta: float = 0.0,
                 normalize: bool = True) -> dict:
    """e = rho * T^2 * g / (||T g|| + 1e-12), T = |w| + eta where adaptive (per name), else 1
    (docs/DESIGN.md section 1)."""
    ad = adaptive if isinstance(adaptive, dict) else {k: adaptive for k in w}
    t = {k: (w[k].abs() + eta) if ad[k] else torch.ones_like(w[k]) for k in w}
    norm = torch.sqrt(sum(((t[k] * g[k]) ** 2).sum() for k in w))
    scale = rho / (norm + 1e-12) if normalize else rho
    return {k: scale * t[k] ** 2 * g[k] for k in w}


class HandSGD:
    """torch.optim.SGD's update written out: buf = momentum * buf + g (first step: buf = g); w -= lr * buf."""

    def __init__(self, lr: float, momentum: float = 0.0) -> None:
        self.lr, self.momentum, self.buf = lr, momentum, None

    def step(self, w: dict, g: dict) -> dict:
        if self.momentum:
            self.buf = dict(g) if self.buf is None else {k: self.momentum * self.buf[k] + g[k] for k in g}
            g = self.buf
        return {k: w[k] - self.lr * g[k] for k in w}


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def assert_weights_close(model: torch.nn.Module, expected: dict, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    for k, v in model.named_parameters():
        torch.testing.assert_close(v.detach(), expected[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def sam_step(model: torch.nn.Module, opt: sam_fused.SAM, x: torch.Tensor, y: torch.Tensor) -> None:
    mse(model(x), y).backward()
    opt.first_step(zero_grad=True)
    mse(model(x), y).backward()
    opt.second_step(zero_grad=True)


# ---- op-level comparisons (tests/test_parity.py and the backends' own test files) --------------------------------

def _ordered(x: torch.Tensor) -> torch.Tensor:
    """Integer image of float bits, monotonic in the value (+0 and -0 both map to 0): differences count ulps."""
    bits = x.view(torch.int32 if x.dtype == torch.float32 else torch.int16).long()
    sign = torch.tensor(1 << (x.element_size() * 8 - 1), dtype=torch.long, device=x.device)
    return torch.where(bits >= 0, bits, -(bits + sign))


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """fp32: within 1e-6 relative (tiny atol near zero); bf16/fp16: within 1 ulp of the reference's rounding."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    assert torch.equal(actual.isnan(), expected.isnan()), f"{what}: NaN positions differ"
    finite = ~expected.isnan()
    if actual.dtype == torch.float32:
        torch.testing.assert_close(actual[finite], expected[finite], rtol=1e-6, atol=1e-12, msg=what or None)
    else:
        ulps = (_ordered(actual[finite]) - _ordered(expected[finite])).abs()
        assert ulps.numel() == 0 or ulps.max().item() <= 1, f"{what}: {ulps.max().item()} ulp from the reference"


def assert_sumsq(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-6) -> None:
    """fp64 sums accumulated in another (fixed) order than the reference's: by default within 1e-6 relative, which also
    covers the CPU kernels' fp32 block sums (docs/DESIGN.md section 5)."""
    assert actual.dtype == torch.float64 and actual.shape == expected.shape and actual.device == expected.device
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=1e-300, equal_nan=True)


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    iv = torch.int32 if actual.dtype == torch.float32 else torch.int16
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    assert torch.equal(actual.contiguous().view(iv), expected.contiguous().view(iv)), f"{what}: not bit-exact"


def assert_step_ops_match(ops: object, params: list, grads: list, adaptive: bool, eta: float) -> None:
    """perturb_ (weights against the reference, backups bit-exact), restore_ (bit-exact) and fsam_direction_ (its sum
    and the stored direction and EMA) of `ops`, called like the torch.ops namespaces, against the reference. The
    params come back restored; the grads end up holding F-SAM's direction."""
    s = reference.grad_sumsq(grads, params if adaptive else None, eta)
    original, w_ref = [p.clone() for p in params], [p.clone() for p in params]
    backups = [torch.empty_like(p) for p in params]
    reference.perturb_(w_ref, grads, [torch.empty_like(p) for p in params], s, 0.05, 1e-12, adaptive, eta)
    ops.perturb_(params, grads, backups, s, 0.05, 1e-12, adaptive, eta, True)
    for w, r, b, o in zip(params, w_ref, backups, original):
        assert_matches(w, r)
        assert_bits_equal(b, o)
    ops.restore_(params, backups)
    for w, o in zip(params, original):
        assert_bits_equal(w, o)
    ema = [torch.randn_like(g) for g in grads]
    g_ref, e_ref = [g.clone() for g in grads], [m.clone() for m in ema]
    assert_sumsq(ops.fsam_direction_(grads, ema, 0.7, 0.6, False, params, 0.01),
                 reference.fsam_direction_(g_ref, e_ref, 0.7, 0.6, False, params, 0.01))
    for a, e in zip(grads + ema, g_ref + e_ref):
        assert_matches(a, e)
