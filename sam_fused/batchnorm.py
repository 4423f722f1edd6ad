"""Keep BatchNorm running statistics out of the perturbed forward pass.

The SAM port most people use resets BatchNorm momentum to 0; that still counts the batch (num_batches_tracked) and
turns NaN batch statistics into NaN running statistics. Here the perturbed pass runs with
``track_running_stats=False``: the layer normalizes with the batch statistics, as in training, and touches neither
running statistics nor the batch counter.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

_SAVED = "_sam_fused_track_running_stats"


def disable_running_stats(model: nn.Module) -> None:
    """Stop BatchNorm layers of `model` from updating running statistics (call before the perturbed pass)."""
    for m in model.modules():
        if isinstance(m, _BatchNorm) and not hasattr(m, _SAVED):
            setattr(m, _SAVED, m.track_running_stats)
            m.track_running_stats = False


def enable_running_stats(model: nn.Module) -> None:
    """Undo `disable_running_stats`."""
    for m in model.modules():
        if isinstance(m, _BatchNorm) and hasattr(m, _SAVED):
            m.track_running_stats = getattr(m, _SAVED)
            delattr(m, _SAVED)


@contextlib.contextmanager
def running_stats_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """``with running_stats_disabled(model): loss_fn(model(x), y).backward()``"""
    disable_running_stats(model)
    try:
        yield model
    finally:
        enable_running_stats(model)
