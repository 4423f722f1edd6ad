"""Which mSAM path runs a step (SAM.msam_step delegates here): the fast path (sam_fused.msam_fast) or the sequential
one (sam_fused.msam), with the first-use proof of the fast path per model and input shapes.

It lives on the mSAM side so that the optimizer imports mSAM and never the other way round (docs/DESIGN.md
section 6).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from .distributed import is_ddp
from .msam import Batch, msam_sequential
from .msam_fast import FastPathUnsupported, fast_path_support, msam_fast, msam_proven, shape_key

if TYPE_CHECKING:  # type hints only: optim imports this module
    from .optim import SAM

METHODS = ("auto", "fast", "sequential")


def msam_step(
    opt: SAM, model: torch.nn.Module, loss_fn: Callable[..., torch.Tensor], inputs: Batch, targets: Batch, k: int,
    method: str,
) -> torch.Tensor:
    """SAM.msam_step's work (its docstring is the contract): check, choose the path, run it, record
    ``opt.last_msam_info``."""
    if method not in METHODS:
        raise ValueError(f"method must be 'auto', 'fast' or 'sequential', got {method!r}")
    if opt.is_perturbed:
        raise RuntimeError("weights are perturbed by first_step(): call second_step() or restore() before "
                           "msam_step()")
    opt._check_groups()
    reason = "method='sequential'"
    if method == "fast" or (method == "auto" and k != 1):
        supported, reason = _fast_path_choice(opt, model, inputs, targets, k, method)
        if supported:
            try:
                return _run_fast(opt, model, loss_fn, inputs, targets, k, method, reason)
            except FastPathUnsupported as err:  # raised before any state changed
                if method == "fast":
                    raise
                reason = str(err)
        elif method == "fast":
            raise FastPathUnsupported(f"msam_step(method='fast') cannot run on this model: {reason}")
    elif method == "auto":
        reason = "k=1 is SAM: the sequential path is already two passes"
    opt.last_msam_info = {"method": "sequential", "reason": reason}
    loss = msam_sequential(opt, model, loss_fn, inputs, targets, k)
    opt._opt_called = True
    return loss


def _fast_path_choice(
    opt: SAM, model: torch.nn.Module, inputs: Batch, targets: Batch, k: int, method: str
) -> tuple[bool, str]:
    """(whether the fast path may run, why): the model's modules, DDP, and (for "auto") an earlier disproof."""
    supported, reason = fast_path_support(model)
    if is_ddp(model):
        supported, reason = False, "DDP-wrapped models run the sequential path"
    if supported and method == "auto" and opt._msam_proofs.get(model, {}).get(shape_key(inputs, targets, k)) is False:
        supported, reason = False, ("on first use the fast path's gradient disagreed with the sequential path's on "
                                    "this model and input shapes")
    return supported, reason


def _run_fast(
    opt: SAM, model: torch.nn.Module, loss_fn: Callable[..., torch.Tensor], inputs: Batch, targets: Batch, k: int,
    method: str, reason: str,
) -> torch.Tensor:
    """The fast path; with method="auto", on first use per model and input shapes, proven against the sequential
    path (the step then takes the sequential gradient, and a disproof sends the model to the sequential path)."""
    proofs = opt._msam_proofs.setdefault(model, {})
    key = shape_key(inputs, targets, k)
    layers: dict[str, str] = {}
    if method == "auto" and key not in proofs:
        loss, diff, tol = msam_proven(opt, model, loss_fn, inputs, targets, k, layers)
        proofs[key] = diff <= tol
        if not proofs[key]:
            warnings.warn(
                f"msam_step: the fast path's gradient differs from the sequential path's by {diff:.3g} "
                f"(relative; tolerance {tol:.1g}) on this model: the model is outside what the fast "
                "path supports (examples interacting across the batch, a batch dim other than 0?); "
                "this model runs the sequential path from now on. This step used the sequential "
                "gradient.", RuntimeWarning, stacklevel=4)  # the caller of SAM.msam_step
            opt.last_msam_info = {"method": "sequential", "reason": "fast path disproved on first use",
                                  "relative_difference": diff}
            opt._opt_called = True
            return loss
        reason += f"; proven on first use (G within {diff:.1g} relative of the sequential path's)"
    else:
        loss = msam_fast(opt, model, loss_fn, inputs, targets, k, plan=layers)
    opt.last_msam_info = {"method": "fast", "reason": reason, "layers": layers}
    opt._opt_called = True  # the base optimizer stepped (for LR schedulers, as in second_step)
    return loss
