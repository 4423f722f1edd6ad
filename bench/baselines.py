"""The SAM first_step + restore that the fused op layer is measured against, and the fused step itself.

* loop: the algorithm of the most used PyTorch SAM port, re-written from its description. One Python iteration per
  parameter: per-parameter norms stacked into the global norm, a fresh clone of each weight as its backup, restore by
  swapping the weight's storage back (``p.data = old_p``).
* foreach: the same math with ``torch._foreach_*`` multi-tensor ops and preallocated backups, i.e. the best a careful
  user can do without custom kernels.
* fused: ``sam_fused.ops`` grad_sumsq + perturb_ + restore_ on one backend.

Every implementation is split into the three parts of the op layer (norm, perturb, restore), so that the benchmark can
compare an op with the equivalent part of a baseline. ``*_step(params, grads, backups, rho, adaptive)`` is
first_step + restore, what the benchmark calls "step". ASAM here is the port's variant (eta = 0, T = |w| everywhere).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

import sam_fused
from sam_fused import _backends, ops

EPS = 1e-12
BASELINES = ("loop", "foreach")
Tensors = list[torch.Tensor]


# ---- loop: the most used port ---------------------------------------------------------------------------------------


def loop_grad_norm(params: Tensors, grads: Tensors, adaptive: bool = False) -> torch.Tensor:
    shared_device = params[0].device  # the port gathers per-parameter norms on one device (model parallelism)
    norms = [((torch.abs(p) if adaptive else 1.0) * g).norm(p=2).to(shared_device) for p, g in zip(params, grads)]
    return torch.norm(torch.stack(norms), p=2)


def loop_perturb(params: Tensors, grads: Tensors, grad_norm: torch.Tensor, rho: float = 0.05,
                 adaptive: bool = False) -> Tensors:
    """w <- w + e_w per parameter; returns the clones of the old weights (the port keeps them in optimizer state)."""
    scale = rho / (grad_norm + EPS)
    old = []
    for p, g in zip(params, grads):
        old.append(p.data.clone())
        e_w = (torch.pow(p, 2) if adaptive else 1.0) * g * scale.to(p)
        p.add_(e_w)
    return old


def loop_restore(params: Tensors, old: Tensors) -> None:
    for p, old_p in zip(params, old):
        p.data = old_p  # no copy: the weight takes the clone's storage (the clone was paid for in loop_perturb)


def loop_first_step(params: Tensors, grads: Tensors, rho: float = 0.05, adaptive: bool = False) -> Tensors:
    return loop_perturb(params, grads, loop_grad_norm(params, grads, adaptive), rho, adaptive)


def loop_step(params: Tensors, grads: Tensors, backups: Tensors, rho: float = 0.05, adaptive: bool = False) -> None:
    """first_step + restore. `backups` is unused: the port allocates its own clones."""
    loop_restore(params, loop_first_step(params, grads, rho, adaptive))


# ---- foreach: multi-tensor torch ops --------------------------------------------------------------------------------


def foreach_grad_norm(params: Tensors, grads: Tensors, adaptive: bool = False) -> torch.Tensor:
    scaled = torch._foreach_mul(grads, torch._foreach_abs(params)) if adaptive else grads
    return torch.stack(torch._foreach_norm(scaled)).norm(p=2)


def foreach_perturb(params: Tensors, grads: Tensors, backups: Tensors, grad_norm: torch.Tensor, rho: float = 0.05,
                    adaptive: bool = False) -> None:
    scale = (rho / (grad_norm + EPS)).to(params[0].dtype)  # a 0-dim device tensor: no host sync
    torch._foreach_copy_(backups, params)
    e_w = torch._foreach_mul(grads, scale)
    if adaptive:
        torch._foreach_mul_(e_w, torch._foreach_mul(params, params))
    torch._foreach_add_(params, e_w)


def foreach_restore(params: Tensors, backups: Tensors) -> None:
    torch._foreach_copy_(params, backups)


def foreach_first_step(params: Tensors, grads: Tensors, backups: Tensors, rho: float = 0.05,
                       adaptive: bool = False) -> None:
    foreach_perturb(params, grads, backups, foreach_grad_norm(params, grads, adaptive), rho, adaptive)


def foreach_step(params: Tensors, grads: Tensors, backups: Tensors, rho: float = 0.05, adaptive: bool = False) -> None:
    foreach_first_step(params, grads, backups, rho, adaptive)
    foreach_restore(params, backups)


# ---- fused: the op layer --------------------------------------------------------------------------------------------


def fused_step(params: Tensors, grads: Tensors, backups: Tensors, rho: float = 0.05, adaptive: bool = False,
               backend: str = "auto") -> None:
    sumsq = ops.grad_sumsq(grads, params if adaptive else None, backend=backend)
    ops.perturb_(params, grads, backups, sumsq, rho, adaptive=adaptive, backend=backend)
    ops.restore_(params, backups, backend=backend)


# ---- one interface for the benchmark --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Impl:
    """One way to do a SAM step, split like the op layer. `perturb` returns whatever `restore` needs besides the
    backups (the loop's clones), or None."""

    name: str
    norm: Callable[[Tensors, Tensors, bool], torch.Tensor]
    perturb: Callable[[Tensors, Tensors, Tensors, torch.Tensor, float, bool], Tensors | None]
    restore: Callable[[Tensors, Tensors, Tensors | None], None]
    restore_copies: bool = True  # False for the loop: it swaps storage, so its restore is no equivalent of restore_

    def step(self, params: Tensors, grads: Tensors, backups: Tensors, rho: float = 0.05,
             adaptive: bool = False) -> None:
        saved = self.perturb(params, grads, backups, self.norm(params, grads, adaptive), rho, adaptive)
        self.restore(params, backups, saved)


def _fused_norm(params: Tensors, grads: Tensors, adaptive: bool, backend: str) -> torch.Tensor:
    return ops.grad_sumsq(grads, params if adaptive else None, backend=backend)


def _fused_perturb(params: Tensors, grads: Tensors, backups: Tensors, sumsq: torch.Tensor, rho: float, adaptive: bool,
                   backend: str) -> None:
    ops.perturb_(params, grads, backups, sumsq, rho, adaptive=adaptive, backend=backend)


def _fused_restore(params: Tensors, backups: Tensors, saved: None, backend: str) -> None:
    ops.restore_(params, backups, backend=backend)


def make_impl(name: str) -> Impl:
    """The implementation called `name`: a baseline (loop, foreach) or the op layer on sam_fused backend `name`."""
    if name == "loop":
        return Impl(name, loop_grad_norm, lambda p, g, b, n, rho, a: loop_perturb(p, g, n, rho, a),
                    lambda p, b, saved: loop_restore(p, saved), restore_copies=False)
    if name == "foreach":
        return Impl(name, foreach_grad_norm, foreach_perturb, lambda p, b, saved: foreach_restore(p, b))
    return Impl(name, functools.partial(_fused_norm, backend=name), functools.partial(_fused_perturb, backend=name),
                functools.partial(_fused_restore, backend=name))


def impl_names() -> tuple[str, ...]:
    """Every name make_impl takes: "auto", each backend of the sam_fused backend table, the baselines."""
    return ("auto", *_backends.NAMES, *BASELINES)


def device_backends(device: torch.device) -> tuple[list[str], dict[str, str]]:
    """sam_fused backends that can run `device` tensors here, and for each other one why not (from the backend table:
    a backend that runs a device only under a test interpreter, like Triton's on the CPU, is meaningless to time)."""
    usable, skipped, statuses = [], {}, sam_fused.backends()
    for backend in _backends.BACKENDS:
        status = statuses[backend.name]
        if not status.available:
            skipped[backend.name] = status.detail
        elif backend.devices is not None and device.type not in backend.devices:
            skipped[backend.name] = f"runs {'/'.join(backend.devices)} tensors, the benchmark device is {device.type}"
        else:
            usable.append(backend.name)
    return usable, skipped
