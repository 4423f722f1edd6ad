# checks.py — input validation, the cached host-side plan of a call (prepare), layout staging, the device guard.
#
# Why: the kernels dereference raw addresses from tables, so a wrong shape, dtype or layout would not raise inside a
# kernel, it would read or write the wrong memory. Everything is checked here first and reported as a ValueError /
# TypeError that names the list and the index (docs/DESIGN.md section 5), with the reference's own checks
# (sam_fused/_checks.py) plus the kernels' limits (fp32/bf16/fp16; CUDA, or CPU under the interpreter; one device).
# sam_fused.ops leaves per-tensor validation to the backends, and the ops can be called directly through
# torch.ops.sam_fused_triton, so nothing can be skipped on trust.
# Cost: validating 2000 tensors x 3 lists is a Python pass of ~15 ms, more than a step's kernels. prepare() therefore
# validates on a cache miss only: the key holds, per tensor of every list, exactly what the checks read (data_ptr,
# shape, strides, dtype, device; a tensor whose key cannot be built, e.g. a non-tensor or a sparse one, is validated
# on every call and so refused), plus the op and k. A hit returns the validated buckets with their address tables.
# Layouts: the kernels index every list of a position with the same flat offset 0..n-1 from data_ptr. That is right
# when all tensors of the position are dense and non-overlapping with identical strides (e.g. channels_last params,
# grads and backups): element e sits at the same offset in each, and a sum of squares does not depend on the order.
# Such tensors are used in place; a position whose layouts differ is staged through contiguous copies (copied back
# for mutated lists), and its tables are rebuilt on each call.
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from operator import attrgetter

import torch

from sam_fused import _checks as _shared

from . import tables
from .numerics import STORAGE
from .tables import Plan

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # read at import, when the kernels are decorated


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Context for a call's launches: Triton launches on the CURRENT CUDA device (and its current stream), so it must
    be the tensors' device (tensors on cuda:1 while cuda:0 is current would be an illegal address). It also makes
    the capture check of tables.py look at the right device's stream."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _check_runnable(t: torch.Tensor, where: str) -> None:
    if t.dtype not in STORAGE:
        raise TypeError(
            f"{where} has dtype {t.dtype}; the Triton kernels support float32, bfloat16 and float16 "
            "(other dtypes go through the torch backend)"
        )
    if t.device.type != "cuda" and not (t.device.type == "cpu" and INTERPRET):
        raise ValueError(
            f"{where} is on {t.device}; the Triton kernels run CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)"
        )


def check_lists(
    primary_name: str,
    primary: Sequence[torch.Tensor],
    others: dict[str, Sequence[torch.Tensor] | None],
    lead: dict[str, int] | None = None,
    written: tuple[str, ...] = (),
) -> torch.device | None:
    """The checks of the torch reference (sam_fused/_checks.py: lengths, dense real floating tensors, per-index
    device, dtype and shape, with the extra leading dim lead[name] for the lists named in `lead`), plus what the
    kernels need: a supported dtype, a device they run on, one device for the whole call.
    Returns that device (None for empty lists)."""
    _shared.check_lists(primary_name, primary, others, lead, written)
    return _check_primary(primary_name, primary)


def check_sliced(grads: Sequence[torch.Tensor], k: int) -> torch.device | None:
    """grad_sumsq without params: grads need only the leading micro-batch dim k (when k > 1)."""
    _shared.check_sliced(grads, k)
    return _check_primary("grads", grads)


def _check_primary(name: str, primary: Sequence[torch.Tensor]) -> torch.device | None:
    device = None
    for i, p in enumerate(primary):
        _check_runnable(p, f"{name}[{i}]")
        if device is None:
            device = p.device
        elif p.device != device:
            raise ValueError(f"{name}[{i}] is on {p.device} but {name}[0] is on {device}")
    return device


def check_sumsq(sumsq: object, device: torch.device, numel: int | None, op: str) -> torch.Tensor:
    """sumsq as a contiguous fp64 vector on `device` (a no-op for grad_sumsq's own fp64 result; never a host sync):
    the kernels compute the scale from it in fp64."""
    if not isinstance(sumsq, torch.Tensor):
        raise TypeError(f"{op}: sumsq must be a tensor, got {type(sumsq).__name__}")
    if not sumsq.is_floating_point():
        raise TypeError(f"{op}: sumsq must be a floating-point tensor, got {sumsq.dtype}")
    if sumsq.device != device:
        raise ValueError(f"{op}: sumsq is on {sumsq.device} but the tensors are on {device}")
    if sumsq.numel() < 1 or (numel is not None and sumsq.numel() != numel):
        want = "at least 1 element" if numel is None else f"{numel} elements (one per micro-batch)"
        raise ValueError(f"{op}: sumsq has {sumsq.numel()} elements, expected {want}")
    return sumsq.reshape(-1).to(torch.float64).contiguous()


def check_micro_batches(micro_batches: object) -> int:
    if isinstance(micro_batches, bool) or not isinstance(micro_batches, int) or micro_batches < 1:
        raise ValueError(f"micro_batches must be an integer >= 1, got {micro_batches!r}")
    return micro_batches


# ------------------------------------------------------------------------------------------------ call planning


@dataclass(frozen=True)
class Bucket:
    """The tensors of one dtype of a validated call."""

    dtype: torch.dtype
    idx: tuple[int, ...]  # their positions in the lists
    numels: tuple[int, ...]  # elements per tensor (per micro-batch slice)
    staged: frozenset[int]  # positions whose layouts differ across the lists: run through contiguous copies
    plan: Plan | None  # tables of the tensors themselves; None when staged or when the call has fresh outputs


@dataclass(frozen=True)
class Call:
    device: torch.device
    buckets: tuple[Bucket, ...]


_shape, _dtype, _device = attrgetter("shape"), attrgetter("dtype"), attrgetter("device")


def _list_key(ts: Sequence[torch.Tensor] | None) -> tuple | None:
    """What validation and planning read of a list, per tensor (maps of C-level getters: ~3 ms for 6000 tensors)."""
    if ts is None:
        return None
    return (tuple(map(torch.Tensor.data_ptr, ts)), tuple(map(_shape, ts)), tuple(map(torch.Tensor.stride, ts)),
            tuple(map(_dtype, ts)), tuple(map(_device, ts)))


def _dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: the elements fill [data_ptr, data_ptr + numel) (strides are never negative)."""
    if t.numel() == 0:
        return True
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz > 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _layout(t: torch.Tensor, lead: bool, k: int) -> tuple[int, ...] | None:
    """Strides that decide where element e of slice j is, or None when the kernels cannot index t in place (sizes
    are equal within a position after validation; strides of size-1 dims never matter)."""
    if not _dense(t):
        return None
    shape, stride = (t.shape[1:], t.stride()[1:]) if lead else (t.shape, t.stride())
    if lead and k > 1 and t.numel() and t.stride(0) != t.numel() // k:
        return None  # slice j must be the block [j * n, (j + 1) * n)
    return tuple(st for sz, st in zip(shape, stride) if sz > 1)


def _mismatched(position: list[tuple[torch.Tensor, bool]], k: int) -> bool:
    """Whether the kernels cannot index these tensors of one position (tensor, has lead dim) in place."""
    if all(t.is_contiguous() for t, _ in position):  # the common case, without the per-dim work
        return False
    layouts = {_layout(t, lead, k) for t, lead in position}
    return None in layouts or len(layouts) != 1


def prepare(op: str, lists: Sequence[Sequence[torch.Tensor] | None], validate: Callable[[], torch.device | None],
            k: int = 1, lead: Sequence[bool] = (), tables_of_inputs: bool = True) -> Call | None:
    """The validated buckets of a call, from the cache when its key (see the file header) was seen before; else
    validate() (raises on bad input; returns the device, None when the lists are empty) and plan the buckets.
    lists: the op's lists in table order (None for an absent optional list, last); lists[0] is the one bucketed by
    dtype; lead[l]: list l has the leading micro-batch dim k. tables_of_inputs=False when the tables also hold the
    call's fresh outputs (perturb_batched): then each call gets its tables from tables.get_plan."""
    lead = tuple(lead) or (False,) * len(lists)
    try:
        key = ("call", op, k, tuple(_list_key(ts) for ts in lists))
    except (TypeError, RuntimeError, AttributeError):  # not a tensor, no storage (sparse, ...): validate() refuses it
        key = None
    if key is not None and lists[0]:
        call = tables.lookup(key, lists[0][0].device)
        if call is not None:
            assert isinstance(call, Call)
            return call
    device = validate()
    tables.stats["validations"] += 1
    if device is None:
        return None
    present = [(ts, ld) for ts, ld in zip(lists, lead) if ts is not None]
    buckets = []
    for dtype, idx in by_dtype(lists[0]).items():
        numels = tuple(lists[0][i].numel() // (k if lead[0] else 1) for i in idx)
        staged = frozenset(i for i in idx if _mismatched([(ts[i], ld) for ts, ld in present], k))
        plan = None
        if tables_of_inputs and not staged:
            plan = tables.build([[ts[i] for i in idx] for ts, _ in present], numels, device)
        buckets.append(Bucket(dtype, tuple(idx), numels, staged, plan))
    call = Call(device, tuple(buckets))
    if key is not None:
        tables.store(key, call)
    return call


def by_dtype(ts: Sequence[torch.Tensor]) -> dict[torch.dtype, list[int]]:
    """Indices grouped by dtype, in order of first appearance: one launch per (device, dtype) bucket."""
    groups: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(ts):
        groups.setdefault(t.dtype, []).append(i)
    return groups


class Staged:
    """The tensors of a bucket as the kernels index them: the tensor itself, or a contiguous copy at a staged
    position whose tensor is not contiguous. write_back() copies the copies' results into the originals."""

    def __init__(self, ts: Sequence[torch.Tensor], bucket: Bucket) -> None:
        self.originals = [ts[i] for i in bucket.idx]
        self.tensors = [t.contiguous() if i in bucket.staged else t for i, t in zip(bucket.idx, self.originals)]

    def write_back(self) -> None:
        for orig, t in zip(self.originals, self.tensors):
            if t is not orig:
                orig.copy_(t)


def operands(call: Call, bucket: Bucket, lists: Sequence[Sequence[torch.Tensor] | None],
             written: Sequence[bool]) -> tuple[Plan, Callable[[], None]]:
    """The bucket's tables and a function that copies staged results back into the lists marked `written` (nothing
    to copy when the bucket's own tables index the tensors in place)."""
    if bucket.plan is not None:
        return bucket.plan, _nothing
    staged = [(Staged(ts, bucket), w) for ts, w in zip(lists, written) if ts is not None]
    plan = tables.get_plan([s.tensors for s, _ in staged], bucket.numels, call.device)

    def write_back() -> None:
        for s, w in staged:
            if w:
                s.write_back()

    return plan, write_back


def _nothing() -> None:
    pass
