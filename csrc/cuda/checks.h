// checks.h — input validation and layout staging for the CUDA ops (host code, checks.cpp).
//
// torch.ops.sam_fused.* can be called directly, bypassing the Python op layer, and the kernels dereference raw
// addresses; so every op re-checks what the kernels rely on: list lengths, shapes, dtypes, devices, dense strided
// layout, writable outputs. Failures raise c10::ValueError / c10::TypeError (Python ValueError / TypeError) naming
// the op, the list and the index: never a crash or an out-of-bounds access.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

#include "cuda/launch.h"

namespace sam_fused::cuda {

// Device and dtype of one call (one (device, dtype) bucket of the op layer): those of the first tensor of the
// primary list, which must be a CUDA tensor of a dtype the kernels support.
struct CallInfo {
  at::Device device;
  at::ScalarType dtype;
  DType kernel_dtype;
};
CallInfo call_info(const char* op, const char* list, const at::Tensor& first);

void check_length(const char* op, const char* list, size_t n, const char* primary, size_t n_primary);
// A defined, dense (strided) tensor on the call's device with the call's dtype.
void check_tensor(const char* op, const char* list, size_t i, const at::Tensor& t, const CallInfo& call);
void check_shape(const char* op, const char* list, size_t i, const at::Tensor& t, at::IntArrayRef expected);
// A tensor the op writes must not have internally overlapping memory (e.g. an expanded view).
void check_writable(const char* op, const char* list, size_t i, const at::Tensor& t);
// The contiguous fp64 device tensor of sumsq's first `count` elements (all of them, and exactly `count`, when
// `exact`): the perturb kernels compute the scale from it in fp64. sumsq must be a floating-point tensor (any
// floating dtype: widened exactly) on the call's device. No host synchronization.
at::Tensor device_sumsq(const char* op, const at::Tensor& sumsq, int64_t count, bool exact, const CallInfo& call);
// [k, *shape]
std::vector<int64_t> with_leading(int64_t k, at::IntArrayRef shape);

// Address of a tensor's data for the kernels, null for an undefined (absent) tensor.
inline void* address(const at::Tensor& t) { return t.defined() ? const_cast<void*>(t.const_data_ptr()) : nullptr; }

// Makes list positions safe for flat indexing. The kernels address element e of every tensor of one position at the
// same flat offset, which is right when they are all non-overlapping and dense with the same strides (contiguous,
// or e.g. all channels_last) — or, for ops that index micro-batch slices, all contiguous. Positions that are not
// get contiguous copies; copies of tensors the op writes are copied back by finish(), after the kernels (stream
// order, no synchronization).
class Staging {
 public:
  template <size_t N>
  std::array<at::Tensor, N> position(const std::array<at::Tensor, N>& ts, const std::array<bool, N>& written,
                                     bool contiguous_only) {
    std::array<at::Tensor, N> out = ts;
    if (usable(ts.data(), N, contiguous_only)) return out;
    for (size_t j = 0; j < N; ++j) {
      if (ts[j].defined() && !ts[j].is_contiguous()) out[j] = stage(ts[j], written[j]);
    }
    return out;
  }
  // Copies the staged outputs back into the caller's tensors. Call after the kernels have been enqueued.
  void finish();

 private:
  static bool usable(const at::Tensor* ts, size_t n, bool contiguous_only);
  at::Tensor stage(const at::Tensor& t, bool written);
  std::vector<at::Tensor> kept_;  // copies stay alive until the op returns
  std::vector<std::pair<at::Tensor, at::Tensor>> writebacks_;  // (caller's tensor, staged copy)
};

}  // namespace sam_fused::cuda
