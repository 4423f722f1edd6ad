"""First-use self-check of a backend's op table against the torch reference (docs/DESIGN.md section 4).

No GPU is available to this project's CI, so a GPU backend picked by ``auto`` proves itself on each device and dtype
it meets: every op runs on a random tensor list and must match the reference (restore bit-exact). A mismatch names
the op; the dispatcher then warns once and falls back for that (device, dtype) for the rest of the process.

The list holds what the kernels handle differently: odd sizes, a tensor of several chunks, views that start one
element into their buffer (misaligned for vector loads), and more tensors than one launch of the CUDA kernels holds
(1,263 at most), so that the continuation across launches runs too.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from . import reference

# A backend's op table (_backends.op_table): an object whose attributes are the ops of _registry.SCHEMAS, called with
# their positional arguments on lists of one device and dtype. The check calls it directly, not through ops.py's
# dispatch, so that this module needs neither ops nor _backends (which calls it).
OpTable = Any

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SHAPES = [(0,), (1,), (7,), (33, 5), (3, 4, 5, 6), (70_001,)]  # 70,001: several chunks on every backend
MANY = 1_300  # tiny tensors: more than one CUDA launch takes for any list depth (mta_planner.h max_tensors_for)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype in (torch.float32, torch.float64):  # fp32 weights, fp64 sums of squares (summed in another order)
        return torch.allclose(a, b, rtol=1e-5, atol=1e-6, equal_nan=True)
    return torch.allclose(a.float(), b.float(), rtol=2 * torch.finfo(a.dtype).eps, atol=1e-6, equal_nan=True)


def _flat(ts: list[torch.Tensor]) -> torch.Tensor:
    """One tensor of all values: one comparison instead of ~1,300 (the check's host time is mostly per tensor)."""
    return torch.cat([t.reshape(-1) for t in ts])


def _all_close(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> bool:
    return _close(_flat(xs), _flat(ys))


def _all_equal(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> bool:
    return torch.equal(_flat(xs), _flat(ys))


def _shapes() -> list[tuple[int, ...]]:
    return SHAPES + [(i % 3 + 1,) for i in range(MANY)]


@functools.cache
def _strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    out, step = [], 1
    for d in reversed(shape):
        out.append(step)
        step *= max(d, 1)
    return tuple(reversed(out))


def _offsets(shapes: list[tuple[int, ...]]) -> list[int]:
    """Storage offsets of contiguous tensors packed in one buffer: even positions start on a 64-element boundary,
    odd ones one element past it (misaligned for vector loads)."""
    out, pos = [], 0
    for i, shape in enumerate(shapes):
        out.append((pos + 63) // 64 * 64 + i % 2)
        pos = out[-1] + math.prod(shape)
    return out


def _extent(ts: list[torch.Tensor]) -> int:
    return max(t.storage_offset() + t.numel() for t in ts)


def _lists(device: torch.device, dtype: torch.dtype, k: int = 1, seed: int = 0) -> tuple[list, list]:
    """(params, grads) with random values, each list views of one buffer at _offsets: one buffer keeps the
    check's host time low with ~1,300 tensors."""
    gen = torch.Generator().manual_seed(seed)
    shapes = _shapes()
    lists = []
    for ss in (shapes, [(k, *s) if k > 1 else s for s in shapes]):
        offsets = _offsets(ss)
        buf = torch.randn(offsets[-1] + math.prod(ss[-1]), generator=gen).to(device, dtype)
        lists.append([buf.as_strided(s, _strides(s), o) for s, o in zip(ss, offsets)])
    return lists[0], lists[1]


def _like(ts: list[torch.Tensor], values: bool) -> list[torch.Tensor]:
    """The same views (shapes, strides, storage offsets) of a new buffer, a copy of the old one when `values`: the
    op under test gets the same layout, misalignment included. `ts` share one buffer (made by _lists)."""
    whole = ts[0].as_strided((_extent(ts),), (1,), 0)
    buf = whole.clone() if values else torch.empty_like(whole)
    return [buf.as_strided(t.shape, t.stride(), t.storage_offset()) for t in ts]


RHO, EPS, ETA = 0.05, 1e-12, 0.01


def _check_perturb(table: OpTable, params: list, grads: list) -> str | None:
    for adaptive in (False, True):
        args = (grads, params if adaptive else None, ETA, 1)
        s_ref, s_new = reference.grad_sumsq(*args), table.grad_sumsq(*args)
        if not _close(s_new, s_ref):
            return f"grad_sumsq(adaptive={adaptive})"
        w_ref, w_new = _like(params, True), _like(params, True)
        b_ref, b_new = _like(params, False), _like(params, False)
        reference.perturb_(w_ref, grads, b_ref, s_ref, RHO, EPS, adaptive, ETA, True)
        table.perturb_(w_new, grads, b_new, s_ref, RHO, EPS, adaptive, ETA, True)
        if not _all_equal(b_new, params) or not _all_close(w_new, w_ref):
            return f"perturb_(adaptive={adaptive})"
        table.restore_(w_new, b_new)
        if not _all_equal(w_new, params):
            return "restore_ (not bit-exact)"
    return None


def _check_batched(table: OpTable, params: list, device: torch.device, dtype: torch.dtype) -> str | None:
    k = 2
    _, kgrads = _lists(device, dtype, k, seed=1)
    s_ref = reference.grad_sumsq(kgrads, None, 0.0, k)
    if not _close(table.grad_sumsq(kgrads, None, 0.0, k), s_ref):
        return "grad_sumsq(micro_batches=2)"
    out_ref = reference.perturb_batched(params, kgrads, s_ref, RHO, EPS, False, 0.0, True)
    out_new = table.perturb_batched(params, kgrads, s_ref, RHO, EPS, False, 0.0, True)
    if not _all_close(out_new, out_ref):
        return "perturb_batched"
    return None


def _check_fsam(table: OpTable, params: list, grads: list) -> str | None:
    for first in (True, False):
        g_ref, g_new = _like(grads, True), _like(grads, True)
        m_ref, m_new = _like(params, True), _like(params, True)
        s_ref = reference.fsam_direction_(g_ref, m_ref, 1.0, 0.9, first, None, 0.0)
        s_new = table.fsam_direction_(g_new, m_new, 1.0, 0.9, first, None, 0.0)
        if not (_close(s_new, s_ref) and _all_close(g_new + m_new, g_ref + m_ref)):
            return f"fsam_direction_(first={first})"
    return None


def _check_dtype(table: OpTable, device: torch.device, dtype: torch.dtype) -> str | None:
    params, grads = _lists(device, dtype)
    return (_check_perturb(table, params, grads) or _check_batched(table, params, device, dtype)
            or _check_fsam(table, params, grads))


def self_check(table: OpTable, device: torch.device, dtype: torch.dtype | None = None) -> str | None:
    """None if the ops of `table` match the reference on `device` for `dtype` (default: fp32, bf16 and fp16), else a
    short description of the first mismatch. It synchronizes with the host: do not call it during CUDA-graph
    capture."""
    try:
        for dt in DTYPES if dtype is None else (dtype,):
            failure = _check_dtype(table, device, dt)
            if failure:
                return f"{failure}, {dt}"
    except Exception as e:  # a kernel that cannot even run here is a failed check, not a crash of the user's step
        return f"raised {type(e).__name__}: {e}"
    return None
