# aot.py — compile every Triton kernel specialization for a GPU target without a GPU (no launch, no driver).
#
# Why: the interpreter tests (TRITON_INTERPRET=1) check what the kernels compute, not that the Triton compiler
# accepts them; a machine without a GPU can still run the whole compiler pipeline (TTIR -> TTGIR -> LLVM -> PTX ->
# cubin, with the ptxas bundled in the triton wheel) for a chosen target. This module does that for every
# specialization the ops launch, and checks properties of the generated PTX that the numerics rely on:
#   * IEEE-rounded fp64 sqrt and division in the perturbation scale (sqrt.rn.f64, div.rn.f64), no approximate ones;
#   * no contracted multiply-add (fma.*.f32/f64): launches use enable_fp_fusion=False to round like the reference;
#   * no atomics (atom./red.) anywhere: reductions are the deterministic two-stage kind;
#   * in the aligned specializations (VEC > 1, numerics.py) 16-byte vector loads (ld.global.v4) and, in the kernels
#     that write elements, stores (st.global.v4): the scalar loads left are the table reads.
# Usage: python -m sam_fused.kernels.aot [--arch 80 90] (must run WITHOUT TRITON_INTERPRET=1).
from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterator
from itertools import product

import triton
import triton.language as tl

from . import fsam_direction, grad_sumsq, perturb
from .numerics import BLOCK, ITERS, LAUNCH_OPTIONS, REDUCE_BLOCK, STORAGE

_TABLES = {"numels", "unit_tensor", "unit_offset"}
_FP64_PTRS = {"partials", "out", "sumsq"}  # sums of squares are fp64
_FLOATS = {"eta", "sigma", "lmbda", "one_minus_lmbda"}  # fp32; rho and eps are annotated tl.float64 in the kernels


def _signature(fn: triton.JITFunction) -> dict[str, str]:
    sig = {}
    for p in fn.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.annotation:
            sig[p.name] = p.annotation  # the kernel's own type, e.g. fp64
        elif p.name.endswith("_addrs") or p.name in _TABLES:
            sig[p.name] = "*i64"
        elif p.name in _FP64_PTRS:
            sig[p.name] = "*fp64"
        elif p.name == "num_units":
            sig[p.name] = "i32"
        elif p.name in _FLOATS:
            sig[p.name] = "fp32"
        else:
            raise KeyError(f"{fn.__name__}: no AOT type for argument {p.name!r}; update kernels/aot.py")
    return sig


def _vecs(it: tl.dtype) -> tuple[int, int]:
    """The VEC values the ops launch with: 1 (any bucket) and 16 bytes / element size (aligned buckets)."""
    return 1, 16 // (it.primitive_bitwidth // 8)


def specializations() -> Iterator[tuple[str, triton.JITFunction, dict]]:
    """(label, kernel, constexprs) for every kernel variant the ops can launch."""
    tile = {"BLOCK": BLOCK, "ITERS": ITERS}
    for dtype, (dt, it) in STORAGE.items():
        name = str(dtype).removeprefix("torch.")
        for vec in _vecs(it):
            common = {"DT": dt, "IT": it, "VEC": vec, **tile}
            for has_t in (False, True):
                yield f"sumsq {name} HAS_T={has_t} VEC={vec}", grad_sumsq._sumsq_partials, {"HAS_T": has_t, **common}
            for adaptive, normalize in product((False, True), repeat=2):
                flags = {"ADAPTIVE": adaptive, "NORMALIZE": normalize, **common}
                yield f"perturb {name} {adaptive=} {normalize=} VEC={vec}", perturb._perturb_kernel, flags
                yield (f"perturb_batched {name} {adaptive=} {normalize=} VEC={vec}", perturb._perturb_batched_kernel,
                       flags)
            for first, has_t in product((False, True), repeat=2):
                yield (f"fsam {name} {first=} {has_t=} VEC={vec}", fsam_direction._fsam_kernel,
                       {"FIRST": first, "HAS_T": has_t, **common})
    for it in (tl.uint16, tl.uint32):
        for vec in _vecs(it):
            yield f"copy {it} VEC={vec}", perturb._copy_kernel, {"IT": it, "VEC": vec, **tile}
    yield "combine", grad_sumsq.combine_partials, {"REDUCE_BLOCK": REDUCE_BLOCK}


def check_ptx(label: str, constexprs: dict, ptx: str) -> list[str]:
    """Problems found in one kernel's PTX (empty when fine)."""
    problems = []
    if re.search(r"\bfma\.[a-z.]*f(32|64)\b", ptx):
        problems.append(f"{label}: contracted fma in the PTX (enable_fp_fusion=False not applied)")
    if re.search(r"\b(atom|red)\.", ptx):
        problems.append(f"{label}: atomics in the PTX")
    if constexprs.get("NORMALIZE") and not ("sqrt.rn.f64" in ptx and "div.rn.f64" in ptx):
        problems.append(f"{label}: scale not computed with sqrt.rn.f64 / div.rn.f64")
    if re.search(r"\b(sqrt|div|rcp|rsqrt)\.approx\b", ptx):
        problems.append(f"{label}: approximate sqrt/division in the PTX")
    if constexprs.get("VEC", 1) > 1:  # aligned bucket: element accesses must be 16-byte vectors
        if "ld.global.v4" not in ptx:
            problems.append(f"{label}: no 16-byte vector load (ld.global.v4) in an aligned specialization")
        if not label.startswith("sumsq") and "st.global.v4" not in ptx:  # the sums of squares only read
            problems.append(f"{label}: no 16-byte vector store (st.global.v4) in an aligned specialization")
    return problems


def compile_all(arch: int = 80, verbose: bool = False) -> list[str]:
    """Compile every specialization to cubin for sm_<arch>; returns the problems found (raises on compile errors)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    problems: list[str] = []
    for label, fn, constexprs in specializations():
        src = ASTSource(fn=fn, signature=_signature(fn), constexprs=constexprs)
        compiled = triton.compile(src, target=target, options=dict(LAUNCH_OPTIONS))
        if not compiled.asm.get("cubin"):
            problems.append(f"{label}: no cubin produced")
        problems += check_ptx(label, constexprs, compiled.asm["ptx"])
        if verbose:
            print(f"compiled {label} for sm_{arch}", flush=True)
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Compile every sam_fused Triton kernel for a GPU, without a GPU.")
    parser.add_argument("--arch", type=int, nargs="+", default=[80], help="CUDA compute capabilities, e.g. 80 90")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(grad_sumsq._sumsq_partials, InterpretedFunction):
        print("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled", file=sys.stderr)
        return 2
    failed = False
    for arch in args.arch:
        problems = compile_all(arch, args.verbose)
        for p in problems:
            print(p, file=sys.stderr)
        print(f"{'FAILED' if problems else 'ok'}: every Triton kernel specialization compiled for sm_{arch}")
        failed = failed or bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
