// checks.cpp — input validation and layout staging of the CUDA ops (declared in checks.h).
#include "cuda/checks.h"

#include <ATen/MemoryOverlap.h>

namespace sam_fused::cuda {

namespace {

// What every tensor must be, whatever the call: defined, dense, real floating point. Same exception types as the
// reference's checks (sam_fused/_checks.py): TypeError for the kind of tensor, ValueError for mismatches.
void check_kind(const char* op, const char* list, size_t i, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.defined(), "sam_fused.", op, ": ", list, "[", i, "] is undefined");
  TORCH_CHECK_TYPE(t.layout() == at::kStrided, "sam_fused.", op, ": ", list, "[", i,
                   "] is a sparse/non-strided tensor (", t.layout(), "); sam_fused needs dense tensors");
  TORCH_CHECK_TYPE(!t.is_complex(), "sam_fused.", op, ": ", list, "[", i, "] is complex (", t.scalar_type(),
                   "); sam_fused supports real floating-point tensors only");
  TORCH_CHECK_TYPE(t.is_floating_point(), "sam_fused.", op, ": ", list, "[", i, "] has dtype ", t.scalar_type(),
                   "; expected a floating-point tensor");
}

}  // namespace

CallInfo call_info(const char* op, const char* list, const at::Tensor& first) {
  check_kind(op, list, 0, first);
  TORCH_CHECK_VALUE(first.device().is_cuda(), "sam_fused.", op, ": ", list, "[0] is on ", first.device(),
                    "; the CUDA kernels need CUDA tensors");
  DType kd;
  switch (first.scalar_type()) {
    case at::kFloat:
      kd = DType::kFloat;
      break;
    case at::kBFloat16:
      kd = DType::kBFloat16;
      break;
    case at::kHalf:
      kd = DType::kHalf;
      break;
    default:
      TORCH_CHECK_TYPE(false, "sam_fused.", op, ": ", list, "[0] has dtype ", first.scalar_type(),
                       "; the CUDA kernels support float32, bfloat16 and float16 (other dtypes run on the torch ",
                       "backend)");
  }
  return CallInfo{first.device(), first.scalar_type(), kd};
}

void check_length(const char* op, const char* list, size_t n, const char* primary, size_t n_primary) {
  TORCH_CHECK_VALUE(n == n_primary, "sam_fused.", op, ": ", list, " has ", n, " tensors but ", primary, " has ",
                    n_primary);
}

void check_tensor(const char* op, const char* list, size_t i, const at::Tensor& t, const CallInfo& call) {
  check_kind(op, list, i, t);
  TORCH_CHECK_VALUE(t.device() == call.device, "sam_fused.", op, ": ", list, "[", i, "] is on ", t.device(),
                    " but this call runs on ", call.device, " (one call takes tensors of one device)");
  TORCH_CHECK_VALUE(t.scalar_type() == call.dtype, "sam_fused.", op, ": ", list, "[", i, "] has dtype ",
                   t.scalar_type(), ", expected ", call.dtype, " (one call takes tensors of one dtype)");
}

void check_shape(const char* op, const char* list, size_t i, const at::Tensor& t, at::IntArrayRef expected) {
  TORCH_CHECK_VALUE(t.sizes() == expected, "sam_fused.", op, ": ", list, "[", i, "] has shape ", t.sizes(),
                    ", expected ", expected);
}

void check_writable(const char* op, const char* list, size_t i, const at::Tensor& t) {
  TORCH_CHECK_VALUE(at::has_internal_overlap(t) != at::MemOverlap::Yes, "sam_fused.", op, ": ", list, "[", i,
                    "] is written in place but has internally overlapping memory (e.g. an expanded view)");
}

at::Tensor device_sumsq(const char* op, const at::Tensor& sumsq, int64_t count, bool exact, const CallInfo& call) {
  TORCH_CHECK_VALUE(sumsq.defined(), "sam_fused.", op, ": sumsq is undefined");
  TORCH_CHECK_TYPE(sumsq.layout() == at::kStrided && at::isFloatingType(sumsq.scalar_type()), "sam_fused.", op,
                   ": sumsq must be a dense floating-point tensor, got ", sumsq.scalar_type(), " (", sumsq.layout(),
                   ")");
  TORCH_CHECK_VALUE(sumsq.device() == call.device, "sam_fused.", op, ": sumsq is on ", sumsq.device(),
                    " but the tensors are on ", call.device);
  if (exact) {
    TORCH_CHECK_VALUE(sumsq.numel() == count, "sam_fused.", op, ": sumsq has ", sumsq.numel(),
                      " elements, expected one per micro-batch (", count, ")");
  } else {
    TORCH_CHECK_VALUE(sumsq.numel() >= count, "sam_fused.", op, ": sumsq has ", sumsq.numel(),
                      " elements, expected at least ", count);
  }
  // Device-side ops only (reshape/slice are views; .to/.contiguous copy only when needed): the kernels read it.
  return sumsq.reshape({-1}).slice(0, 0, count).to(at::kDouble).contiguous();
}

std::vector<int64_t> with_leading(int64_t k, at::IntArrayRef shape) {
  std::vector<int64_t> out;
  out.reserve(shape.size() + 1);
  out.push_back(k);
  out.insert(out.end(), shape.begin(), shape.end());
  return out;
}

bool Staging::usable(const at::Tensor* ts, size_t n, bool contiguous_only) {
  const at::Tensor* ref = nullptr;
  for (size_t j = 0; j < n; ++j) {
    const at::Tensor& t = ts[j];
    if (!t.defined()) continue;
    if (contiguous_only) {
      if (!t.is_contiguous()) return false;
      continue;
    }
    if (!t.is_non_overlapping_and_dense()) return false;
    if (ref == nullptr) {
      ref = &t;
    } else if (t.strides() != ref->strides()) {
      return false;
    }
  }
  return true;
}

at::Tensor Staging::stage(const at::Tensor& t, bool written) {
  at::Tensor copy = t.contiguous();
  kept_.push_back(copy);
  if (written) writebacks_.emplace_back(t, copy);
  return copy;
}

void Staging::finish() {
  for (auto& [dst, copy] : writebacks_) dst.copy_(copy);
  writebacks_.clear();
}

}  // namespace sam_fused::cuda
