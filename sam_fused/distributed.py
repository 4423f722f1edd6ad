"""SAM under data parallelism: the two meanings, made explicit (docs/DESIGN.md section 1, "local" vs "global").

* Global perturbation (the default with DistributedDataParallel): the first backward all-reduces the gradient, so
  every rank perturbs with the same global gradient. That is plain SAM on the global batch.
* Local perturbation (m-sharpness across ranks, as in the original SAM code): run the first backward inside
  ``local_perturbation(ddp_model)``; each rank then perturbs with its own gradient, and the second backward
  all-reduces as usual. With W ranks this is mSAM with k = W micro-batches. ``msam_step`` on a DDP model is always
  local: k micro-batches per rank give k * W micro-batches in all.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.nn.parallel import DistributedDataParallel


def is_ddp(model: torch.nn.Module) -> bool:
    return isinstance(model, DistributedDataParallel)


@contextlib.contextmanager
def local_perturbation(model: torch.nn.Module) -> Iterator[None]:
    """Wrap the FIRST forward+backward of a SAM step: gradients stay local to each rank (DDP's no_sync).

    Use it only for the first pass; the second pass must run outside so the gradients at w + e are averaged.
    On a model that is not DDP-wrapped it does nothing (single-process code runs unchanged).
    """
    if is_ddp(model):
        with model.no_sync():
            yield
    else:
        yield


def no_sync_unless(model: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """DDP's no_sync() when `sync` is False and the model is DDP-wrapped; otherwise nothing."""
    return model.no_sync() if is_ddp(model) and not sync else contextlib.nullcontext()
