"""One set of inputs, comparators and backend runners for the op parity suite (tests/test_parity.py).

A Runner is one way of running the five ops: its op object (positional arguments as in sam_fused/_registry.py), the
device its tensors live on, the tensor lists it runs (the interpreter and the emulation are slow: small lists with
one tensor > 65,536 elements), its tolerances, and what it can do beyond parity (validation, opcheck). Runners that
cannot run here skip with the reason: the GPU ones without a CUDA device, triton without the package, the emulation
without CUDA headers.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import native
import pytest
import torch
from helpers import assert_bits_equal, assert_matches

import sam_fused

Tensors = list[torch.Tensor]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# grad_sumsq / perturb / fsam T-factor modes: name -> (adaptive, eta)
T_MODES = {"T=1": (False, 0.0), "T=|w|": (True, 0.0), "T=|w|+0.01": (True, 0.01)}


# ---- tensor lists ----------------------------------------------------------------------------------------------

class Spec(NamedTuple):
    """One tensor of a list and the layout of each list's copy of it: "c" contiguous; "m" misaligned (contiguous,
    one element into its buffer: not 16-byte aligned); "n" non-contiguous (1-D: every other element of a buffer;
    else dims reversed; a [k, *shape] gradient: k innermost); "t" the last two dims transposed (k outermost)."""

    shape: tuple[int, ...]
    param: str = "c"
    grad: str = "c"
    ema: str = "c"


def place(x: torch.Tensor, layout: str, dtype: torch.dtype, device: torch.device | str,
          lead: bool = False) -> torch.Tensor:
    """x's values as `dtype` on `device`, laid out as `layout` says (Spec)."""
    x = x.to(device, dtype)
    if layout == "m":
        return torch.empty(x.numel() + 1, dtype=dtype, device=device)[1:].view(x.shape).copy_(x)
    if layout == "t" and x.dim() >= 2:
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "n" and lead:
        return x.movedim(0, -1).contiguous().movedim(-1, 0)
    if layout == "n" and x.dim() == 1:
        return torch.empty(2 * x.numel(), dtype=dtype, device=device)[::2].copy_(x)
    if layout == "n" and x.dim() >= 2:
        order = tuple(reversed(range(x.dim())))
        return x.permute(order).contiguous().permute(order)
    return x.clone()


def random_list(specs: list[Spec], role: str, dtype: torch.dtype, device: torch.device | str, gen: torch.Generator,
                lead: int | None = None) -> Tensors:
    """randn tensors drawn on the CPU from `gen` ([lead, *shape] with lead), laid out as the specs say for `role`."""
    return [place(torch.randn(((lead,) if lead else ()) + s.shape, generator=gen), getattr(s, role), dtype, device,
                  lead is not None) for s in specs]


def clone(ts: Tensors) -> Tensors:
    """Copies that keep each tensor's strides (non-contiguous stays non-contiguous, misaligned becomes aligned)."""
    return [torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(t) if t.numel()
            else t.clone() for t in ts]


def bits_list(specs: list[Spec], role: str, dtype: torch.dtype, device: torch.device | str, seed: int) -> Tensors:
    """Arbitrary bit patterns (NaN payloads, subnormals, infinities), and -0.0, +-inf, a NaN payload and a subnormal
    at the start of the largest tensor."""
    gen = torch.Generator().manual_seed(seed)
    iv = torch.int32 if dtype == torch.float32 else torch.int16
    info = torch.iinfo(iv)
    raw = [torch.randint(info.min, info.max, s.shape, generator=gen, dtype=iv) for s in specs]
    big = max(range(len(raw)), key=lambda i: raw[i].numel())
    special = torch.tensor([-0.0, float("inf"), float("-inf"), 0.0, 0.0]).to(dtype).view(iv)
    special[3], special[4] = -3 if dtype == torch.float32 else 0x7FC3, 1  # a NaN payload, the smallest subnormal
    raw[big].view(-1)[:5] = special
    return [place(r.view(dtype), getattr(s, role), dtype, device) for r, s in zip(raw, specs)]


def assert_all_bits_equal(actual: Tensors, expected: Tensors, what: str) -> None:
    assert len(actual) == len(expected), what
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert_bits_equal(a, e, f"{what}[{i}]")


def assert_close_eps(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """The CUDA GPU tests' elementwise tolerance: fp32 within 1e-6 relative (atol 1e-7); bf16/fp16 within one eps of
    their own rounding (atol 1e-6)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    if actual.dtype == torch.float32:
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-7, msg=lambda m: f"{what}: {m}")
    else:
        torch.testing.assert_close(actual.float(), expected.float(), rtol=torch.finfo(actual.dtype).eps, atol=1e-6,
                                   msg=lambda m: f"{what}: {m}")


# ---- runners ---------------------------------------------------------------------------------------------------

class OpLayer:
    """sam_fused.ops with a fixed backend, called like the torch.ops namespaces."""

    def __init__(self, backend: str) -> None:
        self.backend = backend

    def __getattr__(self, name: str) -> Callable[..., object]:
        return functools.partial(getattr(sam_fused.ops, name), backend=self.backend)


@dataclass(frozen=True)
class Runner:
    name: str
    ops: Callable[[], object]  # the op object (built or loaded on first use)
    device: str
    specs: list[Spec]
    why_not: Callable[[], str | None]  # the reason it cannot run here, or None
    sums_rtol: float = 1e-12  # fp64 sums of squares against the reference's (another order of fp64 additions)
    huge_rtol: float = 1e-12  # the same for sums dominated by a few terms beyond the fp32 range
    close: Callable[..., None] = assert_matches  # elementwise results against the reference
    # The torch.ops namespace of its kernels, called directly by the invalid-input and opcheck tests (None: ops()).
    namespace: str | None = None
    validates: bool = True  # raises the shared invalid-input errors
    opcheck_dtypes: tuple[torch.dtype, ...] = ()  # torch.library.opcheck of its kernels in these dtypes
    fake_layout: bool = True  # perturb_batched's outputs are laid out like the grads, as the fakes promise
    dtypes: tuple[torch.dtype, ...] = tuple(DTYPES)
    t_modes: tuple[str, ...] = tuple(T_MODES)
    env: dict[str, str] = field(default_factory=dict)
    stores_only: bool = False  # a variant that differs only in how perturb_/restore_ store: only tests calling them
    slow: bool = False  # the interpreter, the emulation: the edge-case tests run fewer T modes and dtypes there
    scale_k: int = 512  # micro-batches of random sums in the scale test
    gpu: bool = False

    def kernels(self) -> object:
        """The ops as the backend registers them (bypassing the op layer), or ops() where it has none of its own."""
        ops = self.ops()
        return ops if self.namespace is None else getattr(torch.ops, self.namespace)

    @property
    def big(self) -> int:
        """The largest 1-D tensor of the lists (> 65,536 elements except for the interpreter's 4,097)."""
        flat = [i for i, s in enumerate(self.specs) if len(s.shape) == 1]
        return max(flat, key=lambda i: self.specs[i].shape[0])

    def lists(self, dtype: torch.dtype, k: int = 1, seed: int = 0, lead: bool = False,
              specs: list[Spec] | None = None) -> tuple[Tensors, Tensors]:
        """(params, grads); grads are [k, *shape] when k > 1 or lead."""
        gen = torch.Generator().manual_seed(seed)
        specs = self.specs if specs is None else specs
        params = random_list(specs, "param", dtype, self.device, gen)
        return params, random_list(specs, "grad", dtype, self.device, gen, k if (k > 1 or lead) else None)

    def ema(self, dtype: torch.dtype, seed: int, lead: int | None = None) -> Tensors:
        return random_list(self.specs, "ema", dtype, self.device, torch.Generator().manual_seed(seed), lead)


def _cpu_missing() -> str | None:
    status = sam_fused.backends()["cpu"]
    return None if status.available else f"sam_fused cpu backend unavailable: {status.detail}"


def _triton_missing(interpreted: bool) -> str | None:
    if (os.environ.get("TRITON_INTERPRET") == "1") != interpreted:
        return ("needs TRITON_INTERPRET=1 (tests/conftest.py sets it without CUDA)" if interpreted
                else "TRITON_INTERPRET=1 is set: the compiled kernels would not run")
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    return None


def _gpu_missing(backend: str) -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    if backend == "triton":
        return _triton_missing(interpreted=False)
    status = sam_fused.backends()[backend]
    return None if status.available else f"{backend} backend unavailable: {status.detail}"


def _triton_ops() -> object:
    import sam_fused.kernels  # noqa: F401  (registers torch.ops.sam_fused_triton)

    return torch.ops.sam_fused_triton


# Per backend, its lists as before the suite was merged: the C++ CPU kernels take any layout (empty, 0-d, odd sizes,
# 4-D, > 65,536 elements: several 32K work chunks, strided and permuted views); the interpreter's lists are small
# (4,097 elements cross a work unit), with a transposed view; the emulated and GPU CUDA kernels see aligned tensors
# (vector path) beside misaligned ones (scalar path), > 65,536 elements and one element past a 16K chunk.
CPU_SPECS = [Spec(s, lay, lay, lay) for s, lay in [
    ((0,), "c"), ((), "c"), ((1,), "c"), ((7,), "c"), ((33,), "n"), ((3, 5), "c"), ((2, 3, 4, 5), "n"),
    ((65_537 + 6,), "c"), ((130, 517), "n"), ((0, 3), "c"), ((64,), "c")]]
TRITON_SPECS = [Spec(s) for s in [(0,), (1,), (7,), (4097,), (3, 5, 7, 2)]] + [Spec((9, 6), "t", "t", "t")]


def misaligned_specs(shapes: list[tuple[int, ...]]) -> list[Spec]:
    """params misaligned at odd positions, grads at every third from 1, the EMA at every fourth from 1: every mix of
    an aligned and a misaligned operand occurs."""
    return [Spec(s, "cm"[i % 2 == 1], "cm"[i % 3 == 1], "cm"[i % 4 == 1]) for i, s in enumerate(shapes)]


# Positions the CUDA host code must stage (csrc/shared/host.h): a strided weight and EMA, a transposed gradient.
STAGED_SPECS = [Spec((33,), "n", "c", "n"), Spec((5, 7), "c", "t", "c")]
EMU_SPECS = (misaligned_specs([(0,), (), (1,), (7,), (33, 5), (3, 4, 5, 6), (2, 0, 3), (70_001,), (16_385,)])
             + STAGED_SPECS)
CUDA_GPU_SPECS = (misaligned_specs([(0,), (), (1,), (7,), (33, 5), (3, 4, 5, 6), (2, 0, 3), (70_001,), (257, 259)])
                  + STAGED_SPECS)
TRITON_GPU_SPECS = TRITON_SPECS + [Spec((70_001,)), Spec((1_000_003,))]

F32 = (torch.float32,)
RUNNERS = [
    # The reference itself through the op layer: proves the suite's own setup (exact agreement expected).
    Runner("torch", lambda: OpLayer("torch"), "cpu", CPU_SPECS, lambda: None, sums_rtol=0.0, huge_rtol=0.0, dtypes=F32,
           fake_layout=False),
    Runner("cpu", lambda: OpLayer("cpu"), "cpu", CPU_SPECS, _cpu_missing, sums_rtol=1e-6, namespace="sam_fused",
           opcheck_dtypes=(torch.float32, torch.float16), env={"SAM_FUSED_CPU_STREAMING": "0"}),
    # perturb_ and restore_ with streaming (non-temporal) stores, by default only above the LLC size (streaming.h)
    Runner("cpu_streaming", lambda: OpLayer("cpu"), "cpu", CPU_SPECS, _cpu_missing, sums_rtol=1e-6,
           namespace="sam_fused", env={"SAM_FUSED_CPU_STREAMING": "1"}, stores_only=True),
    Runner("triton_interp", _triton_ops, "cpu", TRITON_SPECS, lambda: _triton_missing(interpreted=True),
           namespace="sam_fused_triton", opcheck_dtypes=F32, slow=True),
    # The CUDA backend's host code and kernels (emulated) on CPU tensors: validation, staging and opcheck included.
    Runner("cuda_emu", native.emu_ops, "cpu", EMU_SPECS, native.emu_missing, opcheck_dtypes=F32,
           t_modes=("T=1", "T=|w|+0.01"), slow=True),
    Runner("cuda_gpu", lambda: OpLayer("cuda"), "cuda", CUDA_GPU_SPECS, lambda: _gpu_missing("cuda"),
           sums_rtol=1e-10, huge_rtol=1e-10, close=assert_close_eps, namespace="sam_fused", opcheck_dtypes=F32,
           gpu=True),
    Runner("triton_gpu", _triton_ops, "cuda", TRITON_GPU_SPECS, lambda: _gpu_missing("triton"), sums_rtol=1e-6,
           namespace="sam_fused_triton", opcheck_dtypes=F32, scale_k=4096, gpu=True),
]


def _param(r: Runner, *values: object) -> object:
    ids = [r.name] + [str(v).removeprefix("torch.") for v in values]
    return pytest.param(r, *values, id="-".join(ids), marks=[pytest.mark.gpu] if r.gpu else [])


def runner_params(which: Callable[[Runner], bool] = lambda r: True) -> list:
    """RUNNERS (those `which` selects) as pytest params: id = name, the GPU ones marked `gpu`."""
    return [_param(r) for r in RUNNERS if which(r)]


def writes(r: Runner) -> bool:
    """Every runner, for tests that call perturb_ or restore_."""
    return True


def computes(r: Runner) -> bool:
    """Runners for tests that call no perturb_ / restore_ (the store variants have nothing new to show there)."""
    return not r.stores_only


EDGE_T_MODES = ("T=1", "T=|w|+0.01")  # what the slow runners' edge-case tests run


def grid(dtypes: list[torch.dtype] = DTYPES, t_modes: bool = False, which: Callable[[Runner], bool] = writes,
         edge: bool = False, slow_dtypes: list[torch.dtype] | None = None) -> list:
    """pytest params (runner, dtype) or (runner, dtype, t_mode) over the dtypes and T modes each runner runs; `edge`:
    a slow runner runs EDGE_T_MODES only, and `slow_dtypes` (when given) only."""

    def modes(r: Runner) -> list:
        return [t for t in r.t_modes if not (edge and r.slow) or t in EDGE_T_MODES] if t_modes else [None]

    def types(r: Runner) -> list:
        return [d for d in (slow_dtypes if r.slow and slow_dtypes else dtypes) if d in r.dtypes]

    return [_param(r, d, *([t] if t_modes else [])) for r in RUNNERS if which(r) for d in types(r) for t in modes(r)]


def opcheck_grid() -> list:
    """pytest params (runner, dtype) for each dtype a runner's kernels are opchecked in."""
    return [_param(r, d) for r in RUNNERS for d in r.opcheck_dtypes]


# ---- opcheck arguments -----------------------------------------------------------------------------------------

OPCHECK_CASES = ["grad_sumsq", "grad_sumsq k=1", "perturb_", "perturb_batched", "restore_", "fsam_direction_"]


def opcheck_args(runner: Runner, dtype: torch.dtype) -> dict[str, tuple]:
    """Each op's arguments for torch.library.opcheck, which runs an op many times: the runner's small tensors."""
    small = [s for s in runner.specs if math.prod(s.shape) < 1000]
    params, grads = runner.lists(dtype, specs=small)
    _, kgrads = runner.lists(dtype, 2, seed=1, specs=small)
    dev = runner.device
    f64 = {"dtype": torch.float64, "device": dev}
    return {
        "grad_sumsq": (kgrads, params, 0.01, 2),
        "grad_sumsq k=1": (grads, params, 0.01, 1),
        "perturb_": (params, grads, [torch.empty_like(p) for p in params], torch.tensor([4.0], device=dev), 0.05,
                     1e-12, True, 0.01, True),
        "perturb_batched": (params, kgrads, torch.tensor([1.0, 2.0], **f64), 0.05, 1e-12, True, 0.0, True),
        "restore_": (params, [torch.randn_like(p) for p in params]),
        "fsam_direction_": (grads, [torch.randn_like(g) for g in grads], 1.0, 0.9, False, params, 0.01),
    }
