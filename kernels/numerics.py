# numerics.py — per-element building blocks shared by every Triton kernel of sam_fused.
#
# Why this file exists: all kernels must reproduce sam_fused/reference.py to the bit (same order of operations,
# fp32 arithmetic on the elements, one rounding at the store), in compiled Triton on a GPU and in the Triton
# interpreter alike.
#   * Every tensor is accessed through its raw bits (uint16 for bf16/fp16, uint32 for fp32). Copies (backup, restore,
#     the first F-SAM EMA) are therefore bit-exact by construction, NaN payloads included.
#   * fp32 -> bf16 is rounded to nearest-even with integer ops, exactly as c10::BFloat16 does. The interpreter's own
#     fp32 -> bf16 cast truncates, so the builtin cast would differ from torch by 1 ulp there; the integer version is
#     identical on both sides. fp32 -> fp16 uses the builtin cast (IEEE round-to-nearest-even everywhere).
#   * Sums of squares are fp64 (terms, partials and the fixed-order combine): squared in fp32, any |g| > 1.8e19 made
#     the sum inf and skipped the step; in fp64 a finite fp32 gradient always has a finite sum (g^2 <= 1.2e77).
#   * The perturbation scale is computed in fp64 from that sum and rounded once to fp32, as the reference does. On
#     fp64, tl.sqrt and `/` compile to the IEEE-rounded sqrt.rn.f64 / div.rn.f64 (kernels/aot.py checks the PTX;
#     tl.sqrt_rn / tl.div_rn take only fp32). rho and eps are fp64 kernel arguments (annotated tl.float64: a plain
#     float argument would be rounded to fp32).
#   * Kernels are launched with enable_fp_fusion=False (see LAUNCH_OPTIONS) so `w + scale * d` is not contracted into
#     an FMA: the reference rounds after the multiply.
#   * Vector accesses: the element pointers come from int64 tables, so the compiler cannot prove any alignment by
#     itself. The host (tables.build) marks a bucket aligned, VEC = 16 bytes / element size, when every non-empty
#     tensor of every list starts 16-byte aligned and has a multiple of VEC elements (per slice); the kernels then
#     hint both (unit_of, tensor_ptr) and compile to 16-byte ld/st.global.v4 (kernels/aot.py checks the PTX). The
#     masked path vectorizes as is (the mask is constant over VEC lanes); other buckets run with VEC = 1.
#   * Tile geometry: one program handles one work unit of CHUNK = BLOCK * ITERS elements of one tensor. ITERS = 1:
#     a 4096-wide block per program suits these memory-bound kernels on a GPU, and it keeps the interpreter fast
#     (it re-patches triton.language on every call of a nested @triton.jit helper, so calls per program are costly).
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096  # elements per vector step of a program
ITERS = 1  # vector steps per program
CHUNK = BLOCK * ITERS  # elements per work unit (= per program); the address tables are built with this size
REDUCE_BLOCK = 1024  # partial sums combined per step by the second (fixed-order) reduction stage
LAUNCH_OPTIONS = {"enable_fp_fusion": False, "num_warps": 8}

# storage dtype -> (Triton element type, Triton type of its raw bits)
STORAGE = {
    torch.float32: (tl.float32, tl.uint32),
    torch.bfloat16: (tl.bfloat16, tl.uint16),
    torch.float16: (tl.float16, tl.uint16),
}


@triton.jit
def bits_to_f32(bits, DT: tl.constexpr):
    """Raw storage bits -> fp32 value (exact)."""
    if DT == tl.bfloat16:
        x = (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    elif DT == tl.float16:
        x = bits.to(tl.float16, bitcast=True).to(tl.float32)
    else:
        x = bits.to(tl.float32, bitcast=True)
    return x


@triton.jit
def f32_to_bits(x, DT: tl.constexpr):
    """fp32 value -> raw storage bits, rounded to nearest-even (one rounding, as the reference's final .to(dtype))."""
    if DT == tl.bfloat16:
        b = x.to(tl.uint32, bitcast=True)
        rounded = ((b + (((b >> 16) & 1) + 0x7FFF)) >> 16).to(tl.uint16)
        out = tl.where(x != x, 0x7FC0, rounded)  # NaN stays a (quiet) NaN
    elif DT == tl.float16:
        out = x.to(tl.float16).to(tl.uint16, bitcast=True)
    else:
        out = x.to(tl.uint32, bitcast=True)
    return out


@triton.jit
def perturb_scale(sumsq_ptr, j, rho, eps, NORMALIZE: tl.constexpr):
    """(scale, finite) of micro-batch j from the device-resident fp64 sumsq: rho / (sqrt(sumsq[j]) + eps), or rho
    when unnormalized, in fp64 and rounded once to fp32; scale = 0 and finite = False when sumsq[j] is inf/NaN.
    Loaded in the kernel: no host sync. tl.full keeps rho and eps fp64 in the interpreter too, where they arrive as
    Python floats (an fp64 tensor, as compiled, passes through unchanged)."""
    s = tl.load(sumsq_ptr + j)
    finite = tl.abs(s) < float("inf")
    scale = tl.full([], rho, tl.float64)
    if NORMALIZE:
        scale = scale / (tl.sqrt(s) + tl.full([], eps, tl.float64))
    scale = tl.where(finite, scale, 0.0).to(tl.float32)
    return scale, finite


@triton.jit
def unit_of(pid, num_units, unit_tensor_ptr, unit_offset_ptr, numel_ptr, BLOCK: tl.constexpr, VEC: tl.constexpr):
    """Work unit of program `pid`: (slice j, tensor index, first element, elements per slice of that tensor).

    Programs are laid out slice-major: pid = j * num_units + u, u indexing the (tensor, chunk) table. The hints tell
    the compiler what the host guarantees: units start at multiples of CHUNK (hence of BLOCK), and in an aligned
    bucket (VEC > 1) every tensor's element count is a multiple of VEC, so masks are constant over VEC lanes."""
    j = pid // num_units
    u = pid - j * num_units
    t = tl.load(unit_tensor_ptr + u)
    start = tl.multiple_of(tl.load(unit_offset_ptr + u), BLOCK)
    n = tl.load(numel_ptr + t)
    if VEC > 1:
        n = tl.multiple_of(n, VEC)
    return j, t, start, n


@triton.jit
def tensor_ptr(addr_ptr, t, IT: tl.constexpr, VEC: tl.constexpr):
    """Base pointer of tensor t of a list, read from its int64 address table and typed as a pointer to raw bits;
    hinted 16-byte aligned in an aligned bucket (VEC > 1), so that loads and stores become 16-byte vector accesses."""
    p = tl.load(addr_ptr + t).to(tl.pointer_type(IT))
    if VEC > 1:
        p = tl.multiple_of(p, 16)
    return p
