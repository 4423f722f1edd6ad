"""sam_fused: fused Sharpness-Aware Minimization for PyTorch (see README.md and DESIGN.md)."""

from . import ops
from ._backends import BackendStatus, backends
from ._backends import warn_if_cpu_missing as _warn_if_cpu_missing

__all__ = ["BackendStatus", "backends", "ops"]

_warn_if_cpu_missing()
