"""Public op layer (DESIGN section 3): validate, group into (device, dtype) buckets, run each bucket on a backend.

One bucket is one call of the chosen backend's op, i.e. one fused launch. Data-dependent scalars (sums of squares)
stay on the device; nothing here synchronizes with the host.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from . import _registry  # noqa: F401  (defines torch.ops.sam_fused.*)
from ._backends import choose, op_table

Tensors = list[torch.Tensor]
Bucket = tuple[torch.device, torch.dtype]


def _check_grad(g: torch.Tensor, where: str) -> None:
    if g.is_sparse or g.layout != torch.strided:
        raise TypeError(f"{where} is a sparse/non-strided tensor ({g.layout}); sam_fused needs dense gradients")
    if g.is_complex():
        raise TypeError(f"{where} is complex ({g.dtype}); sam_fused supports real floating-point tensors only")
    if not g.is_floating_point():
        raise TypeError(f"{where} has dtype {g.dtype}; expected a floating-point tensor")


def _buckets(primary: Tensors, others: dict[str, Tensors], lead: int | None = None) -> dict[Bucket, list[int]]:
    """Indices of `primary` grouped by (device, dtype), after checking every list against it.

    `others` maps a list's name to the list; each entry must match primary's device, dtype and shape
    (with a leading micro-batch dim `lead` for lists named 'grads' when lead is not None).
    """
    n = len(primary)
    for name, ts in others.items():
        if len(ts) != n:
            raise ValueError(f"{name} has {len(ts)} tensors but params has {n}")
    groups: dict[Bucket, list[int]] = defaultdict(list)
    for i, p in enumerate(primary):
        _check_grad(p, f"params[{i}]")
        for name, ts in others.items():
            t = ts[i]
            _check_grad(t, f"{name}[{i}]")
            shape = (lead, *p.shape) if (lead is not None and name == "grads") else p.shape
            if t.device != p.device:
                raise ValueError(f"{name}[{i}] is on {t.device} but params[{i}] is on {p.device}")
            if t.dtype != p.dtype:
                raise ValueError(f"{name}[{i}] has dtype {t.dtype} but params[{i}] has {p.dtype}")
            if t.shape != shape:
                raise ValueError(f"{name}[{i}] has shape {tuple(t.shape)}, expected {tuple(shape)}")
        groups[(p.device, p.dtype)].append(i)
    return groups


def _pick(ts: Tensors | None, idx: list[int]) -> Tensors | None:
    return None if ts is None else [ts[i] for i in idx]


def _check_k(micro_batches: int) -> None:
    if not isinstance(micro_batches, int) or micro_batches < 1:
        raise ValueError(f"micro_batches must be an integer >= 1, got {micro_batches!r}")


def _check_rho(rho: float) -> None:
    if not rho >= 0.0:
        raise ValueError(f"rho must be >= 0, got {rho}")


def grad_sumsq(
    grads: Tensors, params: Tensors | None = None, eta: float = 0.0, micro_batches: int = 1, backend: str = "auto"
) -> torch.Tensor:
    """fp32 [k]: sum over tensors of (T*g)^2 per micro-batch slice; T = |params| + eta if params is given, else 1."""
    _check_k(micro_batches)
    k = micro_batches
    if params is None:
        groups = _buckets(grads, {}) if k == 1 else _buckets([g[0] for g in grads], {})  # [0]: one slice's shape
        if k > 1:
            for i, g in enumerate(grads):
                if g.dim() == 0 or g.shape[0] != k:
                    raise ValueError(f"grads[{i}] has shape {tuple(g.shape)}; expected leading dim {k}")
    else:
        groups = _buckets(params, {"grads": grads}, lead=k if k > 1 else None)
    if not groups:
        device = grads[0].device if grads else torch.device("cpu")
        return torch.zeros(k, dtype=torch.float32, device=device)
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
    for (device, dtype), idx in _buckets(params, {"grads": grads, "backups": backups}).items():
        op = op_table(choose(backend, device, dtype)).perturb_
        op(_pick(params, idx), _pick(grads, idx), _pick(backups, idx), sumsq.to(device, non_blocking=True),
           rho, eps, adaptive, eta, normalize)


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
    k = sumsq.numel()
    out: Tensors = [None] * len(params)  # type: ignore[list-item]
    for (device, dtype), idx in _buckets(params, {"grads": grads}, lead=k).items():
        op = op_table(choose(backend, device, dtype)).perturb_batched
        res = op(_pick(params, idx), _pick(grads, idx), sumsq.to(device, non_blocking=True),
                 rho, eps, adaptive, eta, normalize)
        for i, r in zip(idx, res):
            out[i] = r
    return out


def restore_(params: Tensors, backups: Tensors, backend: str = "auto") -> None:
    """w <- backup, bit-exact."""
    for (device, dtype), idx in _buckets(params, {"backups": backups}).items():
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
    """F-SAM direction in place (grads <- d, ema updated); returns fp32 [1] sum of (T*d)^2."""
    if not 0.0 <= lmbda <= 1.0:
        raise ValueError(f"lmbda must be in [0, 1], got {lmbda}")
    others = {"ema": ema} if params is None else {"ema": ema, "params": params}
    out = None
    for (device, dtype), idx in _buckets(grads, others).items():
        op = op_table(choose(backend, device, dtype)).fsam_direction_
        part = op(_pick(grads, idx), _pick(ema, idx), sigma, lmbda, first, _pick(params, idx), eta)
        out = part if out is None else out + part.to(out.device, non_blocking=True)
    if out is None:
        return torch.zeros(1, dtype=torch.float32, device=grads[0].device if grads else "cpu")
    return out
