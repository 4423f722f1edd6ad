// ops.h — the CPU kernels of sam_fused's ops (docs/DESIGN.md section 3), registered in register.cpp.
#pragma once

#include "shared/op_signatures.h"

namespace sam_fused::cpu {
SAM_FUSED_DECLARE_OPS()

// Fused optimizer steps (sam_fused/_registry.py STEP_SCHEMAS), CPU only.
void restore_sgd_(at::TensorList params, at::TensorList backups, at::TensorList grads,
                  at::TensorList momentum_buffers, double lr, double weight_decay, double momentum, double dampening,
                  bool nesterov);
}  // namespace sam_fused::cpu
