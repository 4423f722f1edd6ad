"""The training loss as a function of one flat parameter vector, evaluated without touching the model.

Every diagnostic works on `loss_fn(model(*inputs), *targets)` seen as L(w) for a flat vector w of all trainable
parameters (d = their total size). torch.func.functional_call swaps w in for the model's parameters, so the model's
weights are never modified, and BatchNorm running statistics are left alone (sam_fused.running_stats_disabled):
measuring the loss surface must not change it. The model is used in its current mode; call model.eval() first if it
has dropout (random masks make every Hessian-vector product a different matrix).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call

from ..batchnorm import running_stats_disabled

Batch = torch.Tensor | tuple[torch.Tensor, ...]
LossFn = Callable[..., torch.Tensor]


def as_tuple(x: Batch) -> tuple[torch.Tensor, ...]:
    return x if isinstance(x, tuple) else (x,)


def batch_size_of(inputs: Batch, targets: Batch) -> int:
    sizes = {t.shape[0] for t in as_tuple(inputs) + as_tuple(targets)}
    if len(sizes) != 1:
        raise ValueError(f"inputs and targets must share one batch size along dim 0, got {sorted(sizes)}")
    return sizes.pop()


def select(x: Batch, index: slice | torch.Tensor) -> Batch:
    """Rows `index` (along dim 0) of a tensor or of every tensor of a tuple."""
    return tuple(t[index] for t in x) if isinstance(x, tuple) else x[index]


class Objective:
    """L(w) = loss_fn(model(*inputs), *targets) at a flat parameter vector w (model parameters untouched)."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no trainable parameters")
        kinds = {(p.dtype, p.device) for _, p in named}
        if len(kinds) != 1:
            raise ValueError(f"diagnostics need one dtype and device for all parameters, got {sorted(map(str, kinds))}")
        self.model, self.loss_fn = model, loss_fn
        self.names = [name for name, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.numels = [p.numel() for _, p in named]
        self.dim = sum(self.numels)
        self.dtype, self.device = kinds.pop()

    def flat_params(self) -> torch.Tensor:
        """The model's current parameters as one detached vector [d]."""
        return torch.cat([p.detach().reshape(-1) for _, p in self._named()])

    def _named(self) -> list[tuple[str, torch.Tensor]]:
        params = dict(self.model.named_parameters())
        return [(name, params[name]) for name in self.names]

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of `flat` [d] shaped like the parameters (autograd flows through them back to `flat`)."""
        parts = torch.split(flat, self.numels)
        return {name: part.view(shape) for name, part, shape in zip(self.names, parts, self.shapes)}

    def loss(self, flat: torch.Tensor, inputs: Batch, targets: Batch) -> torch.Tensor:
        with running_stats_disabled(self.model):
            out = functional_call(self.model, self.unflatten(flat), as_tuple(inputs))
        return self.loss_fn(out, *as_tuple(targets))

    def grad(self, flat: torch.Tensor, inputs: Batch, targets: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, gradient [d]) at `flat`."""
        w = flat.detach().requires_grad_(True)
        loss = self.loss(w, inputs, targets)
        (g,) = torch.autograd.grad(loss, w)
        return loss.detach(), g

    def hvp_operator(self, inputs: Batch, targets: Batch) -> Callable[[torch.Tensor], torch.Tensor]:
        """v [d] -> H v at the current parameters, by double backward.

        The gradient graph is built once and kept, so each product costs one backward pass through it.
        """
        w = self.flat_params().requires_grad_(True)
        (g,) = torch.autograd.grad(self.loss(w, inputs, targets), w, create_graph=True)

        def hvp(v: torch.Tensor) -> torch.Tensor:
            if not g.requires_grad:  # the gradient does not depend on w (a loss linear in w): H = 0
                return torch.zeros_like(v)
            (hv,) = torch.autograd.grad(g, w, grad_outputs=v, retain_graph=True, allow_unused=True)
            return torch.zeros_like(v) if hv is None else hv.detach()

        return hvp

    def example_loss_fn(self, inputs: Batch, targets: Batch, i: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """w -> loss of example i alone (a batch of one), for exact per-example Hessians."""
        xi, yi = select(inputs, slice(i, i + 1)), select(targets, slice(i, i + 1))
        return lambda flat: self.loss(flat, xi, yi)

