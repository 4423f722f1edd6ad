"""The `torch` backend: pure-PyTorch reference of every op (docs/DESIGN.md section 3).

Every fused backend is validated against these functions. They favour clarity over speed, but use
``torch._foreach_*`` where the math is elementwise so that they are a reasonable fallback. Arithmetic is in fp32
whatever the storage dtype, except fp64 tensors, which are computed in fp64 (update, EMA); results are rounded to the
storage dtype once, at the store. Sums of squares are fp64 for every dtype: each term g (or g * t) is taken to fp64
and squared there, so a finite fp32/bf16/fp16 gradient always has a finite norm; the scale is computed in fp64 from
it and rounded once to the weights' math dtype.

Canonical per-element formulas (the compiled kernels use the same order of operations, csrc/shared/sam_math.h):
    t     = |w| + eta                   (adaptive only; t = 1 otherwise; in the weights' math dtype)
    sumsq = sum of (double(g) * double(t))^2, in fp64
    scale = rho / (sqrt(sumsq) + eps)   in fp64, then rounded to the math dtype (scale = rho when normalize=False);
                                        0 if sumsq is not finite
    w'    = w + scale * (t * t * g)     (w' = w when sumsq is not finite)
"""

from __future__ import annotations

import torch

from . import _checks

Tensors = list[torch.Tensor]


def math_dtype(t: torch.Tensor) -> torch.dtype:
    """The arithmetic of a tensor's elements: fp64 for fp64 storage (its users compare against fp64 references), fp32
    for every other dtype."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


SUMSQ_DTYPE = torch.float64  # grad_sumsq's and fsam_direction_'s result, for every input dtype


def _wide(ts: Tensors) -> Tensors:
    return [t.to(math_dtype(t)) for t in ts]  # the tensor itself when it is already in its math dtype


def _by_math_dtype(ts: Tensors) -> list[list[int]]:
    groups: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(ts):
        groups.setdefault(math_dtype(t), []).append(i)
    return list(groups.values())


def _t_factor(params: Tensors, eta: float) -> Tensors:
    """t = |w| + eta in each tensor's math dtype."""
    return torch._foreach_add(torch._foreach_abs(_wide(params)), eta)


def perturb_scale(sumsq: torch.Tensor, rho: float, eps: float, normalize: bool,
                  dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, finite) as device tensors of `dtype` (fp32, or fp64 for fp64 weights) shaped like sumsq; no host
    sync. The scale is computed in fp64 and rounded once to `dtype`, as the kernels do."""
    sumsq = sumsq.to(torch.float64)
    finite = torch.isfinite(sumsq)
    rho_t = torch.full_like(sumsq, rho)
    scale = rho_t / (sumsq.sqrt() + eps) if normalize else rho_t  # a true division (rho / t is rho * (1 / t))
    return torch.where(finite, scale, torch.zeros_like(scale)).to(dtype), finite


def grad_sumsq(grads: Tensors, params: Tensors | None = None, eta: float = 0.0, micro_batches: int = 1) -> torch.Tensor:
    k = micro_batches
    _checks.check_grad_sumsq(grads, params, k)
    if not grads:
        return torch.zeros(k, dtype=SUMSQ_DTYPE)
    xs = [g.to(SUMSQ_DTYPE) for g in grads]  # exact for every storage dtype
    if params is not None:
        t = [ti.to(SUMSQ_DTYPE) for ti in _t_factor(params, eta)]  # t rounded in the math dtype, as perturb_ uses it
        xs = torch._foreach_mul(xs, t) if k == 1 else [x * ti for x, ti in zip(xs, t)]  # t broadcasts over k
    per_tensor = [x.reshape(k, -1).square().sum(dim=1) for x in xs]  # [k] each: x as [k, n], per slice
    return torch.stack(per_tensor).sum(dim=0)


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
) -> None:
    _checks.check_perturb(params, grads, backups)
    if not params:
        return
    groups = _by_math_dtype(params)
    if len(groups) > 1:  # fp64 and other weights in one call: each group with the scale in its own math dtype
        for idx in groups:
            perturb_(*([ts[i] for i in idx] for ts in (params, grads, backups)), sumsq, rho, eps, adaptive, eta,
                     normalize)
        return
    dtype = math_dtype(params[0])
    torch._foreach_copy_(backups, params)
    scale, finite = perturb_scale(sumsq.reshape(-1)[0], rho, eps, normalize, dtype)  # 0-dim: broadcasts
    direction = _wide(grads)
    if adaptive:
        t = _t_factor(params, eta)
        direction = torch._foreach_mul(direction, torch._foreach_mul(t, t))
    if sumsq.device.type != "cpu" or torch.compiler.is_compiling():  # no host sync, no data-dependent branch
        for p, d in zip(params, direction):
            w = p.to(dtype)
            p.copy_(torch.where(finite, w + scale * d, w))
        return
    if not bool(finite):  # a host tensor: reading it is free, and the whole update is skipped
        return
    w = _wide(params)  # fp32/fp64 tensors are updated in place, others through fp32 copies rounded once at the store
    torch._foreach_add_(w, torch._foreach_mul(direction, scale))
    low = [(p, x) for p, x in zip(params, w) if x is not p]
    if low:
        torch._foreach_copy_([p for p, _ in low], [x for _, x in low])


def perturb_batched(
    params: Tensors,
    grads: Tensors,
    sumsq: torch.Tensor,
    rho: float,
    eps: float = 1e-12,
    adaptive: bool = False,
    eta: float = 0.0,
    normalize: bool = True,
) -> Tensors:
    k = sumsq.numel()
    _checks.check_perturb_batched(params, grads, k)
    if not params:
        return []
    scales = {dtype: perturb_scale(sumsq.reshape(k), rho, eps, normalize, dtype)
              for dtype in {math_dtype(p) for p in params}}
    outs = []
    for p, g in zip(params, grads):
        scale, finite = scales[math_dtype(p)]
        w = p.to(math_dtype(p)).unsqueeze(0)  # [1, *p.shape], broadcast over k
        d = g.to(math_dtype(p))
        if adaptive:
            t = w.abs() + eta
            d = t * t * d
        bcast = (k,) + (1,) * p.dim()
        out = torch.where(finite.view(bcast), w + scale.view(bcast) * d, w)
        outs.append(out.to(p.dtype))
    return outs


def restore_(params: Tensors, backups: Tensors) -> None:
    _checks.check_restore(params, backups)
    if params:
        torch._foreach_copy_(params, backups)


def fsam_direction_(
    grads: Tensors,
    ema: Tensors,
    sigma: float,
    lmbda: float,
    first: bool,
    params: Tensors | None = None,
    eta: float = 0.0,
) -> torch.Tensor:
    _checks.check_fsam(grads, ema, params)
    if grads:
        if first:  # m = g, d = g
            torch._foreach_copy_(ema, grads)
        else:  # d = g - sigma * m_prev; m = lmbda * m_prev + (1 - lmbda) * g
            g, m = _wide(grads), _wide(ema)
            d = torch._foreach_sub(g, torch._foreach_mul(m, sigma))
            new_m = torch._foreach_add(torch._foreach_mul(m, lmbda), torch._foreach_mul(g, 1.0 - lmbda))
            torch._foreach_copy_(grads, d)
            torch._foreach_copy_(ema, new_m)
    return grad_sumsq(grads, params, eta, 1)  # of the stored (rounded) direction


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
) -> None:
    """restore_(params, backups), then torch.optim.SGD's update (maximize=False, existing momentum buffers) with the
    same torch ops as torch's own single-tensor SGD, hence bit-for-bit its result."""
    _checks.check_restore_sgd(params, backups, grads, momentum_buffers, momentum)
    restore_(params, backups)
    for i, (p, g) in enumerate(zip(params, grads)):
        d = g.add(p, alpha=weight_decay) if weight_decay != 0 else g
        if momentum != 0:
            buf = momentum_buffers[i].mul_(momentum).add_(d, alpha=1 - dampening)
            d = d.add(buf, alpha=momentum) if nesterov else buf
        p.add_(d, alpha=-lr)
