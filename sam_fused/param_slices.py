"""The pieces SAM (sam_fused.optim) and mSAM (sam_fused.msam, msam_fast) share: the parameter slices a step works on.

It sits below both so that neither imports the other for them (docs/DESIGN.md section 6: dependencies run one way).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard

EPS = 1e-12  # added to the norm, not to its square: e = rho * g / (||g|| + EPS)


@dataclass
class GroupSlice:
    """Parameters of one param group that have a gradient this step, with their gradients (local tensors); the
    optimizer calls a list of them its step's "slots".

    `shard_group` is set for parameters sharded across ranks (FSDP2 DTensors with Shard placements): their sums of
    squares are partial and get all-reduced, as fp64 sums of squares (not norms), before the norm is taken.
    """

    group: dict[str, Any]
    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    shard_group: Any = None
    owners: list[torch.Tensor] = field(default_factory=list)  # the parameters themselves (DTensors stay DTensors)


def local_tensor(t: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """(local tensor, process group whose ranks hold the other shards, or None)."""
    if not isinstance(t, DTensor):
        return t, None
    mesh = t.device_mesh
    if mesh.ndim != 1 or not all(isinstance(pl, (Shard, Replicate)) for pl in t.placements):
        raise NotImplementedError(f"SAM supports DTensors on a 1-D mesh with Shard/Replicate placements, got "
                                  f"{t.placements} on {mesh}")
    sharded = any(isinstance(pl, Shard) for pl in t.placements)
    return t._local_tensor, (mesh.get_group() if sharded else None)


def group_slices(group: dict[str, Any], params: list[torch.Tensor], grads: list[torch.Tensor]) -> list[GroupSlice]:
    """One slice per kind of parameter in `group`: plain (or replicated) tensors, and sharded ones per process
    group."""
    if not any(issubclass(cls, DTensor) for cls in set(map(type, params))):  # the common case, no work per tensor
        return [GroupSlice(group, params, grads, owners=params)] if params else []
    by_group: dict[Any, GroupSlice] = {}
    for p, g in zip(params, grads):
        p_local, pg = local_tensor(p)
        part = by_group.setdefault(pg, GroupSlice(group, [], [], pg))
        part.owners.append(p)
        part.params.append(p_local)
        part.grads.append(local_tensor(g)[0])
    return list(by_group.values())
