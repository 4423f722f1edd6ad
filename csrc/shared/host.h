// host.h — the host layer every compiled backend (csrc/cpu, csrc/cuda) runs before its kernels: list validation and
// layout staging, written once (host.cpp). A host op describes its lists, calls prepare(), and hands the staged
// tensors to its kernels; apex keeps one multi_tensor_apply and one functor per op in the same spirit.
//
// Why every op re-checks: torch.ops.sam_fused.* can be called directly, bypassing the Python op layer, and the kernels
// dereference raw addresses. Failures raise c10::ValueError / c10::TypeError (Python ValueError / TypeError) with the
// wording of sam_fused/_checks.py, naming the op, the list and the index: never a crash, never an out-of-bounds read.
//
// Why staging: a kernel addresses element e of every tensor of one list position at the same flat offset. That is
// right when they are all non-overlapping and dense with the same strides (contiguous, or all channels_last), or, for
// ops that index micro-batch slices, all contiguous. Tensors that are not get temporaries in the layout of the
// position's first tensor (the anchor); temporaries of written tensors are copied back by finish().
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>

#include <cstddef>
#include <cstdint>
#include <deque>
#include <initializer_list>
#include <utility>
#include <vector>

namespace sam_fused::host {

// The device type a backend's kernels take, and its name in messages ("the CUDA kernels need CUDA tensors").
struct Target {
  c10::DeviceType type;
  const char* name;
};
inline constexpr Target kCpu{c10::DeviceType::CPU, "CPU"};
inline constexpr Target kCuda{c10::DeviceType::CUDA, "CUDA"};

// What the kernels do with a list: read it, read and write it, or write it without reading (a temporary for such a
// tensor is not filled first).
enum class Access { kRead, kWrite, kOverwrite };

// A list's shape at each position, relative to the position's base shape (that of the lists marked kBase: the
// weights' shape): the base shape itself; k micro-batch slices of it, [k, *base]; or, as grad_sumsq's gradients,
// kSlices: [k, *base] when k > 1, just base when k == 1. With no kBase list, sliced tensors only need a leading dim k.
enum class Shape { kBase, kLeading, kSlices };

// Layout the kernels need: any dense layout shared by a position (element order does not matter to them), or
// contiguous tensors (the kernels index micro-batch slices as contiguous blocks).
enum class Layout { kDense, kContiguous };

struct List {
  const char* name;
  at::TensorList tensors;
  Access access = Access::kRead;
  Shape shape = Shape::kBase;
  bool present = true;  // false: an optional list that was not given (its tensors are then null below)
};

// Temporaries for tensors the kernels cannot take as they are; see the header comment.
class Staging {
 public:
  // `t` when it is non-overlapping and dense, else a contiguous temporary.
  const at::Tensor& dense(const at::Tensor& t, Access access);
  // `t` when it has `like`'s dense layout, else a temporary in that layout.
  const at::Tensor& like(const at::Tensor& t, const at::Tensor& like, Access access);
  // `t` when contiguous, else a contiguous temporary.
  const at::Tensor& contiguous(const at::Tensor& t, Access access);
  // Copies the temporaries of written tensors back into the caller's (on the CUDA stream: after the kernels).
  void finish();

 private:
  const at::Tensor& temporary(const at::Tensor& t, at::Tensor tmp, Access access);
  std::deque<at::Tensor> kept_;  // kernels hold raw pointers into these; a deque keeps references stable
  std::vector<std::pair<at::Tensor, at::Tensor>> writebacks_;  // (caller's tensor, temporary)
};

// The validated, staged lists of one op call. get(l, i): list l's tensor at position i as the kernels must see it
// (nullptr for an absent optional list); no reference counts are taken on the caller's tensors.
class Lists {
 public:
  Lists() = default;
  Lists(Lists&&) = default;  // moving the deque of temporaries keeps the pointers into it valid
  Lists(const Lists&) = delete;

  size_t size() const { return size_; }
  bool empty() const { return size_ == 0; }
  at::Device device() const { return device_; }
  at::ScalarType dtype() const { return dtype_; }
  const at::Tensor* get(size_t list, size_t i) const { return columns_[list][i]; }
  // Elements of position i per micro-batch slice (of its base shape).
  int64_t numel(size_t i) const { return get(0, i)->numel() / first_slices_; }
  template <class T>
  T* data(size_t list, size_t i) const {
    const at::Tensor* t = get(list, i);
    return t == nullptr ? nullptr : static_cast<T*>(const_cast<void*>(t->const_data_ptr()));
  }
  // New output tensors, torch.empty_like(like[i]) (a checked list of this call, e.g. perturb_batched's grads: the
  // fake implementations promise that shape, dtype and layout), appended as the next list, staged like the others.
  std::vector<at::Tensor> outputs_like(at::TensorList like);
  // Copies the temporaries of written tensors back (call after the kernels).
  void finish() { staging_.finish(); }

 private:
  friend Lists prepare(const Target&, const char*, std::initializer_list<List>, int64_t, Layout);
  const at::Tensor* stage(const at::Tensor& t, Access access, const at::Tensor* anchor);
  size_t size_ = 0;
  int64_t first_slices_ = 1;  // k when the first list is sliced, else 1
  Layout layout_ = Layout::kDense;
  at::Device device_{c10::DeviceType::CPU};
  at::ScalarType dtype_ = at::kFloat;
  std::vector<std::vector<const at::Tensor*>> columns_;  // [list][position]
  std::deque<at::Tensor> outputs_;
  Staging staging_;
};

// Checks `lists` and stages them for the kernels. The first list gives the call's device and dtype (one the kernels
// take: fp32, bf16, fp16) and, with Layout::kDense, each position's layout. `k`: micro-batch slices of kSlices lists.
// Nothing is staged (or written) unless every check passes. An empty first list gives empty Lists after the length
// checks.
Lists prepare(const Target& target, const char* op, std::initializer_list<List> lists, int64_t k = 1,
              Layout layout = Layout::kDense);

// sumsq, checked and made the contiguous fp64 tensor of its first `count` elements on `device` (exactly `count`
// elements when `exact`; at least one otherwise, and count must be 1). The kernels compute the scale from it in fp64.
// No host synchronization (on the CPU the kernels read it directly).
at::Tensor sumsq_arg(const char* op, const at::Tensor& sumsq, int64_t count, bool exact, at::Device device);

// [k, *shape]
std::vector<int64_t> with_leading(int64_t k, at::IntArrayRef shape);

}  // namespace sam_fused::host
