// checks.cpp — input validation and dense-layout helpers for the CPU kernels (declared in common.h).
//
// The op layer (sam_fused/ops.py) validates lists before dispatching, but torch.ops.sam_fused.* can be called
// directly, so every kernel re-checks what its raw-pointer loops rely on: list lengths, shapes, dtypes, devices,
// strided layout and non-overlapping outputs. A failed check raises (ValueError / TypeError in Python) with the op,
// the list and the index; nothing here may crash or read out of bounds.
#include "common.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

namespace sam_fused::cpu {

void check_same_length(const char* op, at::TensorList a, const char* a_name, at::TensorList b, const char* b_name) {
  TORCH_CHECK_VALUE(a.size() == b.size(), "sam_fused.", op, ": ", b_name, " has ", b.size(), " tensors but ", a_name,
                    " has ", a.size());
}

// Wording and exception types follow sam_fused/_checks.py (the Python backends' checks), so a caller sees the same
// errors whichever backend runs: TypeError for what a tensor is, ValueError for how it relates to the others.
namespace {

// `index` < 0: `list` names the tensor by itself. Message arguments are only evaluated on failure (TORCH_CHECK is
// lazy), so the success path, which runs for every tensor of every call, builds no strings.
void check_real_floating(const char* op, at::ScalarType dtype, const char* list, int64_t index) {
  TORCH_CHECK_TYPE(!at::isComplexType(dtype), "sam_fused.", op, ": ", list,
                   index < 0 ? "" : "[" + std::to_string(index) + "]", " is complex (", dtype,
                   "); sam_fused supports real floating-point tensors only");
  TORCH_CHECK_TYPE(at::isFloatingType(dtype), "sam_fused.", op, ": ", list,
                   index < 0 ? "" : "[" + std::to_string(index) + "]", " has dtype ", dtype,
                   "; expected a floating-point tensor");
}

}  // namespace

void check_supported_dtype(const char* op, at::ScalarType dtype, const char* list) {
  check_real_floating(op, dtype, list, -1);
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, "sam_fused.", op, ": ", list,
                   " has dtype ", dtype, "; the CPU kernels support float32, bfloat16 and float16 ",
                   "(other dtypes run on the torch backend)");
}

void check_tensor(const char* op, const at::Tensor& t, const char* list, size_t i, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(t.defined(), "sam_fused.", op, ": ", list, "[", i, "] is undefined");
  TORCH_CHECK_TYPE(t.layout() == at::kStrided, "sam_fused.", op, ": ", list, "[", i,
                   "] is a sparse/non-strided tensor (", t.layout(), "); sam_fused needs dense tensors");
  if (t.scalar_type() != dtype) check_real_floating(op, t.scalar_type(), list, static_cast<int64_t>(i));
  TORCH_CHECK_VALUE(t.device().is_cpu(), "sam_fused.", op, ": ", list, "[", i, "] is on ", t.device(),
                    "; the CPU kernels need CPU tensors");
  TORCH_CHECK_VALUE(t.scalar_type() == dtype, "sam_fused.", op, ": ", list, "[", i, "] has dtype ", t.scalar_type(),
                    ", expected ", dtype, " like the first tensor (one call takes one dtype)");
}

void check_shape(const char* op, const at::Tensor& t, const char* list, size_t i, at::IntArrayRef expected) {
  TORCH_CHECK_VALUE(t.sizes() == expected, "sam_fused.", op, ": ", list, "[", i, "] has shape ", t.sizes(),
                    ", expected ", expected);
}

void check_no_overlap(const char* op, const at::Tensor& t, const char* list, size_t i) {
  TORCH_CHECK_VALUE(at::has_internal_overlap(t) != at::MemOverlap::Yes, "sam_fused.", op, ": ", list, "[", i,
                    "] is written in place but has internally overlapping memory (e.g. an expanded view)");
}

std::vector<double> read_sumsq(const char* op, const at::Tensor& sumsq, int64_t k, bool exact_numel) {
  TORCH_CHECK_VALUE(sumsq.defined() && sumsq.layout() == at::kStrided && sumsq.device().is_cpu(), "sam_fused.", op,
                    ": sumsq must be a dense CPU tensor");
  TORCH_CHECK_TYPE(at::isFloatingType(sumsq.scalar_type()), "sam_fused.", op,
                   ": sumsq must be floating point, got ", sumsq.scalar_type());
  if (exact_numel) {
    TORCH_CHECK_VALUE(sumsq.numel() == k, "sam_fused.", op, ": sumsq has ", sumsq.numel(),
                      " elements, expected one per micro-batch (", k, ")");
  } else {
    TORCH_CHECK_VALUE(sumsq.numel() >= 1, "sam_fused.", op, ": sumsq is empty");
  }
  // Host memory: reading it here is what the reference's device-side where(isfinite(sumsq), ...) amounts to.
  const at::Tensor flat = sumsq.reshape(-1).slice(0, 0, exact_numel ? k : 1).to(at::kDouble).contiguous();
  const double* p = flat.const_data_ptr<double>();
  return std::vector<double>(p, p + flat.numel());
}

std::vector<int64_t> with_leading(int64_t k, at::IntArrayRef shape) {
  std::vector<int64_t> out;
  out.reserve(shape.size() + 1);
  out.push_back(k);
  out.insert(out.end(), shape.begin(), shape.end());
  return out;
}

at::Tensor Partials::combine() const {
  std::vector<double> total(static_cast<size_t>(k_), 0.0);
  for (size_t i = 0; i < v_.size(); ++i) total[i % static_cast<size_t>(k_)] += v_[i];
  at::Tensor out = at::empty({k_}, at::TensorOptions().dtype(at::kDouble));
  std::copy(total.begin(), total.end(), out.data_ptr<double>());
  return out;
}

bool same_dense_layout(const at::Tensor& a, const at::Tensor& b) {
  return a.sizes() == b.sizes() && a.strides() == b.strides() && a.is_non_overlapping_and_dense();
}

const at::Tensor& LayoutScope::keep(at::Tensor t) {
  kept_.push_back(std::move(t));
  return kept_.back();
}

const at::Tensor& LayoutScope::input(const at::Tensor& t, const at::Tensor& like) {
  if (same_dense_layout(t, like)) return t;
  return keep(at::empty_like(like).copy_(t));  // empty_like keeps a dense tensor's strides
}

const at::Tensor& LayoutScope::output(const at::Tensor& t, const at::Tensor& like, bool read) {
  if (same_dense_layout(t, like)) return t;
  at::Tensor tmp = at::empty_like(like);
  if (read) tmp.copy_(t);
  writebacks_.emplace_back(t, tmp);
  return keep(std::move(tmp));
}

const at::Tensor& LayoutScope::reference(const at::Tensor& t, bool mutated) {
  if (t.is_non_overlapping_and_dense()) return t;
  return contiguous(t, mutated);
}

const at::Tensor& LayoutScope::contiguous(const at::Tensor& t, bool mutated, bool read) {
  if (t.is_contiguous()) return t;
  at::Tensor tmp = read ? t.contiguous() : at::empty(t.sizes(), t.options());
  if (mutated) writebacks_.emplace_back(t, tmp);
  return keep(std::move(tmp));
}

void LayoutScope::finish() {
  for (auto& [dst, tmp] : writebacks_) dst.copy_(tmp);
  writebacks_.clear();
}

}  // namespace sam_fused::cpu
