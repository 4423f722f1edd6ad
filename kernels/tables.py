# tables.py — the address tables that let one Triton launch cover a whole list of tensors, and their cache.
#
# What: for a bucket of N tensors (one (device, dtype) group of an op's lists) a Plan holds, on the tensors' device,
#   * addrs  L x int64 [N] data_ptr() of tensor i of list l (params, grads, backups, ... in the op's role order);
#   * numels int64 [N]     elements of tensor i (per micro-batch slice for [k, *p.shape] grads);
#   * unit_tensor / unit_offset int64 [P]: work unit u covers elements [unit_offset[u], unit_offset[u] + CHUNK) of
#     tensor unit_tensor[u]. A kernel runs k * P programs, program pid = j * P + u (micro-batch slice j).
# Why cached: building the tables costs Python work and a host->device copy. A Plan depends only on the tensors'
#   addresses and sizes, so it is kept while those are unchanged (the usual case: params, backups, EMA and grads
#   live across steps) and rebuilt when they change (e.g. zero_grad(set_to_none=True) reallocates the grads). An
#   address freed and reused by a tensor of the same size yields the same, still valid, table.
#   Capturing a CUDA graph needs the tables built beforehand (a warm-up step, as torch.cuda.graphs recommends): a
#   cache miss during capture raises a RuntimeError that says so, rather than capturing a copy from host memory.
# Under TRITON_INTERPRET=1 the tensors are CPU tensors and the tables hold CPU addresses, which the interpreter
# dereferences directly.
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .numerics import CHUNK

MAX_CACHED_PLANS = 64


@dataclass(frozen=True)
class Plan:
    """Device-resident tables of one bucket; see the file header."""

    addrs: tuple[torch.Tensor, ...]  # L int64 [N] tables (views of one packed device buffer)
    numels: torch.Tensor  # int64 [N]
    unit_tensor: torch.Tensor  # int64 [P]
    unit_offset: torch.Tensor  # int64 [P]
    num_units: int  # P

    def addr(self, role: int) -> torch.Tensor:
        """Address table of the list in position `role` of the Plan's construction."""
        return self.addrs[role]


_cache: OrderedDict[tuple, Plan] = OrderedDict()
stats = {"hits": 0, "builds": 0}


def _padded(xs: list[int]) -> list[int]:
    """Pad a section to an even length so that every section of the packed buffer is 16-byte aligned."""
    return xs + [0] * (len(xs) % 2)


def _build(lists: Sequence[Sequence[torch.Tensor]], numels: Sequence[int], device: torch.device) -> Plan:
    unit_tensor: list[int] = []
    unit_offset: list[int] = []
    for i, m in enumerate(numels):
        for start in range(0, m, CHUNK):
            unit_tensor.append(i)
            unit_offset.append(start)
    p = len(unit_tensor)
    sections = [[t.data_ptr() for t in ts] for ts in lists] + [list(numels), unit_tensor, unit_offset]
    packed: list[int] = []
    bounds = []
    for sec in sections:
        bounds.append((len(packed), len(sec)))
        packed += _padded(sec)
    host = torch.tensor(packed if packed else [0, 0], dtype=torch.int64)
    if device.type == "cuda":  # pinned + non_blocking: no host-side wait (the caching host allocator tracks the copy)
        buf = host.pin_memory().to(device, non_blocking=True)
    else:
        buf = host.to(device)
    views = [buf[a : a + m] for a, m in bounds]
    return Plan(addrs=tuple(views[: len(lists)]), numels=views[-3], unit_tensor=views[-2], unit_offset=views[-1],
                num_units=p)


def get_plan(lists: Sequence[Sequence[torch.Tensor]], numels: Sequence[int], device: torch.device) -> Plan:
    """The Plan of these lists (all of length len(numels), contiguous, on `device`), from the cache when the
    tensors' addresses and sizes are those it was built for."""
    key = (device, tuple(numels), tuple(tuple(t.data_ptr() for t in ts) for ts in lists))
    plan = _cache.get(key)
    if plan is not None:
        _cache.move_to_end(key)
        stats["hits"] += 1
        return plan
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "sam_fused (Triton): the address tables of these tensors are not built yet, and building them copies "
            "from the host, which a CUDA graph capture cannot do. Run the step once before capturing (tables are "
            "cached while the tensors stay the same) and use contiguous tensors (non-contiguous ones are staged "
            "through fresh copies, whose addresses change)."
        )
    plan = _build(lists, numels, device)
    stats["builds"] += 1
    _cache[key] = plan
    if len(_cache) > MAX_CACHED_PLANS:
        _cache.popitem(last=False)
    return plan


def clear_cache() -> None:
    """Drop every cached Plan (tests; or to release the tables' memory)."""
    _cache.clear()
