// ops.h — the CUDA kernels of sam_fused's ops (docs/DESIGN.md section 3), registered in register.cpp.
#pragma once

#include "shared/op_signatures.h"

namespace sam_fused::cuda {
SAM_FUSED_DECLARE_OPS()
}  // namespace sam_fused::cuda
