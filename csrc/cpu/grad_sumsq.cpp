// grad_sumsq.cpp — grad_sumsq: sum over a whole gradient list of (T * g)^2, per micro-batch slice, in one parallel pass.
//
// This is the norm half of a SAM first step: it reads every gradient once (4 bytes per fp32 parameter, the minimum).
// Each (tensor, slice) is one segment of the chunked work list (common.h); every chunk writes its own partial sums,
// one per slice, and the partials are combined in chunk order, so the result does not depend on the thread count.
// With params (ASAM), T = |w| + eta is recomputed from the weights on the fly (broadcast over the k slices) instead of
// being materialized. Blocks are summed in fp32 and added in fp64; where fp32 overflows the piece is redone with fp64
// terms (common.h blocked_sum): the sum of any finite gradient is finite.
#include "common.h"
#include "ops.h"
#include "sam_math_cpu.h"

#include <ATen/ops/zeros.h>

#include <cmath>

namespace sam_fused::cpu {
namespace {

constexpr const char* kOp = "grad_sumsq";

template <class T>
struct SumSeg {
  const T* g;      // this slice's gradient values
  const T* w;      // the weights for T = |w| + eta, or nullptr for T = 1
  int64_t n;
  int64_t slice;   // micro-batch index j
};

// Sum of (T * g)^2 over [lo, hi) of one segment, T = |w| + eta in fp32; fp32 blocks, fp64 where fp32 overflows
// (common.h blocked_sum).
template <class T, bool kAdaptive>
double piece_sumsq(const SumSeg<T>& s, int64_t lo, int64_t hi, float eta) {
  const int64_t vec_hi = vector_end(lo, hi, Pack<T>::kWidth);
  const Vec eta_v(eta);
  const auto step = [&](int64_t i, FastSums& sums) {
    Vec g0, g1;
    load_pack(s.g + i, g0, g1);
    add_terms(sums, g0, g1, kAdaptive ? s.w + i : nullptr, eta_v);
  };
  double sum = blocked_sum<T>(lo, vec_hi, step, [&](int64_t b, int64_t e) {
    return wide_sumsq<T>(s.g, kAdaptive ? s.w : nullptr, b, e, eta);
  });
  for (int64_t i = vec_hi; i < hi; ++i) sum += scalar_term(to_f32(s.g[i]), kAdaptive ? s.w + i : nullptr, eta);
  return sum;
}

template <class T>
at::Tensor run(const host::Lists& lists, float eta, int64_t k) {
  ChunkPlan<SumSeg<T>> plan;
  plan.reserve(lists.size() * static_cast<size_t>(k));
  for (size_t i = 0; i < lists.size(); ++i) {
    // Slice j of grads[i] is its j-th contiguous block (k > 1 stages contiguous lists); the weights line up with
    // every slice. With k = 1 any common dense layout works: a sum does not care about the element order.
    const T* g = lists.data<const T>(0, i);
    const int64_t n = lists.numel(i);
    for (int64_t j = 0; j < k; ++j) plan.add({g + j * n, lists.data<const T>(1, i), n, j});
  }
  Partials partials(plan.num_chunks(), k);
  plan.run([&](int64_t chunk, const SumSeg<T>& s, int64_t lo, int64_t hi) {
    partials.add(chunk, s.slice, s.w ? piece_sumsq<T, true>(s, lo, hi, eta) : piece_sumsq<T, false>(s, lo, hi, eta));
  });
  return partials.combine();
}

}  // namespace

at::Tensor grad_sumsq(at::TensorList grads, std::optional<at::TensorList> params, double eta, int64_t micro_batches) {
  const int64_t k = micro_batches;
  TORCH_CHECK_VALUE(k >= 1, "sam_fused.", kOp, ": micro_batches must be >= 1, got ", k);
  const host::Lists lists = host::prepare(
      host::kCpu, kOp,
      {{"grads", grads, host::Access::kRead, host::Shape::kSlices},
       {"params", params.value_or(at::TensorList()), host::Access::kRead, host::Shape::kBase, params.has_value()}},
      k, k > 1 ? host::Layout::kContiguous : host::Layout::kDense);
  if (lists.empty()) return at::zeros({k}, at::TensorOptions().dtype(at::kDouble));
  at::Tensor out;
  dispatch_storage(lists.dtype(), [&](auto tag) {
    using T = decltype(tag);
    out = run<T>(lists, static_cast<float>(eta), k);
  });
  return out;
}

}  // namespace sam_fused::cpu
