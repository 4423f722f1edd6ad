"""pytest configuration shared by the test suite."""

# Triton kernels run under the Triton interpreter on CPU tensors when there is no GPU (docs/DESIGN.md section 7).
# Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when sam_fused.kernels is first imported, so it is set
# here, before any test module imports sam_fused or triton (`import torch` does not import triton). On a GPU machine it
# is left unset and the compiled kernels run. An explicit TRITON_INTERPRET in the environment wins.
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
