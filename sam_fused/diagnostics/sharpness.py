"""m-sharpness: the worst-case loss increase in a rho-ball, averaged over micro-batches of a given size.

Foret et al. and Andriushchenko & Flammarion measure sharpness per micro-batch of m examples (their "m" is the
micro-batch SIZE, hence the argument name `micro_batch_size`; the optimizers' `micro_batches=k` is the number):

    S_m(w) = mean over micro-batches B of  max_{||e|| <= rho} L_B(w + e) - L_B(w).

The inner maximum is approximated from below by a few normalized ascent steps projected onto the ball; the first
step is SAM's own perturbation e = rho g / ||g||, so `ascent_steps=1` measures what SAM sees. The best value seen
along the way is kept, so more steps never lower the estimate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ._objective import Batch, LossFn, Objective, batch_size_of, select


@dataclass
class MSharpness:
    """m-sharpness with its spread over micro-batches."""

    value: float  # mean over micro-batches of the loss increase
    std_error: float  # std of the per-micro-batch increases / sqrt(number of micro-batches)
    micro_batch_size: int
    num_micro_batches: int
    rho: float
    ascent_steps: int
    mean_loss: float  # mean unperturbed micro-batch loss
    per_micro_batch: torch.Tensor = field(repr=False)  # [num_micro_batches] loss increases


def _ball_projection(e: torch.Tensor, rho: float) -> torch.Tensor:
    norm = e.norm()
    return e * (rho / norm) if norm > rho else e


def max_loss_increase(objective: Objective, w: torch.Tensor, inputs: Batch, targets: Batch, rho: float,
                      ascent_steps: int, step_size: float) -> tuple[float, float]:
    """(L(w), max found of L(w + e) - L(w) over ||e|| <= rho) for one batch, by projected normalized ascent."""
    with torch.no_grad():
        base = float(objective.loss(w, inputs, targets))
    e, best = torch.zeros_like(w), base
    for _ in range(ascent_steps):
        loss, g = objective.grad(w + e, inputs, targets)
        best = max(best, float(loss))
        g_norm = g.norm()
        if g_norm == 0:  # a stationary point of the perturbed loss: no ascent direction left
            break
        e = _ball_projection(e + step_size * g / g_norm, rho)
    with torch.no_grad():
        best = max(best, float(objective.loss(w + e, inputs, targets)))
    return base, best - base


def m_sharpness(model: nn.Module, loss_fn: LossFn, inputs: Batch, targets: Batch, rho: float,
                micro_batch_size: int, ascent_steps: int = 5, step_size: float | None = None) -> MSharpness:
    """m-sharpness of loss_fn(model(*inputs), *targets) at the current weights (the model is not modified).

    The batch is cut along dim 0, in its given order, into micro-batches of `micro_batch_size` examples, which must
    divide the batch size (micro_batch_size = batch size is the full-batch sharpness). `step_size` defaults to rho.
    `loss_fn` should return the mean loss of the micro-batch it is given.
    """
    n = batch_size_of(inputs, targets)
    if not isinstance(micro_batch_size, int) or not 1 <= micro_batch_size <= n or n % micro_batch_size:
        raise ValueError(f"micro_batch_size must be an integer dividing the batch size {n}, got {micro_batch_size!r}")
    if not rho > 0 or ascent_steps < 1:
        raise ValueError(f"need rho > 0 and ascent_steps >= 1, got rho={rho}, ascent_steps={ascent_steps}")
    objective = Objective(model, loss_fn)
    w = objective.flat_params()
    losses, increases = [], []
    for start in range(0, n, micro_batch_size):
        rows = slice(start, start + micro_batch_size)
        base, increase = max_loss_increase(objective, w, select(inputs, rows), select(targets, rows), rho,
                                           ascent_steps, rho if step_size is None else step_size)
        losses.append(base)
        increases.append(increase)
    per_batch = torch.tensor(increases, dtype=torch.float64)
    count = len(increases)
    std_error = float(per_batch.std() / math.sqrt(count)) if count > 1 else math.nan
    return MSharpness(float(per_batch.mean()), std_error, micro_batch_size, count, rho, ascent_steps,
                      sum(losses) / count, per_batch)
