# checks.py — input validation, contiguous staging and dtype bucketing for the Triton ops.
#
# Why: the kernels dereference raw addresses from tables, so a wrong shape, dtype or layout would not raise inside a
# kernel, it would read or write the wrong memory. Everything is checked here first and reported as a ValueError /
# TypeError that names the list and the index (docs/DESIGN.md section 5), with the reference's own checks
# (sam_fused/_checks.py) plus the kernels' limits (fp32/bf16/fp16; CUDA, or CPU under the interpreter; one device).
# sam_fused.ops leaves per-tensor validation to the backends, and the ops can be called directly through
# torch.ops.sam_fused_triton, so these checks run on every call.
# Non-contiguous tensors are run through contiguous copies; the copies of mutated arguments are copied back.
from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from sam_fused import _checks as _shared

from .numerics import STORAGE

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # read at import, when the kernels are decorated


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


def by_dtype(ts: Sequence[torch.Tensor]) -> dict[torch.dtype, list[int]]:
    """Indices grouped by dtype, in order of first appearance: one launch per (device, dtype) bucket."""
    groups: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(ts):
        groups.setdefault(t.dtype, []).append(i)
    return groups


class Staged:
    """Contiguous stand-ins for a list: the tensor itself when contiguous, else a contiguous copy. For a mutated list,
    write_back() copies the stand-ins' results into the original non-contiguous tensors."""

    def __init__(self, ts: Sequence[torch.Tensor], idx: Sequence[int]) -> None:
        self.originals = [ts[i] for i in idx]
        self.tensors = [t if t.is_contiguous() else t.contiguous() for t in self.originals]

    def write_back(self) -> None:
        for orig, t in zip(self.originals, self.tensors):
            if t is not orig:
                orig.copy_(t)
