# perturb.py — perturb_, perturb_batched and restore_ in Triton, one launch per (device, dtype) bucket.
#
# What (per element, the order of operations of sam_fused/reference.py; t = |w| + eta only when adaptive):
#   perturb_:        backup <- w (raw bits, same pass); w <- w + scale * (t * t * g)
#   perturb_batched: out[j] <- w + scale_j * (t * t * g[j])   (new [k, *p.shape] tensors; w is not modified)
#   restore_:        w <- backup (raw bits: bit-exact)
# scale_j = rho / (sqrt(sumsq[j]) + eps) (rho when normalize=False) is computed inside the kernels from the
# device-resident fp64 sumsq (no host sync), in fp64, and rounded once to fp32 (numerics.perturb_scale). A non-finite
# sumsq[j] means non-finite gradients: perturb_ then leaves the weights untouched (their stores are masked off; the
# backup is still written) and perturb_batched copies w.
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sam_fused import _checks as _shared

from .checks import check_lists, check_sumsq, on_device, operands, prepare
from .numerics import (
    BLOCK,
    ITERS,
    LAUNCH_OPTIONS,
    STORAGE,
    bits_to_f32,
    f32_to_bits,
    perturb_scale,
    tensor_ptr,
    unit_of,
)


@triton.jit
def _perturbed_bits(w_bits, g_bits, scale, eta, ADAPTIVE: tl.constexpr, DT: tl.constexpr):
    w = bits_to_f32(w_bits, DT)
    d = bits_to_f32(g_bits, DT)
    if ADAPTIVE:
        t = tl.abs(w) + eta
        d = d * (t * t)
    return f32_to_bits(w + scale * d, DT)


@triton.jit
def _perturb_kernel(p_addrs, g_addrs, b_addrs, numels, unit_tensor, unit_offset, sumsq, num_units,
                    rho: tl.float64, eps: tl.float64, eta, ADAPTIVE: tl.constexpr, NORMALIZE: tl.constexpr,
                    DT: tl.constexpr, IT: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr,
                    VEC: tl.constexpr):
    pid = tl.program_id(0)
    j, t, start, n = unit_of(pid, num_units, unit_tensor, unit_offset, numels, BLOCK, VEC)
    scale, finite = perturb_scale(sumsq, 0, rho, eps, NORMALIZE)
    p_ptr = tensor_ptr(p_addrs, t, IT, VEC)
    g_ptr = tensor_ptr(g_addrs, t, IT, VEC)
    b_ptr = tensor_ptr(b_addrs, t, IT, VEC)
    n_w = tl.where(finite, n, 0)  # elements of w to write: none when sumsq is not finite
    for it in range(ITERS):
        offs = start + it * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        w_bits = tl.load(p_ptr + offs, mask=mask, other=0)
        tl.store(b_ptr + offs, w_bits, mask=mask)
        g_bits = tl.load(g_ptr + offs, mask=mask, other=0)
        tl.store(p_ptr + offs, _perturbed_bits(w_bits, g_bits, scale, eta, ADAPTIVE, DT), mask=offs < n_w)


@triton.jit
def _perturb_batched_kernel(p_addrs, g_addrs, o_addrs, numels, unit_tensor, unit_offset, sumsq, num_units,
                            rho: tl.float64, eps: tl.float64, eta, ADAPTIVE: tl.constexpr,
                            NORMALIZE: tl.constexpr, DT: tl.constexpr, IT: tl.constexpr, BLOCK: tl.constexpr,
                            ITERS: tl.constexpr, VEC: tl.constexpr):
    pid = tl.program_id(0)
    j, t, start, n = unit_of(pid, num_units, unit_tensor, unit_offset, numels, BLOCK, VEC)
    scale, finite = perturb_scale(sumsq, j, rho, eps, NORMALIZE)
    p_ptr = tensor_ptr(p_addrs, t, IT, VEC)
    g_ptr = tensor_ptr(g_addrs, t, IT, VEC) + j * n  # slice j of grads[t] and of out[t]
    o_ptr = tensor_ptr(o_addrs, t, IT, VEC) + j * n
    for it in range(ITERS):
        offs = start + it * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        w_bits = tl.load(p_ptr + offs, mask=mask, other=0)
        g_bits = tl.load(g_ptr + offs, mask=mask, other=0)
        new_bits = _perturbed_bits(w_bits, g_bits, scale, eta, ADAPTIVE, DT)
        tl.store(o_ptr + offs, tl.where(finite, new_bits, w_bits), mask=mask)


@triton.jit
def _copy_kernel(dst_addrs, src_addrs, numels, unit_tensor, unit_offset, num_units,
                 IT: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr, VEC: tl.constexpr):
    pid = tl.program_id(0)
    j, t, start, n = unit_of(pid, num_units, unit_tensor, unit_offset, numels, BLOCK, VEC)
    dst = tensor_ptr(dst_addrs, t, IT, VEC)
    src = tensor_ptr(src_addrs, t, IT, VEC)
    for it in range(ITERS):
        offs = start + it * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(dst + offs, tl.load(src + offs, mask=mask, other=0), mask=mask)


def perturb_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    backups: list[torch.Tensor],
    sumsq: torch.Tensor,
    rho: float,
    eps: float = 1e-12,
    adaptive: bool = False,
    eta: float = 0.0,
    normalize: bool = True,
) -> None:
    """backup <- w; w <- w + rho * T^2 * g / (sqrt(sumsq[0]) + eps), in one pass; no-op on w if sumsq is not finite."""
    lists = [params, grads, backups]
    call = prepare("perturb_", lists, lambda: check_lists("params", params, {"grads": grads, "backups": backups},
                                                           written=_shared.PERTURB_WRITES))
    if call is None:
        return
    s = check_sumsq(sumsq, call.device, None, "perturb_")
    with on_device(call.device):
        for bucket in call.buckets:
            plan, write_back = operands(call, bucket, lists, written=(True, False, True))
            if plan.num_units:
                dt, it = STORAGE[bucket.dtype]
                _perturb_kernel[(plan.num_units,)](
                    plan.addr(0), plan.addr(1), plan.addr(2), plan.numels, plan.unit_tensor, plan.unit_offset, s,
                    plan.num_units, float(rho), float(eps), float(eta),
                    ADAPTIVE=bool(adaptive), NORMALIZE=bool(normalize), DT=dt, IT=it, BLOCK=BLOCK, ITERS=ITERS,
                    VEC=plan.vec, **LAUNCH_OPTIONS,
                )
            write_back()


def perturb_batched(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    sumsq: torch.Tensor,
    rho: float,
    eps: float = 1e-12,
    adaptive: bool = False,
    eta: float = 0.0,
    normalize: bool = True,
) -> list[torch.Tensor]:
    """out[i][j] = w_i + rho * T^2 * g_i[j] / (sqrt(sumsq[j]) + eps): k = sumsq.numel() perturbed copies."""
    if not isinstance(sumsq, torch.Tensor):
        raise TypeError(f"perturb_batched: sumsq must be a tensor, got {type(sumsq).__name__}")
    k = sumsq.numel()
    call = prepare("perturb_batched", [params, grads], lambda: check_lists("params", params, {"grads": grads},
                                                                          lead={"grads": k}),
                   k, lead=(False, True), tables_of_inputs=False)  # the tables also hold the fresh outputs
    if call is None:
        return []
    s = check_sumsq(sumsq, call.device, k, "perturb_batched")
    with on_device(call.device):
        outs = [torch.empty_like(g, dtype=p.dtype) for p, g in zip(params, grads)]  # g's layout, as the fake impl
        for bucket in call.buckets:
            plan, write_back = operands(call, bucket, [params, grads, outs], written=(False, False, True))
            if plan.num_units:
                dt, it = STORAGE[bucket.dtype]
                _perturb_batched_kernel[(k * plan.num_units,)](
                    plan.addr(0), plan.addr(1), plan.addr(2), plan.numels, plan.unit_tensor, plan.unit_offset, s,
                    plan.num_units, float(rho), float(eps), float(eta),
                    ADAPTIVE=bool(adaptive), NORMALIZE=bool(normalize), DT=dt, IT=it, BLOCK=BLOCK, ITERS=ITERS,
                    VEC=plan.vec, **LAUNCH_OPTIONS,
                )
            write_back()
    return outs


def restore_(params: list[torch.Tensor], backups: list[torch.Tensor]) -> None:
    """w <- backup, bit-exact."""
    lists = [params, backups]
    call = prepare("restore_", lists, lambda: check_lists("params", params, {"backups": backups},
                                                           written=_shared.RESTORE_WRITES))
    if call is None:
        return
    with on_device(call.device):
        for bucket in call.buckets:
            plan, write_back = operands(call, bucket, lists, written=(True, False))
            if plan.num_units:
                _copy_kernel[(plan.num_units,)](
                    plan.addr(0), plan.addr(1), plan.numels, plan.unit_tensor, plan.unit_offset, plan.num_units,
                    IT=STORAGE[bucket.dtype][1], BLOCK=BLOCK, ITERS=ITERS, VEC=plan.vec, **LAUNCH_OPTIONS,
                )
            write_back()
