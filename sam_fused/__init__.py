"""sam_fused: fused Sharpness-Aware Minimization for PyTorch (see README.md and docs/DESIGN.md)."""

from . import ops
from ._backends import BackendStatus, backends
from ._backends import warn_if_cpu_missing as _warn_if_cpu_missing
from .batchnorm import disable_running_stats, enable_running_stats, running_stats_disabled
from .distributed import local_perturbation
from .optim import SAM, FriendlySAM

__all__ = [
    "SAM",
    "BackendStatus",
    "FriendlySAM",
    "backends",
    "disable_running_stats",
    "enable_running_stats",
    "local_perturbation",
    "ops",
    "running_stats_disabled",
]

_warn_if_cpu_missing()
