# fsam_direction.py — fsam_direction_ in Triton: the Friendly-SAM direction, EMA update and its squared norm in one
# pass.
#
# What (official F-SAM order, sam_fused/reference.py):
#   first step:  ema <- g (raw bits), d = g (grads unchanged)
#   later steps: d = g - sigma * m_prev; m = lmbda * m_prev + (1 - lmbda) * g; grads <- d; ema <- m
# and returns fp64 [1] = sum of (T * d)^2 with T = |w| + eta when params are given (else 1), squared and summed in
# fp64 as in grad_sumsq.py.
# Why fused: the norm of the direction is needed next (perturb_), so it is accumulated while d is in registers,
# saving a full pass over the gradients. It is taken of the STORED d (rounded to the storage dtype), exactly like the
# reference, which computes grad_sumsq of the updated grads. Per-program partials + the fixed-order combine of
# grad_sumsq.py keep it deterministic (no float atomics).
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sam_fused import _checks as _shared

from .checks import check_lists, on_device, operands, prepare
from .grad_sumsq import reduce_partials
from .numerics import BLOCK, ITERS, LAUNCH_OPTIONS, STORAGE, bits_to_f32, f32_to_bits, tensor_ptr, unit_of


@triton.jit
def _fsam_kernel(g_addrs, m_addrs, p_addrs, numels, unit_tensor, unit_offset, partials, num_units,
                 sigma, lmbda, one_minus_lmbda, eta, FIRST: tl.constexpr, HAS_T: tl.constexpr,
                 DT: tl.constexpr, IT: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr,
                 VEC: tl.constexpr):
    pid = tl.program_id(0)
    j, t, start, n = unit_of(pid, num_units, unit_tensor, unit_offset, numels, BLOCK, VEC)
    g_ptr = tensor_ptr(g_addrs, t, IT, VEC)
    m_ptr = tensor_ptr(m_addrs, t, IT, VEC)
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for it in range(ITERS):
        offs = start + it * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g_bits = tl.load(g_ptr + offs, mask=mask, other=0)
        if FIRST:
            tl.store(m_ptr + offs, g_bits, mask=mask)
            d = bits_to_f32(g_bits, DT)
        else:
            g = bits_to_f32(g_bits, DT)
            m = bits_to_f32(tl.load(m_ptr + offs, mask=mask, other=0), DT)
            d_bits = f32_to_bits(g - m * sigma, DT)
            tl.store(g_ptr + offs, d_bits, mask=mask)
            tl.store(m_ptr + offs, f32_to_bits(m * lmbda + g * one_minus_lmbda, DT), mask=mask)
            d = bits_to_f32(d_bits, DT)  # the stored, rounded direction
        x = d.to(tl.float64)
        if HAS_T:
            w = bits_to_f32(tl.load(tensor_ptr(p_addrs, t, IT, VEC) + offs, mask=mask, other=0), DT)
            x = x * (tl.abs(w) + eta).to(tl.float64)
        acc += x * x
    tl.store(partials + pid, tl.sum(acc, axis=0))


def fsam_direction_(
    grads: list[torch.Tensor],
    ema: list[torch.Tensor],
    sigma: float,
    lmbda: float,
    first: bool,
    params: list[torch.Tensor] | None = None,
    eta: float = 0.0,
) -> torch.Tensor:
    """F-SAM direction in place (grads <- d, ema updated); returns fp64 [1] sum of (T * d)^2 of the stored d."""
    lists = [grads, ema, params]
    call = prepare("fsam_direction_", lists, lambda: check_lists("grads", grads, {"ema": ema, "params": params},
                                                                  written=_shared.FSAM_WRITES))
    if call is None:
        return torch.zeros(1, dtype=torch.float64, device=grads[0].device if grads else torch.device("cpu"))
    total = None
    with on_device(call.device):
        for bucket in call.buckets:
            plan, write_back = operands(call, bucket, lists, written=(True, True, False))
            if plan.num_units:
                dt, it = STORAGE[bucket.dtype]
                partials = torch.empty(plan.num_units, dtype=torch.float64, device=call.device)
                _fsam_kernel[(plan.num_units,)](
                    plan.addr(0), plan.addr(1), plan.addr(2 if params is not None else 0), plan.numels,
                    plan.unit_tensor, plan.unit_offset, partials, plan.num_units,
                    float(sigma), float(lmbda), 1.0 - float(lmbda), float(eta),  # 1 - lmbda in double, as the reference
                    FIRST=bool(first), HAS_T=params is not None, DT=dt, IT=it, BLOCK=BLOCK, ITERS=ITERS,
                    VEC=plan.vec, **LAUNCH_OPTIONS,
                )
                part = reduce_partials(partials, 1, plan.num_units)
            else:
                part = torch.zeros(1, dtype=torch.float64, device=call.device)
            write_back()
            total = part if total is None else total + part
    assert total is not None
    return total
