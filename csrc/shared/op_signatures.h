// op_signatures.h — the C++ signature of every sam_fused op, written once for all compiled backends. They mirror
// the schemas in sam_fused/_registry.py (Tensor[] -> TensorList, Tensor[]? -> optional TensorList,
// float -> double). A backend declares its kernels with `namespace sam_fused::<backend> { SAM_FUSED_DECLARE_OPS() }`.
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
