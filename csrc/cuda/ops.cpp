// ops.cpp — host side of the CUDA ops (docs/DESIGN.md section 3): validate the lists, stage non-dense layouts, allocate
// outputs and reduction buffers, plan the launches (mta_planner.h) and enqueue the kernels (launch.h) on the current
// CUDA stream of the tensors' device. Nothing here waits for the GPU or reads device memory: data-dependent scalars
// (sumsq) are read by the kernels, so the ops can be captured in a CUDA graph.
#include "cuda/ops.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/checks.h"
#include "cuda/launch.h"

namespace sam_fused::cuda {
namespace {

// Sums of squares are fp64 for every storage dtype (csrc/shared/sam_math.h), on the device and for empty lists.
at::TensorOptions sumsq_options() { return at::TensorOptions().dtype(at::kDouble); }
at::TensorOptions sumsq_on(const CallInfo& call) { return sumsq_options().device(call.device); }

cudaStream_t current_stream(const CallInfo& call) {
  return c10::cuda::getCurrentCUDAStream(call.device.index()).stream();
}

// Both stages of a reduction into k sums: stage1(partials) enqueues the op's kernels, which leave per-block partial
// sums in a [k, total_blocks] fp64 buffer; finish_sums adds each row in a fixed order. No blocks (every tensor
// empty): zeros.
template <class Stage1>
at::Tensor two_stage_sum(const mta::Plan& plan, int64_t k, const CallInfo& call, cudaStream_t stream,
                         Stage1&& stage1) {
  if (plan.total_blocks == 0) return at::zeros({k}, sumsq_on(call));
  at::Tensor partials = at::empty({k * plan.total_blocks}, sumsq_on(call));
  C10_CUDA_CHECK(stage1(partials.data_ptr<double>()));
  at::Tensor out = at::empty({k}, sumsq_on(call));
  C10_CUDA_CHECK(launch_finish_sums(partials.const_data_ptr<double>(), plan.total_blocks, k, out.data_ptr<double>(),
                                    stream));
  return out;
}

}  // namespace

at::Tensor grad_sumsq(at::TensorList grads, std::optional<at::TensorList> params, double eta, int64_t micro_batches) {
  constexpr const char* op = "grad_sumsq";
  TORCH_CHECK_VALUE(micro_batches >= 1, "sam_fused.", op, ": micro_batches must be >= 1, got ", micro_batches);
  const int64_t k = micro_batches;
  if (params) check_length(op, "params", params->size(), "grads", grads.size());
  if (grads.empty()) return at::zeros({k}, sumsq_options());  // as the reference: on the CPU
  const CallInfo call = call_info(op, "grads", grads[0]);
  const c10::cuda::CUDAGuard guard(call.device);
  Staging staging;
  PtrTable<2> table;
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor& g = grads[i];
    check_tensor(op, "grads", i, g, call);
    at::Tensor p;
    int64_t n = 0;
    if (params) {
      p = (*params)[i];
      check_tensor(op, "params", i, p, call);
      if (k > 1) {
        check_shape(op, "grads", i, g, with_leading(k, p.sizes()));
      } else {
        check_shape(op, "grads", i, g, p.sizes());
      }
      n = p.numel();
    } else {
      TORCH_CHECK_VALUE(k == 1 || (g.dim() >= 1 && g.size(0) == k), "sam_fused.", op, ": grads[", i,
                        "] has shape ", g.sizes(), "; expected leading dim ", k);
      n = g.numel() / k;
    }
    const auto t = staging.position<2>({g, p}, {false, false}, /*contiguous_only=*/k > 1);
    table.ptrs[0].push_back(address(t[0]));
    table.ptrs[1].push_back(address(t[1]));
    table.numel.push_back(n);
  }
  const mta::Plan plan = plan_for_depth(table.numel, 2);
  const cudaStream_t stream = current_stream(call);
  at::Tensor out = two_stage_sum(plan, k, call, stream, [&](double* partials) {
    return launch_grad_sumsq(call.kernel_dtype, plan, table, k, static_cast<float>(eta), partials, stream);
  });
  staging.finish();
  return out;
}

void perturb_(at::TensorList params, at::TensorList grads, at::TensorList backups, const at::Tensor& sumsq, double rho,
              double eps, bool adaptive, double eta, bool normalize) {
  constexpr const char* op = "perturb_";
  check_length(op, "grads", grads.size(), "params", params.size());
  check_length(op, "backups", backups.size(), "params", params.size());
  if (params.empty()) return;
  const CallInfo call = call_info(op, "params", params[0]);
  const c10::cuda::CUDAGuard guard(call.device);
  const at::Tensor s = device_sumsq(op, sumsq, 1, /*exact=*/false, call);
  Staging staging;
  PtrTable<3> table;
  for (size_t i = 0; i < params.size(); ++i) {
    check_tensor(op, "params", i, params[i], call);
    check_tensor(op, "grads", i, grads[i], call);
    check_tensor(op, "backups", i, backups[i], call);
    check_shape(op, "grads", i, grads[i], params[i].sizes());
    check_shape(op, "backups", i, backups[i], params[i].sizes());
    check_writable(op, "params", i, params[i]);
    check_writable(op, "backups", i, backups[i]);
    const auto t = staging.position<3>({params[i], grads[i], backups[i]}, {true, false, true}, false);
    for (int d = 0; d < 3; ++d) table.ptrs[d].push_back(address(t[d]));
    table.numel.push_back(params[i].numel());
  }
  const mta::Plan plan = plan_for_depth(table.numel, 3);
  if (plan.total_blocks > 0) {
    const PerturbScalars scalars{rho, eps, static_cast<float>(eta), adaptive, normalize};
    C10_CUDA_CHECK(launch_perturb(call.kernel_dtype, plan, table, s.const_data_ptr<double>(), scalars,
                                  current_stream(call)));
  }
  staging.finish();
}

std::vector<at::Tensor> perturb_batched(at::TensorList params, at::TensorList grads, const at::Tensor& sumsq,
                                        double rho, double eps, bool adaptive, double eta, bool normalize) {
  constexpr const char* op = "perturb_batched";
  check_length(op, "grads", grads.size(), "params", params.size());
  TORCH_CHECK_VALUE(sumsq.defined() && sumsq.numel() >= 1, "sam_fused.", op,
                    ": sumsq must hold one sum of squares per micro-batch (at least one)");
  const int64_t k = sumsq.numel();
  if (params.empty()) return {};
  const CallInfo call = call_info(op, "params", params[0]);
  const c10::cuda::CUDAGuard guard(call.device);
  const at::Tensor s = device_sumsq(op, sumsq, k, /*exact=*/true, call);
  Staging staging;
  PtrTable<3> table;
  std::vector<at::Tensor> outs;
  outs.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    check_tensor(op, "params", i, p, call);
    check_tensor(op, "grads", i, grads[i], call);
    const std::vector<int64_t> shape = with_leading(k, p.sizes());
    check_shape(op, "grads", i, grads[i], shape);
    outs.push_back(at::empty(shape, p.options()));  // contiguous, like the reference's .to(dtype)
    const auto t = staging.position<2>({p, grads[i]}, {false, false}, /*contiguous_only=*/true);
    table.ptrs[0].push_back(address(t[0]));
    table.ptrs[1].push_back(address(t[1]));
    table.ptrs[2].push_back(address(outs.back()));
    table.numel.push_back(p.numel());
  }
  const mta::Plan plan = plan_for_depth(table.numel, 3);
  if (plan.total_blocks > 0) {
    const PerturbScalars scalars{rho, eps, static_cast<float>(eta), adaptive, normalize};
    C10_CUDA_CHECK(launch_perturb_batched(call.kernel_dtype, plan, table, k, s.const_data_ptr<double>(), scalars,
                                          current_stream(call)));
  }
  return outs;
}

void restore_(at::TensorList params, at::TensorList backups) {
  constexpr const char* op = "restore_";
  check_length(op, "backups", backups.size(), "params", params.size());
  if (params.empty()) return;
  const CallInfo call = call_info(op, "params", params[0]);
  const c10::cuda::CUDAGuard guard(call.device);
  Staging staging;
  PtrTable<2> table;
  for (size_t i = 0; i < params.size(); ++i) {
    check_tensor(op, "params", i, params[i], call);
    check_tensor(op, "backups", i, backups[i], call);
    check_shape(op, "backups", i, backups[i], params[i].sizes());
    check_writable(op, "params", i, params[i]);
    const auto t = staging.position<2>({params[i], backups[i]}, {true, false}, false);
    table.ptrs[0].push_back(address(t[0]));
    table.ptrs[1].push_back(address(t[1]));
    table.numel.push_back(params[i].numel());
  }
  const mta::Plan plan = plan_for_depth(table.numel, 2);
  if (plan.total_blocks > 0) {
    C10_CUDA_CHECK(launch_restore(params[0].element_size(), plan, table, current_stream(call)));
  }
  staging.finish();
}

at::Tensor fsam_direction_(at::TensorList grads, at::TensorList ema, double sigma, double lmbda, bool first,
                           std::optional<at::TensorList> params, double eta) {
  constexpr const char* op = "fsam_direction_";
  check_length(op, "ema", ema.size(), "grads", grads.size());
  if (params) check_length(op, "params", params->size(), "grads", grads.size());
  if (grads.empty()) return at::zeros({1}, sumsq_options());  // as the reference: on the CPU
  const CallInfo call = call_info(op, "grads", grads[0]);
  const c10::cuda::CUDAGuard guard(call.device);
  Staging staging;
  PtrTable<3> table;
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor& g = grads[i];
    check_tensor(op, "grads", i, g, call);
    check_tensor(op, "ema", i, ema[i], call);
    check_shape(op, "ema", i, ema[i], g.sizes());
    at::Tensor p;
    if (params) {
      p = (*params)[i];
      check_tensor(op, "params", i, p, call);
      check_shape(op, "params", i, p, g.sizes());
    }
    check_writable(op, "grads", i, g);
    check_writable(op, "ema", i, ema[i]);
    const auto t = staging.position<3>({g, ema[i], p}, {true, true, false}, false);
    for (int d = 0; d < 3; ++d) table.ptrs[d].push_back(address(t[d]));
    table.numel.push_back(g.numel());
  }
  const mta::Plan plan = plan_for_depth(table.numel, 3);
  // The reference computes 1 - lmbda in double (Python) and rounds it to fp32 when it multiplies.
  const FsamScalars scalars{static_cast<float>(sigma), static_cast<float>(lmbda), static_cast<float>(1.0 - lmbda),
                            static_cast<float>(eta), first};
  const cudaStream_t stream = current_stream(call);
  at::Tensor out = two_stage_sum(plan, 1, call, stream, [&](double* partials) {
    return launch_fsam(call.kernel_dtype, plan, table, scalars, partials, stream);
  });
  staging.finish();
  return out;
}

}  // namespace sam_fused::cuda
