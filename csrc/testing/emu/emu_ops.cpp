// emu_ops.cpp — the CUDA backend's ops (csrc/cuda/ops.cpp, the shipped host code) over CPU tensors, with its kernels
// (csrc/cuda/*.cu, rewritten for cuda_emu.h) run by the emulation, registered as torch.ops.sam_fused_emu.* so that
// tests/test_parity.py compares them with the torch reference on a machine without a GPU. Test support only: built
// on the fly by tests/native.py, never part of an installed extension.
//
// tests/native.py also compiles ops.cpp with its `#include "cuda/device.h"` pointed at emu_device.h (CPU target, no
// device guard or stream, NaN-filled scratch) and csrc/shared/host.cpp, and defines the schemas (and fakes) of
// sam_fused/_registry.py for this namespace before loading it. grad_sumsq.inc, perturb.inc and fsam_direction.inc
// are the rewritten kernel files.
#include "cuda_emu.h"  // first: it redefines the CUDA keywords the kernel files use

#include "fsam_direction.inc"
#include "perturb.inc"
#include "grad_sumsq.inc"

#include <torch/library.h>

#include "cuda/ops.h"

namespace {

int64_t launch_count() { return emu::launch_count; }

}  // namespace

TORCH_LIBRARY_IMPL(sam_fused_emu, CPU, m) {
#define SAM_FUSED_IMPL(op) m.impl(#op, TORCH_FN(sam_fused::cuda::op));
  SAM_FUSED_FOR_EACH_OP(SAM_FUSED_IMPL)
#undef SAM_FUSED_IMPL
}

TORCH_LIBRARY_FRAGMENT(sam_fused_emu, m) { m.def("launch_count() -> int", TORCH_FN(launch_count)); }
