// host.cpp — list validation and layout staging shared by the CPU and CUDA host ops (declared in host.h).
#include "shared/host.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <string>
#include <tuple>

namespace sam_fused::host {
namespace {

// TORCH_CHECK builds its message only on failure: the success path, run for every tensor of every call, makes no
// strings.
std::string at_index(int64_t i) { return i < 0 ? "" : "[" + std::to_string(i) + "]"; }

void check_floating(const char* op, const char* list, int64_t i, at::ScalarType dtype) {
  TORCH_CHECK_TYPE(!at::isComplexType(dtype), "sam_fused.", op, ": ", list, at_index(i), " is complex (", dtype,
                   "); sam_fused supports real floating-point tensors only");
  TORCH_CHECK_TYPE(at::isFloatingType(dtype), "sam_fused.", op, ": ", list, at_index(i), " has dtype ", dtype,
                   "; expected a floating-point tensor");
}

void check_dense(const char* op, const char* list, size_t i, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.defined(), "sam_fused.", op, ": ", list, "[", i, "] is undefined");
  TORCH_CHECK_TYPE(t.layout() == at::kStrided, "sam_fused.", op, ": ", list, "[", i,
                   "] is a sparse/non-strided tensor (", t.layout(), "); sam_fused needs dense tensors");
}

void check_device(const Target& target, const char* op, const char* list, size_t i, const at::Tensor& t,
                  at::Device device) {
  if (t.device() == device) return;
  TORCH_CHECK_VALUE(t.device().type() == target.type, "sam_fused.", op, ": ", list, "[", i, "] is on ", t.device(),
                    "; the ", target.name, " kernels need ", target.name, " tensors");
  TORCH_CHECK_VALUE(false, "sam_fused.", op, ": ", list, "[", i, "] is on ", t.device(), " but this call runs on ",
                    device, " (one call takes tensors of one device)");
}

// The call's device and dtype, from the first tensor of the first list.
std::pair<at::Device, at::ScalarType> call_of(const Target& target, const char* op, const List& first) {
  const at::Tensor& t = first.tensors[0];
  check_dense(op, first.name, 0, t);
  check_floating(op, first.name, 0, t.scalar_type());
  TORCH_CHECK_VALUE(t.device().type() == target.type, "sam_fused.", op, ": ", first.name, "[0] is on ", t.device(),
                    "; the ", target.name, " kernels need ", target.name, " tensors");
  const at::ScalarType dtype = t.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, "sam_fused.", op, ": ",
                   first.name, "[0] has dtype ", dtype, "; the ", target.name,
                   " kernels support float32, bfloat16 and float16 (other dtypes run on the torch backend)");
  return {t.device(), dtype};
}

void check_tensor(const Target& target, const char* op, const char* list, size_t i, const at::Tensor& t,
                  at::Device device, at::ScalarType dtype) {
  check_dense(op, list, i, t);
  if (t.scalar_type() != dtype) check_floating(op, list, static_cast<int64_t>(i), t.scalar_type());
  check_device(target, op, list, i, t, device);
  TORCH_CHECK_VALUE(t.scalar_type() == dtype, "sam_fused.", op, ": ", list, "[", i, "] has dtype ", t.scalar_type(),
                    ", expected ", dtype, " like the first tensor (one call takes one dtype)");
}

void check_shape(const char* op, const char* list, size_t i, const at::Tensor& t, at::IntArrayRef expected) {
  TORCH_CHECK_VALUE(t.sizes() == expected, "sam_fused.", op, ": ", list, "[", i, "] has shape ", t.sizes(),
                    ", expected ", expected);
}

void check_writable(const char* op, const char* list, size_t i, const at::Tensor& t) {
  TORCH_CHECK_VALUE(at::has_internal_overlap(t) != at::MemOverlap::Yes, "sam_fused.", op, ": ", list, "[", i,
                    "] is written in place but has internally overlapping memory (e.g. an expanded view)");
}

// Position i of list l against its base shape (that of the base list's tensor, or none).
void check_position_shape(const char* op, const List& l, size_t i, const at::Tensor* base, int64_t k) {
  const at::Tensor& t = l.tensors[i];
  if (l.shape == Shape::kBase) {
    if (base != nullptr) check_shape(op, l.name, i, t, base->sizes());
  } else if (base != nullptr) {
    const bool lead = k > 1 || l.shape == Shape::kLeading;
    check_shape(op, l.name, i, t, lead ? at::IntArrayRef(with_leading(k, base->sizes())) : base->sizes());
  } else if (k > 1 || l.shape == Shape::kLeading) {
    TORCH_CHECK_VALUE(t.dim() >= 1 && t.size(0) == k, "sam_fused.", op, ": ", l.name, "[", i, "] has shape ",
                      t.sizes(), "; expected leading dim ", k, " (micro_batches)");
  }
}

}  // namespace

const at::Tensor& Staging::temporary(const at::Tensor& t, at::Tensor tmp, Access access) {
  if (access != Access::kOverwrite) tmp.copy_(t);
  if (access != Access::kRead) writebacks_.emplace_back(t, tmp);
  kept_.push_back(std::move(tmp));
  return kept_.back();
}

const at::Tensor& Staging::dense(const at::Tensor& t, Access access) {
  if (t.is_non_overlapping_and_dense()) return t;
  return temporary(t, at::empty(t.sizes(), t.options()), access);
}

const at::Tensor& Staging::like(const at::Tensor& t, const at::Tensor& like, Access access) {
  if (t.sizes() == like.sizes() && t.strides() == like.strides()) return t;  // `like` is dense
  // Positions of one shape only: sliced lists ([k, *shape]) are staged with Layout::kContiguous.
  TORCH_INTERNAL_ASSERT(t.sizes() == like.sizes(), "host::Staging::like: shapes ", t.sizes(), " and ", like.sizes());
  return temporary(t, at::empty_like(like), access);  // empty_like keeps a dense tensor's strides
}

const at::Tensor& Staging::contiguous(const at::Tensor& t, Access access) {
  if (t.is_contiguous()) return t;
  return temporary(t, at::empty(t.sizes(), t.options()), access);
}

void Staging::finish() {
  for (auto& [dst, tmp] : writebacks_) dst.copy_(tmp);
  writebacks_.clear();
}

Lists prepare(const Target& target, const char* op, std::initializer_list<List> lists, int64_t k, Layout layout) {
  const List* first = lists.begin();
  const List* base = nullptr;  // the first present kBase list: the length reference and each position's base shape
  for (const List& l : lists) {
    if (l.present && l.shape == Shape::kBase) {
      base = &l;
      break;
    }
  }
  const List& ref = base != nullptr ? *base : *first;
  for (const List& l : lists) {
    TORCH_CHECK_VALUE(!l.present || l.tensors.size() == ref.tensors.size(), "sam_fused.", op, ": ", l.name, " has ",
                      l.tensors.size(), " tensors but ", ref.name, " has ", ref.tensors.size());
  }
  Lists out;
  out.size_ = first->tensors.size();
  if (out.empty()) return out;
  std::tie(out.device_, out.dtype_) = call_of(target, op, *first);
  out.first_slices_ = first->shape == Shape::kBase ? 1 : k;

  for (size_t i = 0; i < out.size_; ++i) {  // every check before anything is staged or written
    const at::Tensor* base_t = base != nullptr ? &base->tensors[i] : nullptr;
    for (const List& l : lists) {
      if (!l.present) continue;
      check_tensor(target, op, l.name, i, l.tensors[i], out.device_, out.dtype_);
      check_position_shape(op, l, i, base_t, k);
      if (l.access != Access::kRead) check_writable(op, l.name, i, l.tensors[i]);
    }
  }

  out.layout_ = layout;
  out.columns_.assign(lists.size(), std::vector<const at::Tensor*>(out.size_, nullptr));
  size_t c = 0;
  for (const List& l : lists) {
    if (l.present) {
      for (size_t i = 0; i < out.size_; ++i) {
        out.columns_[c][i] = out.stage(l.tensors[i], l.access, c == 0 ? nullptr : out.columns_[0][i]);
      }
    }
    ++c;
  }
  return out;
}

// The first list's tensor of a position anchors its layout (Layout::kDense): the others are staged to match it.
const at::Tensor* Lists::stage(const at::Tensor& t, Access access, const at::Tensor* anchor) {
  if (layout_ == Layout::kContiguous) return &staging_.contiguous(t, access);
  if (anchor == nullptr) return &staging_.dense(t, access);
  return &staging_.like(t, *anchor, access);
}

std::vector<at::Tensor> Lists::outputs_like(at::TensorList like) {
  std::vector<at::Tensor> outs;
  outs.reserve(size_);
  std::vector<const at::Tensor*> column(size_);
  for (size_t i = 0; i < size_; ++i) {
    outs.push_back(at::empty_like(like[i]));
    column[i] = stage(outputs_.emplace_back(outs.back()), Access::kOverwrite, columns_[0][i]);
  }
  columns_.push_back(std::move(column));
  return outs;
}

at::Tensor sumsq_arg(const char* op, const at::Tensor& sumsq, int64_t count, bool exact, at::Device device) {
  TORCH_CHECK_VALUE(sumsq.defined(), "sam_fused.", op, ": sumsq is undefined");
  TORCH_CHECK_TYPE(sumsq.layout() == at::kStrided && at::isFloatingType(sumsq.scalar_type()), "sam_fused.", op,
                   ": sumsq must be a dense floating-point tensor, got ", sumsq.scalar_type(), " (", sumsq.layout(),
                   ")");
  TORCH_CHECK_VALUE(sumsq.device() == device, "sam_fused.", op, ": sumsq is on ", sumsq.device(),
                    " but the tensors are on ", device);
  if (exact) {
    TORCH_CHECK_VALUE(sumsq.numel() == count, "sam_fused.", op, ": sumsq has ", sumsq.numel(),
                      " elements, expected one per micro-batch (", count, ")");
  } else {
    TORCH_CHECK_VALUE(sumsq.numel() >= 1, "sam_fused.", op, ": sumsq is empty (it must hold the sum of squares)");
  }
  // Views and, only when needed, a device-side copy: nothing waits for the device.
  return sumsq.reshape({-1}).slice(0, 0, count).to(at::kDouble).contiguous();
}

std::vector<int64_t> with_leading(int64_t k, at::IntArrayRef shape) {
  std::vector<int64_t> out;
  out.reserve(shape.size() + 1);
  out.push_back(k);
  out.insert(out.end(), shape.begin(), shape.end());
  return out;
}

}  // namespace sam_fused::host
