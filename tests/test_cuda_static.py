"""Static proofs about the CUDA kernels' generated code, on a machine without a GPU (docs/DESIGN.md section 7).

scripts/cuda_static_check.py compiles csrc/cuda/*.cu for sm_90 with setup.py's nvcc flags (PTX, then ptxas -v, and
the SASS when a cuobjdump is found: the toolkit's or triton's) and reports per kernel; this test asserts on it:

* the aligned paths move 16-byte vectors (ld.global.v4 / st.global.v4; SASS LDG.E.128 / STG.E.128);
* several loads in flight per thread: in some basic block of each multi-tensor kernel (the unrolled main loop),
  at least kUnroll 16-byte loads are issued before the first instruction that uses a loaded value;
* no local memory: no .local in the PTX, 0 bytes of spills and stack frame (ptxas -v), no LDL/STL in the SASS;
* the per-element math rounds like the reference: no fma.*.f32 (contraction), no .approx instructions;
* deterministic reductions: no atomics (atom./red.);
* the by-value argument struct fits the kernel parameter limit (32,764 bytes, CUDA >= 12.1, sm_70+).

It skips when no nvcc / CUDA toolkit is found. The compile takes ~10-20 s on 2 cores and is cached by source hash.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
UNROLL = 4  # kUnroll in csrc/cuda/mta.cuh
MULTI_TENSOR = ("grad_sumsq_kernel", "perturb_kernel", "perturb_batched_kernel", "restore_kernel", "fsam_kernel")
WRITES = ("perturb_kernel", "perturb_batched_kernel", "restore_kernel", "fsam_kernel")


def _load_checker():
    spec = importlib.util.spec_from_file_location("cuda_static_check", REPO / "scripts" / "cuda_static_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


checker = _load_checker()


@pytest.fixture(scope="module")
def kernels() -> dict[str, dict]:
    found = checker.check_all()
    if found is None:
        pytest.skip("no nvcc / CUDA toolkit found: the kernels cannot be compiled here")
    return found


def _base(mangled: str) -> str:
    """The kernel's unqualified name in its mangled one (e.g. ...22perturb_batched_kernelINS0_4BF16E... ->
    perturb_batched_kernel)."""
    return next(name for name in sorted(MULTI_TENSOR + ("finish_sums_kernel",), key=len, reverse=True)
                if f"{len(name)}{name}" in mangled)


def test_every_kernel_is_there(kernels: dict) -> None:
    counts: dict[str, int] = {}
    for name in kernels:
        counts[_base(name)] = counts.get(_base(name), 0) + 1
    assert counts == {"grad_sumsq_kernel": 3, "perturb_kernel": 3, "perturb_batched_kernel": 3, "fsam_kernel": 3,
                      "restore_kernel": 2, "finish_sums_kernel": 1}  # 3 storage dtypes; restore: 2 word sizes
    assert all("regs" in info for info in kernels.values()), "ptxas -v reported every kernel"


def test_vector_loads_and_stores(kernels: dict) -> None:
    for name, info in kernels.items():
        base = _base(name)
        if base not in MULTI_TENSOR:
            continue
        assert info["ldv4"] >= UNROLL, f"{base}: {info['ldv4']} ld.global.v4"
        assert (info["stv4"] >= 1) == (base in WRITES), f"{base}: {info['stv4']} st.global.v4"
        if "ldg128" in info:  # SASS read (a cuobjdump was found)
            assert info["ldg128"] >= UNROLL and (info["stg128"] >= 1) == (base in WRITES), base


def test_loads_in_flight(kernels: dict) -> None:
    """Each thread issues the loads of kUnroll packets of every list before it uses any: at least kUnroll 16-byte
    loads ahead of the first dependent instruction, in the PTX and (register allocation may pipeline them) the
    SASS."""
    for name, info in kernels.items():
        if _base(name) in MULTI_TENSOR:
            assert info["ahead"] >= UNROLL, f"{_base(name)}: {info['ahead']} loads ahead in the PTX"
            if "sass_ahead" in info:
                assert info["sass_ahead"] >= UNROLL, f"{_base(name)}: {info['sass_ahead']} loads ahead in the SASS"


def test_no_local_memory(kernels: dict) -> None:
    for name, info in kernels.items():
        assert info["local"] == 0, f"{_base(name)}: .local in the PTX"
        assert info["spills"] == 0 and info["stack"] == 0, f"{_base(name)}: spills / stack frame (ptxas -v)"
        assert info.get("ldl_stl", 0) == 0, f"{_base(name)}: LDL/STL in the SASS"


def test_rounding_like_the_reference(kernels: dict) -> None:
    for name, info in kernels.items():
        assert info["fma32"] == 0, f"{_base(name)}: fp32 FMA contraction"
        assert info["approx"] == 0, f"{_base(name)}: approximate instructions"


def test_no_atomics(kernels: dict) -> None:
    for name, info in kernels.items():
        assert info["atomics"] == 0, f"{_base(name)}: atomics"


def test_parameters_fit(kernels: dict) -> None:
    """The argument struct uses the large budget (several hundred tensors per launch) and stays within it."""
    for name, info in kernels.items():
        limit = checker.PARAM_LIMIT
        assert info["params"] <= limit, f"{_base(name)}: {info['params']} bytes of parameters > {limit}"
        if _base(name) in MULTI_TENSOR:
            assert info["params"] > 4096, f"{_base(name)}: {info['params']} bytes: the 4 KB budget is in use"
