"""The backends (one declarative entry each, BACKENDS), which exist here, and which one runs a (device, dtype) bucket
(docs/DESIGN.md section 4).

A compiled part that is missing never breaks ``import sam_fused``: its backend is reported unavailable, with the
reason, and ``auto`` falls back to the ``torch`` reference.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from . import _registry, reference, selfcheck  # noqa: F401  (_registry defines the torch.ops namespaces)

COMPILED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class BackendStatus:
    available: bool
    detail: str

    def __str__(self) -> str:
        return ("available: " if self.available else "unavailable: ") + self.detail


def _has_kernel(namespace: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"{namespace}::perturb_", key)


def build_info() -> dict:
    """What setup.py built, skipped and why (sam_fused/_build_info.json); {} when the package was not built by it."""
    try:
        return json.loads(Path(__file__).with_name("_build_info.json").read_text())
    except (OSError, ValueError):
        return {}


def _not_loaded(module: str, what: str, error: ImportError) -> BackendStatus:
    """Why compiled part `module` is absent: the build's own record when it skipped it, else the import error."""
    info = build_info()
    entry = info.get("extensions", {}).get(module)
    if entry is not None and not entry.get("built", True):
        return BackendStatus(False, f"{what} {module} was not built: {entry['detail']}")
    detail = f"{what} {module} not built or not loadable ({error})"
    built_with = info.get("torch")
    if built_with and built_with != torch.__version__:
        detail += (f"; it was built against torch {built_with}, this is torch {torch.__version__}: reinstall sam_fused "
                   "with `pip install --no-build-isolation` to build it against this torch")
    return BackendStatus(False, detail)


def _load_compiled(module: str, what: str, key: str) -> BackendStatus | None:
    """Imports a compiled extension and checks it registered kernels for its dispatch key; None when it did."""
    try:
        importlib.import_module(module)
    except ImportError as e:
        return _not_loaded(module, what, e)
    if not _has_kernel("sam_fused", key):
        return BackendStatus(False, f"{module} loaded but registered no {key} kernels")
    return None


def _load_cpu() -> BackendStatus:
    failed = _load_compiled("sam_fused._C_cpu", "C++ CPU extension", "CPU")
    return failed or BackendStatus(True, f"C++ (at::parallel_for x at::vec), {torch.get_num_threads()} threads")


def _load_cuda() -> BackendStatus:
    failed = _load_compiled("sam_fused._C_cuda", "CUDA extension", "CUDA")
    if failed is not None:
        return failed
    if not torch.cuda.is_available():
        return BackendStatus(False, "CUDA kernels compiled and registered, but no CUDA device is visible")
    return BackendStatus(True, f"CUDA C++ on {torch.cuda.get_device_name()}")


def _load_triton() -> BackendStatus:
    try:
        importlib.import_module("sam_fused.kernels")
    except ImportError as e:
        return BackendStatus(False, f"Triton kernels not importable ({e})")
    if not (_has_kernel("sam_fused_triton", "CUDA") or _has_kernel("sam_fused_triton", "CPU")):
        return BackendStatus(False, "sam_fused.kernels imported but registered no Triton kernels")
    if _has_kernel("sam_fused_triton", "CPU"):
        return BackendStatus(True, "Triton interpreter (TRITON_INTERPRET=1): CPU tensors, for testing only")
    if not torch.cuda.is_available():
        return BackendStatus(False, "Triton kernels importable, but no CUDA device is visible")
    return BackendStatus(True, "Triton on CUDA")


def _load_reference() -> BackendStatus:
    return BackendStatus(True, "pure PyTorch reference (torch._foreach_*)")


@dataclass(frozen=True)
class Backend:
    """Everything dispatch, reporting, the benchmark and the tests know about one backend: adding a backend is adding
    one entry to BACKENDS (plus its kernels and loader)."""

    name: str
    load: Callable[[], BackendStatus]  # imports its module (once): usable in this process, and why (not)
    namespace: str | None  # torch.ops namespace its kernels register in; None: the reference module is its op table
    devices: tuple[str, ...] | None  # device types it runs; None: any
    dtypes: tuple[torch.dtype, ...] | None  # storage dtypes its kernels take; None: any (others go to the reference)
    auto_rank: int  # `auto` tries the backends that run a device from the highest rank down; the reference has 0
    interpreted_on: tuple[str, ...] = ()  # device types it runs only under a test interpreter registered there
    self_checks: bool = False  # `auto` checks it against the reference on each CUDA (device, dtype) before using it
    fused_sgd_dtypes: tuple[torch.dtype, ...] = ()  # dtypes its table has a fused restore_sgd_ kernel for
    # Its ops check every tensor's device and dtype against the first one's before writing anything, so ops.py hands
    # it the lists whole instead of grouping them first (grouping twice costs ~0.3 ms per call on 2000 tensors).
    validates_whole_lists: bool = False

    def op_table(self) -> object:
        """The object whose attributes are this backend's ops, called with the positional arguments of
        _registry.SCHEMAS, one (device, dtype) bucket per call."""
        return reference if self.namespace is None else getattr(torch.ops, self.namespace)

    def runs(self, device: torch.device) -> bool:
        """Whether it takes `device` tensors (availability and dtype aside)."""
        if self.devices is None or device.type in self.devices:
            return True
        return device.type in self.interpreted_on and _has_kernel(self.namespace, device.type.upper())


REFERENCE = "torch"  # runs every device and dtype: the fallback, and what the other backends are checked against
BACKENDS = (  # in the order backends() reports them
    Backend(REFERENCE, _load_reference, namespace=None, devices=None, dtypes=None, auto_rank=0),
    Backend("cpu", _load_cpu, namespace="sam_fused", devices=("cpu",), dtypes=COMPILED_DTYPES, auto_rank=2,
            fused_sgd_dtypes=(torch.float32,), validates_whole_lists=True),
    Backend("triton", _load_triton, namespace="sam_fused_triton", devices=("cuda",), dtypes=COMPILED_DTYPES,
            auto_rank=1, interpreted_on=("cpu",), self_checks=True),
    Backend("cuda", _load_cuda, namespace="sam_fused", devices=("cuda",), dtypes=COMPILED_DTYPES, auto_rank=2,
            self_checks=True),
)
_BY_NAME = {b.name: b for b in BACKENDS}
NAMES = tuple(_BY_NAME)
_status: dict[str, BackendStatus] = {}


def entry(name: str) -> Backend:
    """The table entry of backend `name` (KeyError if there is none)."""
    return _BY_NAME[name]


def status(name: str) -> BackendStatus:
    if name not in _status:
        _status[name] = _BY_NAME[name].load()
    return _status[name]


def backends() -> dict[str, BackendStatus]:
    """Every backend with whether it is usable in this process and why (not)."""
    return {name: status(name) for name in NAMES}


def op_table(name: str) -> object:
    """The object whose attributes are the ops of backend `name`."""
    return _BY_NAME[name].op_table()


@functools.cache
def auto_order(device_type: str) -> tuple[str, ...]:
    """The backends `auto` tries for `device_type` tensors, in order; the reference (rank 0) comes last."""
    candidates = [b for b in BACKENDS if b.devices is None or device_type in b.devices]
    return tuple(b.name for b in sorted(candidates, key=lambda b: -b.auto_rank))


def _takes_dtype(backend: Backend, dtype: torch.dtype) -> bool:
    return backend.dtypes is None or dtype in backend.dtypes


def _serves(name: str, device: torch.device, dtype: torch.dtype) -> bool:
    backend = _BY_NAME[name]
    return _takes_dtype(backend, dtype) and status(name).available and backend.runs(device)


_verified: dict[tuple[str, torch.device, torch.dtype], bool] = {}


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def self_check_backend(name: str, device: torch.device, dtype: torch.dtype | None = None) -> str | None:
    """selfcheck.self_check of backend `name` (None: it matches the reference), with torch's sync debug mode off
    while it runs: its host reads are the one-time exception to "no host sync" (docs/DESIGN.md section 5), and under
    set_sync_debug_mode("error") they would raise and fail a correct backend for the whole process."""
    mode = torch.cuda.get_sync_debug_mode() if device.type == "cuda" else 0
    if mode:
        torch.cuda.set_sync_debug_mode(0)
    try:
        return selfcheck.self_check(op_table(name), device, dtype)
    finally:
        if mode:
            torch.cuda.set_sync_debug_mode(mode)


def _verified_on(name: str, device: torch.device, dtype: torch.dtype) -> bool:
    """GPU backends picked by `auto` first prove themselves against the reference on each (device, dtype) they meet.
    The check synchronizes, so it cannot run inside a CUDA-graph capture: there an unverified (backend, device,
    dtype) raises, and nothing is recorded (a failure caused by the capture must not disable the backend)."""
    if device.type != "cuda" or not _BY_NAME[name].self_checks:
        return True
    key = (name, device, dtype)
    if key not in _verified:
        if _capturing(device):
            raise RuntimeError(
                f"sam_fused: backend {name!r} has not yet been checked against the reference for {dtype} on {device}, "
                "and the check cannot run during CUDA-graph capture: run one step (first_step + second_step, or the "
                "ops) before capturing, as torch.cuda.graphs recommends warm-up iterations")
        failure = self_check_backend(name, device, dtype)
        if _capturing(device):  # a capture began meanwhile (another thread): its errors are not the backend's
            raise RuntimeError(f"sam_fused: CUDA-graph capture started during the self-check of {name!r} on {device}")
        if failure:
            warnings.warn(f"sam_fused: backend {name!r} disagrees with the torch reference for {dtype} on {device} "
                          f"({failure}); falling back for the rest of this process", RuntimeWarning, stacklevel=3)
        _verified[key] = failure is None
    return _verified[key]


_chosen: dict[tuple[str, torch.device, torch.dtype], str] = {}


def choose(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend that runs one (device, dtype) bucket."""
    name = requested if requested != "auto" else os.environ.get("SAM_FUSED_BACKEND", "auto")
    key = (name, device, dtype)
    if key in _chosen:
        return _chosen[key]
    if name == "auto":
        order = auto_order(device.type)
        picked = next(b for b in order if _serves(b, device, dtype) and _verified_on(b, device, dtype))
    elif name not in _BY_NAME:
        raise ValueError(f"unknown sam_fused backend {name!r}; choose from {('auto',) + NAMES}")
    elif _serves(name, device, dtype):
        picked = name
    elif not _takes_dtype(_BY_NAME[name], dtype) and status(name).available:
        picked = REFERENCE  # compiled kernels skip fp64 and other dtypes; the reference takes them
    else:
        why = status(name).detail if not status(name).available else f"it does not run {device.type} tensors"
        raise RuntimeError(f"sam_fused backend {name!r} cannot run {dtype} on {device}: {why}")
    _chosen[key] = picked
    return picked


def warn_if_cpu_missing() -> None:
    s = status("cpu")
    if not s.available:
        warnings.warn(f"sam_fused: fused CPU kernels unavailable, using the torch reference ({s.detail})",
                      RuntimeWarning, stacklevel=3)
