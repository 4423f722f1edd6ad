"""Triton backend of sam_fused (installed as ``sam_fused.kernels``; docs/DESIGN.md sections 3-4).

Importing this package registers the Triton kernels as the ``CUDA`` implementations of the ``sam_fused_triton::*``
ops (and as their ``CPU`` implementations when ``TRITON_INTERPRET=1``, for testing with the Triton interpreter).
Without the ``triton`` package it raises ModuleNotFoundError (name ``triton``, so ``pytest.importorskip`` skips), which
``sam_fused.backends()`` reports as "unavailable".

Files: numerics.py (per-element helpers, tile sizes, alignment hints), tables.py (address tables + cache, pinned
during CUDA graph capture), checks.py (validation cached per call, layouts and staging, the device guard); one file per
op, named like the op in every backend: grad_sumsq.py, perturb.py (perturb_, perturb_batched, restore_),
fsam_direction.py; register.py (torch.library registration), aot.py (compile every specialization without a GPU, PTX
checks).
"""

try:
    import triton  # noqa: F401
except ImportError as e:
    raise ModuleNotFoundError(f"the Triton backend needs the 'triton' package (pip install triton, or the extra "
                              f"sam_fused[triton]): {e}", name="triton") from e

from . import tables
from .checks import INTERPRET
from .register import DISPATCH_KEYS, IMPLS

__all__ = ["DISPATCH_KEYS", "IMPLS", "INTERPRET", "tables"]
