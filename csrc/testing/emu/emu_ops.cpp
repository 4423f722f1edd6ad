// emu_ops.cpp — the CUDA launchers (csrc/cuda/*.cu, rewritten for cuda_emu.h) as ops over CPU tensors, namespace
// sam_fused_emu, so tests/test_cuda_planner.py can compare the kernels' results with the torch reference on a machine
// without a GPU. Test support only: built on the fly by that test, never part of an installed extension.
//
// The wrappers mirror what csrc/cuda/ops.cpp hands the launchers (one address and element count per tensor, the
// plan of plan_for_depth, fp64 sumsq and partial-sum buffers, rho and eps as given) for contiguous tensors; validation
// and layout staging are ops.cpp's job and are not exercised here. grad_sumsq.inc, perturb.inc and fsam_direction.inc are the
// rewritten kernel files.
#include "cuda_emu.h"  // first: it redefines the CUDA keywords the kernel files use

#include "fsam_direction.inc"
#include "perturb.inc"
#include "grad_sumsq.inc"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <functional>
#include <optional>
#include <vector>

namespace {

using namespace sam_fused::cuda;

DType kernel_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kHalf:
      return DType::kHalf;
    default:
      TORCH_CHECK_TYPE(false, "sam_fused_emu: unsupported dtype ", t.scalar_type());
  }
}

void* addr(const at::Tensor& t) {
  TORCH_CHECK(!t.defined() || t.is_contiguous(), "sam_fused_emu takes contiguous tensors");
  return t.defined() ? t.data_ptr() : nullptr;
}

void check(cudaError_t err) { TORCH_CHECK(err == cudaSuccess, "sam_fused_emu: launcher returned error ", err); }

// Stage 1 writes into a NaN-filled buffer, so a partial sum a block failed to write poisons the result.
at::Tensor two_stage(const sam_fused::mta::Plan& plan, int64_t k, const std::function<cudaError_t(double*)>& stage1) {
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  if (plan.total_blocks == 0) return at::zeros({k}, f64);
  at::Tensor partials = at::full({k * plan.total_blocks}, NAN, f64);
  check(stage1(partials.data_ptr<double>()));
  at::Tensor out = at::empty({k}, f64);
  check(launch_finish_sums(partials.data_ptr<double>(), plan.total_blocks, k, out.data_ptr<double>(), nullptr));
  return out;
}

at::Tensor grad_sumsq(at::TensorList grads, std::optional<at::TensorList> params, double eta, int64_t k) {
  PtrTable<2> t;
  for (size_t i = 0; i < grads.size(); ++i) {
    t.ptrs[0].push_back(addr(grads[i]));
    t.ptrs[1].push_back(params ? addr((*params)[i]) : nullptr);
    t.numel.push_back(grads[i].numel() / k);
  }
  const auto plan = plan_for_depth(t.numel, 2);
  return two_stage(plan, k, [&](double* partials) {
    return launch_grad_sumsq(kernel_dtype(grads[0]), plan, t, k, static_cast<float>(eta), partials, nullptr);
  });
}

PerturbScalars scalars(double rho, double eps, double eta, bool adaptive, bool normalize) {
  return PerturbScalars{rho, eps, static_cast<float>(eta), adaptive, normalize};
}

void perturb_(at::TensorList params, at::TensorList grads, at::TensorList backups, const at::Tensor& sumsq, double rho,
              double eps, bool adaptive, double eta, bool normalize) {
  PtrTable<3> t;
  for (size_t i = 0; i < params.size(); ++i) {
    t.ptrs[0].push_back(addr(params[i]));
    t.ptrs[1].push_back(addr(grads[i]));
    t.ptrs[2].push_back(addr(backups[i]));
    t.numel.push_back(params[i].numel());
  }
  const auto plan = plan_for_depth(t.numel, 3);
  const at::Tensor s = sumsq.reshape({-1}).slice(0, 0, 1).to(at::kDouble).contiguous();
  check(launch_perturb(kernel_dtype(params[0]), plan, t, s.data_ptr<double>(),
                       scalars(rho, eps, eta, adaptive, normalize), nullptr));
}

std::vector<at::Tensor> perturb_batched(at::TensorList params, at::TensorList grads, const at::Tensor& sumsq,
                                        double rho, double eps, bool adaptive, double eta, bool normalize) {
  const int64_t k = sumsq.numel();
  PtrTable<3> t;
  std::vector<at::Tensor> outs;
  for (size_t i = 0; i < params.size(); ++i) {
    std::vector<int64_t> shape{k};
    shape.insert(shape.end(), params[i].sizes().begin(), params[i].sizes().end());
    outs.push_back(at::full(shape, 12345.0, params[i].options()));  // a value no element should keep
    t.ptrs[0].push_back(addr(params[i]));
    t.ptrs[1].push_back(addr(grads[i]));
    t.ptrs[2].push_back(addr(outs.back()));
    t.numel.push_back(params[i].numel());
  }
  const auto plan = plan_for_depth(t.numel, 3);
  const at::Tensor s = sumsq.to(at::kDouble).contiguous();
  check(launch_perturb_batched(kernel_dtype(params[0]), plan, t, k, s.data_ptr<double>(),
                               scalars(rho, eps, eta, adaptive, normalize), nullptr));
  return outs;
}

void restore_(at::TensorList params, at::TensorList backups) {
  PtrTable<2> t;
  for (size_t i = 0; i < params.size(); ++i) {
    t.ptrs[0].push_back(addr(params[i]));
    t.ptrs[1].push_back(addr(backups[i]));
    t.numel.push_back(params[i].numel());
  }
  const auto plan = plan_for_depth(t.numel, 2);
  if (!params.empty()) check(launch_restore(params[0].element_size(), plan, t, nullptr));
}

at::Tensor fsam_direction_(at::TensorList grads, at::TensorList ema, double sigma, double lmbda, bool first,
                           std::optional<at::TensorList> params, double eta) {
  PtrTable<3> t;
  for (size_t i = 0; i < grads.size(); ++i) {
    t.ptrs[0].push_back(addr(grads[i]));
    t.ptrs[1].push_back(addr(ema[i]));
    t.ptrs[2].push_back(params ? addr((*params)[i]) : nullptr);
    t.numel.push_back(grads[i].numel());
  }
  const auto plan = plan_for_depth(t.numel, 3);
  const FsamScalars s{static_cast<float>(sigma), static_cast<float>(lmbda), static_cast<float>(1.0 - lmbda),
                      static_cast<float>(eta), first};
  return two_stage(plan, 1, [&](double* partials) {
    return launch_fsam(kernel_dtype(grads[0]), plan, t, s, partials, nullptr);
  });
}

int64_t launch_count() { return emu::launch_count; }

}  // namespace

TORCH_LIBRARY(sam_fused_emu, m) {
  m.def("grad_sumsq(Tensor[] grads, Tensor[]? params, float eta, int micro_batches) -> Tensor", TORCH_FN(grad_sumsq));
  m.def("perturb_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] backups, Tensor sumsq, float rho, float eps, "
        "bool adaptive, float eta, bool normalize) -> ()",
        TORCH_FN(perturb_));
  m.def("perturb_batched(Tensor[] params, Tensor[] grads, Tensor sumsq, float rho, float eps, bool adaptive, "
        "float eta, bool normalize) -> Tensor[]",
        TORCH_FN(perturb_batched));
  m.def("restore_(Tensor(a!)[] params, Tensor[] backups) -> ()", TORCH_FN(restore_));
  m.def("fsam_direction_(Tensor(a!)[] grads, Tensor(b!)[] ema, float sigma, float lmbda, bool first, "
        "Tensor[]? params, float eta) -> Tensor",
        TORCH_FN(fsam_direction_));
  m.def("launch_count() -> int", TORCH_FN(launch_count));
}
