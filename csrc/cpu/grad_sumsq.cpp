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
  for (int64_t i = vec_hi; i < hi; ++i) {  // tails: fp64 terms
    const double g = to_f32(s.g[i]);
    if constexpr (kAdaptive) {
      const float t = std::fabs(to_f32(s.w[i])) + eta;
      sum += square_scaled(g, static_cast<double>(t));
    } else {
      sum += square(g);
    }
  }
  return sum;
}

// grads[i] must be p.shape (k = 1) or [k, *p.shape] (k > 1), as in the reference; without params only the leading
// dim k is checked.
void check_grad_shape(const at::Tensor& g, const at::Tensor* p, size_t i, int64_t k) {
  if (p != nullptr) {
    check_shape(kOp, g, "grads", i, k > 1 ? at::IntArrayRef(with_leading(k, p->sizes())) : p->sizes());
  } else if (k > 1) {
    TORCH_CHECK_VALUE(g.dim() >= 1 && g.size(0) == k, "sam_fused.", kOp, ": grads[", i, "] has shape ", g.sizes(),
                      "; expected leading dim ", k, " (micro_batches)");
  }
}

// Adds the segments of position i to the plan; temporaries for odd layouts live in `scope`.
template <class T>
void plan_position(ChunkPlan<SumSeg<T>>& plan, LayoutScope& scope, const at::Tensor& g, const at::Tensor* p,
                   int64_t k) {
  if (k == 1) {
    // One slice: any common dense layout works, the sum does not care about the element order.
    const at::Tensor& gl = scope.reference(g, /*mutated=*/false);
    const at::Tensor* pl = p == nullptr ? nullptr : &scope.input(*p, gl);
    plan.add({gl.const_data_ptr<T>(), pl == nullptr ? nullptr : pl->const_data_ptr<T>(), gl.numel(), 0});
    return;
  }
  // Slices: slice j is the j-th contiguous block of g; the weights (if any) line up with every slice.
  const at::Tensor& gc = scope.contiguous(g, /*mutated=*/false);
  const T* w = p == nullptr ? nullptr : scope.contiguous(*p, /*mutated=*/false).const_data_ptr<T>();
  const int64_t n = gc.numel() / k;
  for (int64_t j = 0; j < k; ++j) plan.add({gc.const_data_ptr<T>() + j * n, w, n, j});
}

template <class T>
at::Tensor run(at::TensorList grads, const std::optional<at::TensorList>& params, float eta, int64_t k) {
  LayoutScope scope;
  ChunkPlan<SumSeg<T>> plan;
  plan.reserve(grads.size() * static_cast<size_t>(k));
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor* p = params ? &(*params)[i] : nullptr;
    plan_position<T>(plan, scope, grads[i], p, k);
  }
  Partials partials(plan.num_chunks(), k);
  plan.run([&](int64_t chunk, const SumSeg<T>& s, int64_t lo, int64_t hi) {
    partials.add(chunk, s.slice, s.w ? piece_sumsq<T, true>(s, lo, hi, eta) : piece_sumsq<T, false>(s, lo, hi, eta));
  });
  return partials.combine();
}

void check_inputs(at::TensorList grads, const std::optional<at::TensorList>& params, int64_t k) {
  TORCH_CHECK_VALUE(k >= 1, "sam_fused.", kOp, ": micro_batches must be >= 1, got ", k);
  if (params) check_same_length(kOp, *params, "params", grads, "grads");
  if (grads.empty()) return;
  const auto dtype = grads[0].scalar_type();
  check_supported_dtype(kOp, dtype, "grads[0]");
  for (size_t i = 0; i < grads.size(); ++i) {
    check_tensor(kOp, grads[i], "grads", i, dtype);
    const at::Tensor* p = params ? &(*params)[i] : nullptr;
    if (p != nullptr) check_tensor(kOp, *p, "params", i, dtype);
    check_grad_shape(grads[i], p, i, k);
  }
}

}  // namespace

at::Tensor grad_sumsq(at::TensorList grads, std::optional<at::TensorList> params, double eta, int64_t micro_batches) {
  check_inputs(grads, params, micro_batches);
  if (grads.empty()) return at::zeros({micro_batches}, at::TensorOptions().dtype(at::kDouble));
  at::Tensor out;
  dispatch_storage(grads[0].scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    out = run<T>(grads, params, static_cast<float>(eta), micro_batches);
  });
  return out;
}

}  // namespace sam_fused::cpu
