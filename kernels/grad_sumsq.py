# grad_sumsq.py — grad_sumsq in Triton: sum over a list of tensors of (T * g)^2, per micro-batch slice, in one launch.
#
# What: grads are [k, *p.shape] (k = micro_batches; plain [*p.shape] when k = 1); T = |w| + eta when params are given
# (broadcast over the k slices), else 1. Result: fp64 [k] on the tensors' device. Each term is squared in fp64
# (T is computed in fp32, as perturb_ uses it, then g * T in fp64), so no finite gradient overflows the sum.
# How, and why this way: a deterministic two-stage reduction, no float atomics (docs/DESIGN.md section 5).
#   stage 1 (_sumsq_partials): program pid = j * P + u sums its work unit (tensor, CHUNK elements) of slice j in an
#           fp64 vector accumulator, reduces it with tl.sum and writes partials[pid] (fp64);
#   stage 2 (combine_partials): program j adds partials[j * P : (j + 1) * P] in a fixed order, in fp64.
# The partition into work units depends only on the shapes, so the result is the same bits on every run.
# combine_partials is also used by fsam_direction.py.
from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .checks import Bucket, Call, check_lists, check_micro_batches, check_sliced, on_device, operands, prepare
from .numerics import BLOCK, ITERS, LAUNCH_OPTIONS, REDUCE_BLOCK, STORAGE, bits_to_f32, tensor_ptr, unit_of


@triton.jit
def _sumsq_partials(g_addrs, p_addrs, numels, unit_tensor, unit_offset, partials, num_units, eta,
                    HAS_T: tl.constexpr, DT: tl.constexpr, IT: tl.constexpr,
                    BLOCK: tl.constexpr, ITERS: tl.constexpr, VEC: tl.constexpr):
    pid = tl.program_id(0)
    j, t, start, n = unit_of(pid, num_units, unit_tensor, unit_offset, numels, BLOCK, VEC)
    g_ptr = tensor_ptr(g_addrs, t, IT, VEC) + j * n  # slice j of grads[t]
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for it in range(ITERS):
        offs = start + it * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = bits_to_f32(tl.load(g_ptr + offs, mask=mask, other=0), DT).to(tl.float64)
        if HAS_T:
            w = bits_to_f32(tl.load(tensor_ptr(p_addrs, t, IT, VEC) + offs, mask=mask, other=0), DT)
            x = x * (tl.abs(w) + eta).to(tl.float64)
        acc += x * x
    tl.store(partials + pid, tl.sum(acc, axis=0))


@triton.jit
def combine_partials(partials, out, num_units, REDUCE_BLOCK: tl.constexpr):
    """out[j] = sum of partials[j * num_units : (j + 1) * num_units], in a fixed order."""
    j = tl.program_id(0)
    acc = tl.zeros([REDUCE_BLOCK], dtype=tl.float64)
    for s in range(0, num_units, REDUCE_BLOCK):
        offs = s + tl.arange(0, REDUCE_BLOCK)
        acc += tl.load(partials + j * num_units + offs, mask=offs < num_units, other=0.0)
    tl.store(out + j, tl.sum(acc, axis=0))


def reduce_partials(partials: torch.Tensor, k: int, num_units: int) -> torch.Tensor:
    """Stage 2: fp64 [k] from the k * num_units fp64 partial sums."""
    out = torch.empty(k, dtype=torch.float64, device=partials.device)
    combine_partials[(k,)](partials, out, num_units, REDUCE_BLOCK=REDUCE_BLOCK, **LAUNCH_OPTIONS)
    return out


def grad_sumsq(
    grads: list[torch.Tensor], params: list[torch.Tensor] | None = None, eta: float = 0.0, micro_batches: int = 1
) -> torch.Tensor:
    """fp64 [k]: sum over tensors of (T * g)^2 per micro-batch slice; T = |params| + eta if params is given."""
    k = check_micro_batches(micro_batches)

    def validate() -> torch.device | None:
        if params is not None:
            return check_lists("params", params, {"grads": grads}, lead={"grads": k} if k > 1 else None)
        return check_sliced(grads, k)

    call = prepare("grad_sumsq", [grads, params], validate, k, lead=(k > 1, False))
    if call is None:
        return torch.zeros(k, dtype=torch.float64, device=grads[0].device if grads else torch.device("cpu"))
    total = None
    with on_device(call.device):
        for bucket in call.buckets:
            part = _bucket(call, bucket, grads, params, float(eta), k)
            total = part if total is None else total + part  # buckets added in a fixed order
    assert total is not None
    return total


def _bucket(call: Call, bucket: Bucket, grads: Sequence[torch.Tensor], params: Sequence[torch.Tensor] | None,
            eta: float, k: int) -> torch.Tensor:
    plan, _ = operands(call, bucket, [grads, params], written=(False, False))
    device = call.device
    if plan.num_units == 0:  # only empty tensors
        return torch.zeros(k, dtype=torch.float64, device=device)
    dt, it = STORAGE[bucket.dtype]
    partials = torch.empty(k * plan.num_units, dtype=torch.float64, device=device)
    _sumsq_partials[(k * plan.num_units,)](
        plan.addr(0), plan.addr(1 if params is not None else 0), plan.numels, plan.unit_tensor, plan.unit_offset,
        partials, plan.num_units, eta,
        HAS_T=params is not None, DT=dt, IT=it, BLOCK=BLOCK, ITERS=ITERS, VEC=plan.vec, **LAUNCH_OPTIONS,
    )
    return reduce_partials(partials, k, plan.num_units)
