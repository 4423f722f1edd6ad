# tables.py — the address tables that let one Triton launch cover a whole list of tensors, and the host-side cache.
#
# What: for a bucket of N tensors (one (device, dtype) group of an op's lists) a Plan holds, on the tensors' device,
#   * addrs  L x int64 [N] data_ptr() of tensor i of list l (params, grads, backups, ... in the op's role order);
#   * numels int64 [N]     elements of tensor i (per micro-batch slice for [k, *p.shape] grads);
#   * unit_tensor / unit_offset int64 [P]: work unit u covers elements [unit_offset[u], unit_offset[u] + CHUNK) of
#     tensor unit_tensor[u]. A kernel runs k * P programs, program pid = j * P + u (micro-batch slice j).
# Built with tensor ops (cumsum / repeat_interleave), not a Python loop per unit: ~1e9 parameters are 244k units.
# Why cached: building the tables costs host work and a host->device copy, and validating the lists (checks.py)
# costs a Python pass over every tensor. Both depend only on what the cache keys hold (addresses, shapes, strides,
# dtypes, devices), so they are kept while those are unchanged (the usual case: params, backups, EMA and grads live
# across steps) and redone when they change (e.g. zero_grad(set_to_none=True) reallocates the grads).
# One LRU cache of MAX_CACHED entries holds both the validated calls of checks.prepare (with their Plans) and the
# Plans of staged tensors (get_plan, keyed by addresses).
# CUDA graphs: capture needs the tables built beforehand (a warm-up step, as torch.cuda.graphs recommends): a build
#   during capture raises a RuntimeError that says so, rather than capturing a copy from host memory. An entry used
#   during a capture is PINNED: the graph replays its device tables whenever it is launched, and when the graph is
#   freed cannot be observed from here, so a pinned entry is never evicted; clear_cache() drops it (call it only
#   once the graphs that used the tables are gone). The pinned set is bounded by the distinct lists captured.
# Under TRITON_INTERPRET=1 the tensors are CPU tensors and the tables hold CPU addresses, which the interpreter
# dereferences directly.
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

from .numerics import CHUNK

MAX_CACHED = 64  # unpinned entries kept (least recently used evicted first)


@dataclass(frozen=True)
class Plan:
    """Device-resident tables of one bucket; see the file header."""

    addrs: tuple[torch.Tensor, ...]  # L int64 [N] tables (views of one packed device buffer)
    numels: torch.Tensor  # int64 [N]
    unit_tensor: torch.Tensor  # int64 [P]
    unit_offset: torch.Tensor  # int64 [P]
    num_units: int  # P
    vec: int  # elements per 16-byte vector access when the bucket is aligned (numerics.py), else 1

    def addr(self, role: int) -> torch.Tensor:
        """Address table of the list in position `role` of the Plan's construction."""
        return self.addrs[role]


_cache: OrderedDict[Hashable, object] = OrderedDict()
_pinned: dict[Hashable, object] = {}
stats = {"hits": 0, "builds": 0, "validations": 0}


def capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured on the current stream of `device` (not of the current device)."""
    if device.type != "cuda":
        return False
    with torch.cuda.device(device):
        return torch.cuda.is_current_stream_capturing()


def lookup(key: Hashable, device: torch.device) -> object | None:
    """The cached entry of `key` (pinned when used during a capture), or None."""
    entry = _pinned.get(key)
    if entry is None:
        entry = _cache.get(key)
        if entry is None:
            return None
        if capturing(device):  # the graph being captured reads these tables at every replay
            _pinned[key] = _cache.pop(key)
        else:
            _cache.move_to_end(key)
    stats["hits"] += 1
    return entry


def store(key: Hashable, entry: object) -> None:
    _cache[key] = entry
    if len(_cache) > MAX_CACHED:
        _cache.popitem(last=False)


def _padded(x: torch.Tensor) -> torch.Tensor:
    """Pad a section to an even length so that every section of the packed buffer is 16-byte aligned."""
    return torch.cat([x, x.new_zeros(x.numel() % 2)])


def build(lists: Sequence[Sequence[torch.Tensor]], numels: Sequence[int], device: torch.device) -> Plan:
    """The Plan of these lists (all of length len(numels), laid out as the kernels index them, on `device`)."""
    if capturing(device):
        raise RuntimeError(
            "sam_fused (Triton): the address tables of these tensors are not built yet, and building them copies "
            "from the host, which a CUDA graph capture cannot do. Run the step once before capturing (tables are "
            "cached while the tensors stay the same) and keep each position's tensors in one dense layout (others are "
            "staged through fresh copies, whose addresses change)."
        )
    n = torch.tensor(list(numels), dtype=torch.int64)
    units = (n + (CHUNK - 1)) // CHUNK  # work units per tensor
    unit_tensor = torch.repeat_interleave(torch.arange(n.numel()), units)
    first = torch.cumsum(units, 0) - units  # index of each tensor's first unit
    unit_offset = (torch.arange(unit_tensor.numel()) - first[unit_tensor]) * CHUNK
    sections = [torch.tensor([t.data_ptr() for t in ts], dtype=torch.int64) for ts in lists]
    vec = 16 // lists[0][0].element_size() if n.numel() else 1
    used = n > 0  # empty tensors are never accessed (their data_ptr may be anything)
    if not all(bool((s[used] % 16 == 0).all()) for s in sections) or bool((n % vec != 0).any()):
        vec = 1
    sections += [n, unit_tensor, unit_offset]
    host = torch.cat([_padded(s) for s in sections] + [torch.zeros(2, dtype=torch.int64)])  # never empty
    if device.type == "cuda":  # pinned + non_blocking: no host-side wait (the caching host allocator tracks the copy)
        buf = host.pin_memory().to(device, non_blocking=True)
    else:
        buf = host.to(device)
    views, at = [], 0
    for s in sections:
        views.append(buf[at : at + s.numel()])
        at += s.numel() + s.numel() % 2
    stats["builds"] += 1
    return Plan(addrs=tuple(views[: len(lists)]), numels=views[-3], unit_tensor=views[-2], unit_offset=views[-1],
                num_units=unit_tensor.numel(), vec=vec)


def get_plan(lists: Sequence[Sequence[torch.Tensor]], numels: Sequence[int], device: torch.device) -> Plan:
    """The Plan of these lists, from the cache when the tensors' addresses and sizes are those it was built for
    (for tensors that a validated call's own Plan cannot cover: staged copies, fresh outputs)."""
    key = ("plan", device, tuple(numels), tuple(tuple(t.data_ptr() for t in ts) for ts in lists))
    plan = lookup(key, device)
    if plan is None:
        plan = build(lists, numels, device)
        store(key, plan)
    assert isinstance(plan, Plan)
    return plan


def clear_cache() -> None:
    """Drop every cached entry, pinned ones included (tests; or to release the tables' memory once no captured CUDA
    graph uses them)."""
    _cache.clear()
    _pinned.clear()
