"""Public op layer (docs/DESIGN.md section 3): group into (device, dtype) buckets, run each bucket on a backend.

One bucket is one call of the chosen backend's op, i.e. one fused launch. Data-dependent scalars (sums of squares)
stay on the device; nothing here synchronizes with the host.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch

from . import _registry, reference  # noqa: F401  (_registry defines torch.ops.sam_fused.*)
from ._backends import choose, entry, op_table

Tensors = list[torch.Tensor]
Bucket = tuple[torch.device, torch.dtype]


def _buckets(name: str, primary: Tensors, others: dict[str, Tensors | None]) -> dict[Bucket, list[int] | None]:
    """Indices of `primary` grouped by (device, dtype); None stands for "all of them" (the common single bucket).

    This runs every step over every parameter, so it looks only at what grouping needs, with the cheapest per-tensor
    tests first (2000 tensors: ~0.2 ms, against ~1 ms for a (device, dtype) key per tensor). The backend op
    validates the other lists against `primary` tensor by tensor (device, dtype, shape; the fake impls too, for a
    meta tensor that would route the call to them) and raises ValueError / TypeError naming the list and index.
    """
    n = len(primary)
    for other, ts in others.items():
        if ts is not None and len(ts) != n:
            raise ValueError(f"{other} has {len(ts)} tensors but {name} has {n}")
    if n == 0:
        return {}
    device, dtype = primary[0].device, primary[0].dtype
    if device.type == "cpu":  # t.is_cpu: no torch.device object per tensor
        single = all(t.is_cpu and t.dtype == dtype for t in primary)
    else:
        single = all(t.device == device and t.dtype == dtype for t in primary)
    if single:
        return {(device, dtype): None}
    groups: dict[Bucket, list[int]] = defaultdict(list)
    for i, t in enumerate(primary):
        groups[(t.device, t.dtype)].append(i)
    return dict(groups)


def _whole_lists_table(primary: Tensors, backend: str) -> object | None:
    """The op table of the first tensor's backend when it takes the lists whole, without the per-tensor grouping of
    _buckets (Backend.validates_whole_lists: the C++ CPU ops check every tensor's device and dtype against the first
    one's, raising ValueError / TypeError before they write anything); else None. A list that op refuses is then
    grouped after all (_whole_or_buckets)."""
    if not primary:
        return None
    backend_entry = entry(choose(backend, primary[0].device, primary[0].dtype))
    return backend_entry.op_table() if backend_entry.validates_whole_lists else None


def _whole_or_buckets(primary: Tensors, backend: str, whole: Callable[[object], object]) -> tuple[bool, object]:
    """(True, whole(table)) when `whole` ran the lists whole on the op table of _whole_lists_table; (False, None)
    when the caller must group the lists into buckets: that backend does not take them whole, or its op refused
    them (mixed dtypes, or an error the bucket's own op will name again)."""
    table = _whole_lists_table(primary, backend)
    if table is not None:
        try:
            return True, whole(table)
        except (ValueError, TypeError):
            pass
    return False, None


def _pick(ts: Tensors | None, idx: list[int] | None) -> Tensors | None:
    return ts if ts is None or idx is None else [ts[i] for i in idx]


def _sumsq_for(sumsq: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The sum of squares on a bucket's device, in fp64 (a no-op for grad_sumsq's own result on that device)."""
    return sumsq.to(device, reference.SUMSQ_DTYPE, non_blocking=True)


def _check_k(micro_batches: int) -> None:
    if not isinstance(micro_batches, int) or micro_batches < 1:
        raise ValueError(f"micro_batches must be an integer >= 1, got {micro_batches!r}")


FP32_MAX = torch.finfo(torch.float32).max  # scalars reach the kernels as fp32: beyond it they become inf


def _check_rho(rho: float) -> None:
    if not 0.0 <= rho <= FP32_MAX:  # an inf rho would write inf weights
        raise ValueError(f"rho must be a finite number >= 0 within the fp32 range, got {rho}")


def grad_sumsq(
    grads: Tensors, params: Tensors | None = None, eta: float = 0.0, micro_batches: int = 1, backend: str = "auto"
) -> torch.Tensor:
    """fp64 [k]: sum over tensors of (T*g)^2 per micro-batch slice; T = |params| + eta if params is given, else 1.
    Every term is squared in fp64, so the sum of any finite fp32/bf16/fp16 gradient is finite."""
    _check_k(micro_batches)
    k = micro_batches
    done, out = _whole_or_buckets(grads, backend, lambda table: table.grad_sumsq(grads, params, eta, k))
    if done:
        return out
    groups = _buckets("grads", grads, {"params": params})
    if not groups:
        device = grads[0].device if grads else torch.device("cpu")
        return torch.zeros(k, dtype=reference.SUMSQ_DTYPE, device=device)
    out = None
    for (device, dtype), idx in groups.items():
        op = op_table(choose(backend, device, dtype)).grad_sumsq
        part = op(_pick(grads, idx), _pick(params, idx), eta, k)
        out = part if out is None else out + part.to(out.device, non_blocking=True)
    return out


def perturb_(
    params: Tensors,
    grads: Tensors,
    backups: Tensors,
    sumsq: torch.Tensor,
    rho: float,
    eps: float = 1e-12,
    adaptive: bool = False,
    eta: float = 0.0,
    normalize: bool = True,
    backend: str = "auto",
) -> None:
    """backup <- w; w <- w + rho * T^2 * g / (sqrt(sumsq) + eps) (no division if not normalize); no-op if sumsq is
    not finite."""
    _check_rho(rho)
    if _whole_or_buckets(params, backend, lambda table: table.perturb_(
            params, grads, backups, _sumsq_for(sumsq, params[0].device), rho, eps, adaptive, eta, normalize))[0]:
        return
    done: list[tuple[str, list[int] | None]] = []  # (backend, indices) of the buckets perturbed so far
    try:
        for (device, dtype), idx in _buckets("params", params, {"grads": grads, "backups": backups}).items():
            name = choose(backend, device, dtype)
            op_table(name).perturb_(_pick(params, idx), _pick(grads, idx), _pick(backups, idx),
                                    _sumsq_for(sumsq, device), rho, eps, adaptive, eta, normalize)
            done.append((name, idx))
    except Exception:
        # Every backend validates a bucket before writing it, so only the buckets before the failing one were
        # written: put their weights back, and the call leaves nothing perturbed.
        for name, idx in done:
            op_table(name).restore_(_pick(params, idx), _pick(backups, idx))
        raise


def perturb_batched(
    params: Tensors,
    grads: Tensors,
    sumsq: torch.Tensor,
    rho: float,
    eps: float = 1e-12,
    adaptive: bool = False,
    eta: float = 0.0,
    normalize: bool = True,
    backend: str = "auto",
) -> Tensors:
    """out[i][j] = w_i + rho * T^2 * g_i[j] / (sqrt(sumsq[j]) + eps): k perturbed copies of every weight."""
    _check_rho(rho)
    out: Tensors = [None] * len(params)  # type: ignore[list-item]
    for (device, dtype), idx in _buckets("params", params, {"grads": grads}).items():
        op = op_table(choose(backend, device, dtype)).perturb_batched
        res = op(_pick(params, idx), _pick(grads, idx), _sumsq_for(sumsq, device),
                 rho, eps, adaptive, eta, normalize)
        for i, r in zip(range(len(params)) if idx is None else idx, res):
            out[i] = r
    return out


def restore_(params: Tensors, backups: Tensors, backend: str = "auto") -> None:
    """w <- backup, bit-exact."""
    if _whole_or_buckets(params, backend, lambda table: table.restore_(params, backups))[0]:
        return
    for (device, dtype), idx in _buckets("params", params, {"backups": backups}).items():
        op_table(choose(backend, device, dtype)).restore_(_pick(params, idx), _pick(backups, idx))


def fsam_direction_(
    grads: Tensors,
    ema: Tensors,
    sigma: float,
    lmbda: float,
    first: bool,
    params: Tensors | None = None,
    eta: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """F-SAM direction in place (grads <- d, ema updated); returns fp64 [1] sum of (T*d)^2."""
    if not 0.0 <= lmbda <= 1.0:
        raise ValueError(f"lmbda must be in [0, 1], got {lmbda}")
    others = {"ema": ema} if params is None else {"ema": ema, "params": params}
    out = None
    for (device, dtype), idx in _buckets("grads", grads, others).items():
        op = op_table(choose(backend, device, dtype)).fsam_direction_
        part = op(_pick(grads, idx), _pick(ema, idx), sigma, lmbda, first, _pick(params, idx), eta)
        out = part if out is None else out + part.to(out.device, non_blocking=True)
    if out is None:
        return torch.zeros(1, dtype=reference.SUMSQ_DTYPE, device=grads[0].device if grads else "cpu")
    return out


def restore_sgd_(
    params: Tensors,
    backups: Tensors,
    grads: Tensors,
    momentum_buffers: Tensors,
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    backend: str = "auto",
) -> None:
    """w <- backup, then torch.optim.SGD's update of w with grads and momentum_buffers (one per param when
    momentum != 0, else []), bit-for-bit like restore_ followed by torch's step. Fused (one pass) by a backend for the
    dtypes of its Backend.fused_sgd_dtypes (the cpu backend, fp32); elsewhere the reference runs the two steps."""
    others = {"backups": backups, "grads": grads, "momentum_buffers": momentum_buffers if momentum != 0 else None}
    for (device, dtype), idx in _buckets("params", params, others).items():
        backend_entry = entry(choose(backend, device, dtype))
        fused = dtype in backend_entry.fused_sgd_dtypes
        op = backend_entry.op_table().restore_sgd_ if fused else reference.restore_sgd_
        op(_pick(params, idx), _pick(backups, idx), _pick(grads, idx),
           _pick(momentum_buffers, idx) if momentum != 0 else [], lr, weight_decay, momentum, dampening, nesterov)
