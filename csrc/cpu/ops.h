// ops.h — the CPU kernels of sam_fused's ops (DESIGN section 3), registered in register.cpp.
#pragma once

#include "shared/op_signatures.h"

namespace sam_fused::cpu {
SAM_FUSED_DECLARE_OPS()
}  // namespace sam_fused::cpu
