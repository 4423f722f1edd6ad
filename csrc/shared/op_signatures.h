// op_signatures.h — the C++ signature of every sam_fused op, written once for all compiled backends. They mirror
// the schemas in sam_fused/_registry.py (Tensor[] -> TensorList, Tensor[]? -> optional TensorList,
// float -> double). A backend declares its kernels with `namespace sam_fused::<backend> { SAM_FUSED_DECLARE_OPS() }`
// and registers them all with SAM_FUSED_FOR_EACH_OP (register.cpp): a new op is added here, once.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

#define SAM_FUSED_DECLARE_OPS()                                                                                    \
  at::Tensor grad_sumsq(at::TensorList grads, std::optional<at::TensorList> params, double eta,                  \
                        int64_t micro_batches);                                                                  \
  void perturb_(at::TensorList params, at::TensorList grads, at::TensorList backups, const at::Tensor& sumsq,    \
                double rho, double eps, bool adaptive, double eta, bool normalize);                              \
  std::vector<at::Tensor> perturb_batched(at::TensorList params, at::TensorList grads, const at::Tensor& sumsq, \
                                          double rho, double eps, bool adaptive, double eta, bool normalize);    \
  void restore_(at::TensorList params, at::TensorList backups);                                                  \
  at::Tensor fsam_direction_(at::TensorList grads, at::TensorList ema, double sigma, double lmbda, bool first,   \
                             std::optional<at::TensorList> params, double eta);

// X(op) for every op above, e.g. `#define IMPL(op) m.impl(#op, TORCH_FN(sam_fused::cpu::op));` in a
// TORCH_LIBRARY_IMPL block. tests/test_backend_table.py (CPU) and .ci/cuda_check.sh (CUDA) fail when an op of
// SCHEMAS has no kernel.
#define SAM_FUSED_FOR_EACH_OP(X) X(grad_sumsq) X(perturb_) X(perturb_batched) X(restore_) X(fsam_direction_)
