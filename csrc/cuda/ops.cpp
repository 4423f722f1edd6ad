// ops.cpp — host side of the CUDA ops (docs/DESIGN.md section 3): validate the lists, stage non-dense layouts, allocate
// outputs and reduction buffers, plan the launches (mta_planner.h) and enqueue the kernels (launch.h) on the current
// CUDA stream of the tensors' device. Nothing here waits for the GPU or reads device memory: data-dependent scalars
// (sumsq) are read by the kernels, so the ops can be captured in a CUDA graph.
#include "cuda/ops.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include "cuda/device.h"  // c10::cuda: guard, stream, error check (csrc/testing/emu brings its own)
#include "cuda/launch.h"
#include "shared/host.h"

namespace sam_fused::cuda {
namespace {

using host::Access;
using host::Shape;

// Sums of squares are fp64 for every storage dtype (csrc/shared/sam_math.h), on the device and for empty lists.
at::TensorOptions sumsq_options() { return at::TensorOptions().dtype(at::kDouble); }

DType kernel_dtype(const host::Lists& lists) {
  switch (lists.dtype()) {
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kHalf:
      return DType::kHalf;
    default:
      return DType::kFloat;  // host::prepare admits float32, bfloat16 and float16 only
  }
}

// The kernels' address table: D lists (null for an absent one) and each position's element count (per slice).
template <int D>
PtrTable<D> table_of(const host::Lists& lists) {
  PtrTable<D> table;
  for (int d = 0; d < D; ++d) table.ptrs[d].reserve(lists.size());
  table.numel.reserve(lists.size());
  for (size_t i = 0; i < lists.size(); ++i) {
    for (int d = 0; d < D; ++d) table.ptrs[d].push_back(lists.data<void>(d, i));
    table.numel.push_back(lists.numel(i));
  }
  return table;
}

// Both stages of a reduction into k sums: stage1(partials) enqueues the op's kernels, which leave per-block partial
// sums in a [k, total_blocks] fp64 buffer; finish_sums adds each row in a fixed order. No blocks (every tensor
// empty): zeros.
template <class Stage1>
at::Tensor two_stage_sum(const mta::Plan& plan, int64_t k, at::Device device, cudaStream_t stream, Stage1&& stage1) {
  const auto options = sumsq_options().device(device);
  if (plan.total_blocks == 0) return at::zeros({k}, options);
  at::Tensor partials = scratch(k * plan.total_blocks, options);
  check_launch(stage1(partials.data_ptr<double>()));
  at::Tensor out = at::empty({k}, options);
  check_launch(launch_finish_sums(partials.const_data_ptr<double>(), plan.total_blocks, k, out.data_ptr<double>(),
                                  stream));
  return out;
}

}  // namespace

at::Tensor grad_sumsq(at::TensorList grads, std::optional<at::TensorList> params, double eta, int64_t micro_batches) {
  constexpr const char* op = "grad_sumsq";
  const int64_t k = micro_batches;
  TORCH_CHECK_VALUE(k >= 1, "sam_fused.", op, ": micro_batches must be >= 1, got ", k);
  const host::Lists lists = host::prepare(
      kTarget, op,
      {{"grads", grads, Access::kRead, Shape::kSlices},
       {"params", params.value_or(at::TensorList()), Access::kRead, Shape::kBase, params.has_value()}},
      k, k > 1 ? host::Layout::kContiguous : host::Layout::kDense);
  if (lists.empty()) return at::zeros({k}, sumsq_options());  // as the reference: on the CPU
  const DeviceGuard guard(lists.device());
  const auto table = table_of<2>(lists);
  const mta::Plan plan = plan_for_depth(table.numel, 2);
  const cudaStream_t stream = current_stream(lists.device());
  return two_stage_sum(plan, k, lists.device(), stream, [&](double* partials) {
    return launch_grad_sumsq(kernel_dtype(lists), plan, table, k, static_cast<float>(eta), partials, stream);
  });
}

void perturb_(at::TensorList params, at::TensorList grads, at::TensorList backups, const at::Tensor& sumsq, double rho,
              double eps, bool adaptive, double eta, bool normalize) {
  constexpr const char* op = "perturb_";
  host::Lists lists = host::prepare(
      kTarget, op,
      {{"params", params, Access::kWrite}, {"grads", grads}, {"backups", backups, Access::kOverwrite}});
  if (lists.empty()) return;
  const DeviceGuard guard(lists.device());
  const at::Tensor s = host::sumsq_arg(op, sumsq, 1, /*exact=*/false, lists.device());
  const auto table = table_of<3>(lists);
  const mta::Plan plan = plan_for_depth(table.numel, 3);
  if (plan.total_blocks > 0) {
    const PerturbScalars scalars{rho, eps, static_cast<float>(eta), adaptive, normalize};
    check_launch(launch_perturb(kernel_dtype(lists), plan, table, s.const_data_ptr<double>(), scalars,
                                current_stream(lists.device())));
  }
  lists.finish();
}

std::vector<at::Tensor> perturb_batched(at::TensorList params, at::TensorList grads, const at::Tensor& sumsq,
                                        double rho, double eps, bool adaptive, double eta, bool normalize) {
  constexpr const char* op = "perturb_batched";
  const int64_t k = sumsq.defined() ? sumsq.numel() : 0;  // one sum per micro-batch, as in the reference
  TORCH_CHECK_VALUE(params.empty() || k >= 1, "sam_fused.", op, ": sumsq must hold one sum per micro-batch (k >= 1)");
  host::Lists lists = host::prepare(kTarget, op,
                                    {{"params", params}, {"grads", grads, Access::kRead, Shape::kLeading}}, k,
                                    host::Layout::kContiguous);
  if (lists.empty()) return {};
  const DeviceGuard guard(lists.device());
  const at::Tensor s = host::sumsq_arg(op, sumsq, k, /*exact=*/true, lists.device());
  std::vector<at::Tensor> outs = lists.outputs_like(grads);  // list 2
  const auto table = table_of<3>(lists);
  const mta::Plan plan = plan_for_depth(table.numel, 3);
  if (plan.total_blocks > 0) {
    const PerturbScalars scalars{rho, eps, static_cast<float>(eta), adaptive, normalize};
    check_launch(launch_perturb_batched(kernel_dtype(lists), plan, table, k, s.const_data_ptr<double>(), scalars,
                                        current_stream(lists.device())));
  }
  lists.finish();
  return outs;
}

void restore_(at::TensorList params, at::TensorList backups) {
  host::Lists lists =
      host::prepare(kTarget, "restore_", {{"params", params, Access::kOverwrite}, {"backups", backups}});
  if (lists.empty()) return;
  const DeviceGuard guard(lists.device());
  const auto table = table_of<2>(lists);
  const mta::Plan plan = plan_for_depth(table.numel, 2);
  if (plan.total_blocks > 0) {
    check_launch(launch_restore(at::elementSize(lists.dtype()), plan, table, current_stream(lists.device())));
  }
  lists.finish();
}

at::Tensor fsam_direction_(at::TensorList grads, at::TensorList ema, double sigma, double lmbda, bool first,
                           std::optional<at::TensorList> params, double eta) {
  constexpr const char* op = "fsam_direction_";
  // The first step leaves the gradients as they are and only writes the EMA.
  host::Lists lists = host::prepare(
      kTarget, op,
      {{"grads", grads, first ? Access::kRead : Access::kWrite},
       {"ema", ema, first ? Access::kOverwrite : Access::kWrite},
       {"params", params.value_or(at::TensorList()), Access::kRead, Shape::kBase, params.has_value()}});
  if (lists.empty()) return at::zeros({1}, sumsq_options());  // as the reference: on the CPU
  const DeviceGuard guard(lists.device());
  const auto table = table_of<3>(lists);
  const mta::Plan plan = plan_for_depth(table.numel, 3);
  // The reference computes 1 - lmbda in double (Python) and rounds it to fp32 when it multiplies.
  const FsamScalars scalars{static_cast<float>(sigma), static_cast<float>(lmbda), static_cast<float>(1.0 - lmbda),
                            static_cast<float>(eta), first};
  const cudaStream_t stream = current_stream(lists.device());
  at::Tensor out = two_stage_sum(plan, 1, lists.device(), stream, [&](double* partials) {
    return launch_fsam(kernel_dtype(lists), plan, table, scalars, partials, stream);
  });
  lists.finish();
  return out;
}

}  // namespace sam_fused::cuda
