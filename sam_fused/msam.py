"""mSAM (micro-batch SAM), sequential form: k unperturbed and k perturbed passes.

G = (1/k) * sum_j grad L_{B_j}(w + e_j),  e_j = rho * g_j / (||g_j|| + eps),  g_j = grad L_{B_j}(w).
g_j comes from torch.autograd.grad (it does not touch .grad); the perturbed gradients accumulate into .grad with
weight 1/k, so .grad holds G when the base optimizer steps.

On a DistributedDataParallel model every pass runs under no_sync except the last perturbed backward, whose
all-reduce averages the accumulated sums: G over k micro-batches per rank, k * world_size in all ("local"
perturbation, see sam_fused.distributed).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from .batchnorm import running_stats_disabled
from .distributed import no_sync_unless
from .param_slices import GroupSlice, group_slices

if TYPE_CHECKING:  # type hints only: optim imports the mSAM modules
    from .optim import SAM

Batch = torch.Tensor | tuple[torch.Tensor, ...]


def _as_tuple(x: Batch) -> tuple[torch.Tensor, ...]:
    return x if isinstance(x, tuple) else (x,)


def split_micro_batches(inputs: Batch, targets: Batch, k: int) -> list[tuple[tuple, tuple]]:
    """k disjoint micro-batches [(inputs_j, targets_j)], split along dim 0; k must divide the batch."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"micro_batches must be an integer >= 1, got {k!r}")
    xs, ys = _as_tuple(inputs), _as_tuple(targets)
    sizes = {t.shape[0] if t.dim() else None for t in xs + ys}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"inputs and targets must share one batch size along dim 0, got {sorted(map(str, sizes))}")
    n = sizes.pop()
    if n == 0:
        raise ValueError("the batch is empty (dim 0 of inputs and targets has size 0)")
    if n % k:
        raise ValueError(f"micro_batches={k} does not divide the batch size {n}")
    parts_x = [t.chunk(k) for t in xs]
    parts_y = [t.chunk(k) for t in ys]
    return [(tuple(p[j] for p in parts_x), tuple(p[j] for p in parts_y)) for j in range(k)]


def check_scalar_loss(loss: object, j: int) -> torch.Tensor:
    """loss_fn must return micro-batch j's mean loss, a 0-dim tensor (reduction="none" would scale the step)."""
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        what = f"shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"loss_fn must return a 0-dim tensor, the mean loss of its micro-batch; for micro-batch {j} "
                         f"it returned {what} (a loss with reduction='none'?)")
    return loss


def msam_sequential(
    opt: SAM, model: torch.nn.Module, loss_fn: Callable[..., torch.Tensor], inputs: Batch, targets: Batch, k: int,
    base_step: bool = True,
) -> torch.Tensor:
    """One mSAM step in 2k micro-batch passes: leaves .grad = G and, if `base_step`, takes the base optimizer's
    step. Returns the mean unperturbed micro-batch loss."""
    batches = split_micro_batches(inputs, targets, k)
    group_params = [(g, [p for p in g["params"] if p.requires_grad]) for g in opt.param_groups]
    flat = [p for _, ps in group_params for p in ps]
    opt.zero_grad(set_to_none=True)
    losses = []
    try:
        for j, (xj, yj) in enumerate(batches):
            with no_sync_unless(model, False):
                loss = check_scalar_loss(loss_fn(model(*xj), *yj), j)
                losses.append(loss.detach())
                grads = torch.autograd.grad(loss, flat, allow_unused=True)
            opt._perturb(_slices_from(group_params, grads))
            with no_sync_unless(model, j == k - 1), running_stats_disabled(model):
                (loss_fn(model(*xj), *yj) / k).backward()
            opt.restore()
    except BaseException:
        opt.restore()
        raise
    if base_step:
        opt.base_optimizer.step()
    return torch.stack(losses).mean()


def _slices_from(group_params: list, grads: tuple) -> list[GroupSlice]:
    """Slices (group, params, grads) from autograd.grad's output, skipping params it returned no gradient for."""
    slices, i = [], 0
    for group, params in group_params:
        ps, gs = [], []
        for p in params:
            if grads[i] is not None:
                ps.append(p)
                gs.append(grads[i])
            i += 1
        slices.extend(group_slices(group, ps, gs))
    return slices
