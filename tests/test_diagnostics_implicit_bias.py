"""The papers' implicit-bias claims on small problems, trained with the library's optimizers.

1. Andriushchenko & Flammarion (2022): on a sparse-regression diagonal linear network, unnormalized SAM with
   per-example perturbations (micro-batch size 1: msam_step with micro_batches = n) finds a sparser solution (lower
   ||beta||_1) that generalizes better than GD and than full-batch SAM. Why: along SAM's flow, u_j^2 - v_j^2 (the
   effective initialization scale, smaller = sparser) shrinks at a rate set by the perturbing gradients' j-th
   entries; per-example gradients spread over all coordinates, the full-batch one mostly over the support.
2. Behdin et al. (mSAM, 2023): with normalized perturbations, more micro-batches end at flatter minima (lower Hessian
   trace).

The settings (init scale 0.5, lr 0.05, rho 0.06 / 0.05, 400 steps) were chosen on a separate float64 sweep (a
vectorized re-implementation, which matches the library's steps to 1e-7): claim 1 held for 31 of 32 seeds (on seed 20
per-example SAM ends at a worse, denser solution, ||beta||_1 = 5.5 against 4.4 for GD) and claim 2 for 12 of 12 seeds.
The seeds below are a fixed subset.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

import sam_fused

N, D, SPARSITY = 20, 30, 3
ALPHA, LR, STEPS = 0.5, 0.05, 400


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """These models are tiny: thread start-up costs more than it saves (and the machine is shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class DiagonalLinearNet(nn.Module):
    """f(x) = <u * v, x>, initialized at u = ALPHA, v = 0 (so beta = 0)."""

    def __init__(self, d: int, alpha: float) -> None:
        super().__init__()
        self.u = nn.Parameter(torch.full((d,), alpha, dtype=torch.float64))
        self.v = nn.Parameter(torch.zeros(d, dtype=torch.float64))

    def beta(self) -> torch.Tensor:
        return (self.u * self.v).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ (self.u * self.v)


def mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (out - y).pow(2).mean()


def sparse_regression(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n Gaussian inputs in R^d, noiseless targets of a 3-sparse beta* = (1, 1, 1, 0, ..., 0)."""
    gen = torch.Generator().manual_seed(seed)
    beta_star = torch.zeros(D, dtype=torch.float64)
    beta_star[:SPARSITY] = 1.0
    x = torch.randn(N, D, generator=gen, dtype=torch.float64)
    return x, x @ beta_star, beta_star


def train(seed: int, method: str, rho: float = 0.0, micro_batches: int = 1, normalize: bool = False) -> nn.Module:
    x, y, _ = sparse_regression(seed)
    model = DiagonalLinearNet(D, ALPHA)
    if method == "gd":
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        for _ in range(STEPS):
            opt.zero_grad()
            mse(model(x), y).backward()
            opt.step()
        return model
    opt = sam_fused.SAM(model.parameters(), torch.optim.SGD, rho=rho, normalize=normalize, lr=LR)
    for _ in range(STEPS):
        opt.msam_step(model, mse, x, y, micro_batches=micro_batches)
    return model


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_example_sam_finds_sparser_better_solutions(seed: int) -> None:
    x, y, beta_star = sparse_regression(seed)
    rho = 0.06
    models = {
        "gd": train(seed, "gd"),
        "sam": train(seed, "sam", rho=rho, micro_batches=1),  # full batch: one perturbation from the mean gradient
        "per-example sam": train(seed, "sam", rho=rho, micro_batches=N),  # micro-batch size 1
    }
    with torch.no_grad():
        train_loss = {k: float(mse(m(x), y)) for k, m in models.items()}
    # Test loss on fresh x ~ N(0, I) with noiseless targets: E[(x.(beta - beta*))^2] = ||beta - beta*||^2.
    test_loss = {k: float((m.beta() - beta_star).pow(2).sum()) for k, m in models.items()}
    l1 = {k: float(m.beta().abs().sum()) for k, m in models.items()}
    assert max(train_loss.values()) < 5e-3, train_loss  # all (nearly) interpolate: the comparison is fair
    assert test_loss["per-example sam"] < min(test_loss["gd"], test_loss["sam"]), test_loss
    assert l1["per-example sam"] < min(l1["gd"], l1["sam"]), l1


def hessian_trace(model: DiagonalLinearNet, x: torch.Tensor, y: torch.Tensor) -> float:
    """Exact trace of the Hessian of the training loss in (u, v), from the loss written out by hand."""
    def loss(w: torch.Tensor) -> torch.Tensor:
        u, v = w[:D], w[D:]
        return (x @ (u * v) - y).pow(2).mean()

    w = torch.cat([model.u.detach(), model.v.detach()])
    return float(torch.autograd.functional.hessian(loss, w).trace())


@pytest.mark.parametrize("seed", [0, 1])
def test_more_micro_batches_end_flatter(seed: int) -> None:
    x, y, _ = sparse_regression(seed)
    traces, losses = [], []
    for k in (1, 4, 10):
        model = train(seed, "sam", rho=0.05, micro_batches=k, normalize=True)
        traces.append(hessian_trace(model, x, y))
        with torch.no_grad():
            losses.append(float(mse(model(x), y)))
    assert max(losses) < 5e-3, losses
    assert traces[0] > traces[1] > traces[2], traces
