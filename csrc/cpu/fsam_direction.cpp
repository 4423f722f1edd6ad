// fsam_direction.cpp — fsam_direction_: the Friendly-SAM direction and EMA update, fused with the norm of the direction.
//
// One pass per element: d = g - sigma * m_prev and m = lmbda * m_prev + (1 - lmbda) * g (or, on the first step,
// m = g and d = g), written in place into grads and ema, plus the sum of (T * d)^2 that the perturbation needs. The
// sum is taken over d as STORED (rounded to the storage dtype), exactly what the reference's grad_sumsq of the
// updated grads sees; fusing it saves the separate norm pass. Summed like grad_sumsq (fp32 blocks, fp64 where they
// overflow). Partial sums per chunk, combined in chunk order (common.h), so the result is the same for any thread
// count.
#include "common.h"
#include "ops.h"
#include "sam_math_cpu.h"

#include <ATen/ops/zeros.h>

#include <cmath>

namespace sam_fused::cpu {
namespace {

constexpr const char* kOp = "fsam_direction_";

template <class T>
struct FsamSeg {
  T* g;        // in: gradient, out: direction d
  T* m;        // in: previous EMA, out: new EMA
  const T* w;  // weights for T = |w| + eta, or nullptr for T = 1
  int64_t n;
};

struct FsamScalars {
  float sigma, lmbda, one_minus_lmbda, eta;
};

template <class T, bool kFirst, bool kAdaptive>
double fsam_piece(const FsamSeg<T>& s, int64_t lo, int64_t hi, const FsamScalars& c) {
  const int64_t vec_hi = vector_end(lo, hi, Pack<T>::kWidth);
  const Vec sigma(c.sigma), lmbda(c.lmbda), one_minus_lmbda(c.one_minus_lmbda), eta(c.eta);
  const auto step = [&](int64_t i, FastSums& sums) {
    Vec d0, d1;
    if constexpr (kFirst) {
      const auto raw = Pack<T>::load_raw(s.g + i);
      Pack<T>::store_raw(s.m + i, raw);  // m = g, bit for bit; d = g stays in place
      Pack<T>::to_float(raw, d0, d1);
    } else {
      Vec g0, g1, m0, m1;
      load_pack(s.g + i, g0, g1);
      load_pack(s.m + i, m0, m1);
      d0 = fsam_direction(g0, m0, sigma);
      d1 = fsam_direction(g1, m1, sigma);
      store_pack_rounded(s.g + i, d0, d1);  // d0, d1 now hold the stored values
      store_pack(s.m + i, fsam_ema(g0, m0, lmbda, one_minus_lmbda), fsam_ema(g1, m1, lmbda, one_minus_lmbda));
    }
    add_terms(sums, d0, d1, kAdaptive ? s.w + i : nullptr, eta);
  };
  // If fp32 overflowed, the piece is summed again in fp64 from the direction as stored (step has written it).
  double sum = blocked_sum<T>(lo, vec_hi, step, [&](int64_t b, int64_t e) {
    return wide_sumsq<T>(s.g, kAdaptive ? s.w : nullptr, b, e, c.eta);
  });
  for (int64_t i = vec_hi; i < hi; ++i) {
    float d;
    if constexpr (kFirst) {
      s.m[i] = s.g[i];
      d = to_f32(s.g[i]);
    } else {
      const float g = to_f32(s.g[i]), m = to_f32(s.m[i]);
      s.g[i] = from_f32<T>(fsam_direction(g, m, c.sigma));
      s.m[i] = from_f32<T>(fsam_ema(g, m, c.lmbda, c.one_minus_lmbda));
      d = to_f32(s.g[i]);
    }
    sum += scalar_term(d, kAdaptive ? s.w + i : nullptr, c.eta);
  }
  return sum;
}

template <class T, bool kFirst>
double fsam_piece_dispatch(const FsamSeg<T>& s, int64_t lo, int64_t hi, const FsamScalars& c) {
  return s.w ? fsam_piece<T, kFirst, true>(s, lo, hi, c) : fsam_piece<T, kFirst, false>(s, lo, hi, c);
}

template <class T>
at::Tensor run(const host::Lists& lists, bool first, const FsamScalars& c) {
  ChunkPlan<FsamSeg<T>> plan;
  plan.reserve(lists.size());
  for (size_t i = 0; i < lists.size(); ++i) {
    plan.add({lists.data<T>(0, i), lists.data<T>(1, i), lists.data<const T>(2, i), lists.numel(i)});
  }
  Partials partials(plan.num_chunks(), 1);
  plan.run([&](int64_t chunk, const FsamSeg<T>& s, int64_t lo, int64_t hi) {
    partials.add(chunk, 0, first ? fsam_piece_dispatch<T, true>(s, lo, hi, c) : fsam_piece_dispatch<T, false>(s, lo, hi, c));
  });
  return partials.combine();
}

}  // namespace

at::Tensor fsam_direction_(at::TensorList grads, at::TensorList ema, double sigma, double lmbda, bool first,
                           std::optional<at::TensorList> params, double eta) {
  // The first step leaves the gradients as they are and only writes the EMA.
  host::Lists lists = host::prepare(
      host::kCpu, kOp,
      {{"grads", grads, first ? host::Access::kRead : host::Access::kWrite},
       {"ema", ema, first ? host::Access::kOverwrite : host::Access::kWrite},
       {"params", params.value_or(at::TensorList()), host::Access::kRead, host::Shape::kBase, params.has_value()}});
  if (lists.empty()) return at::zeros({1}, at::TensorOptions().dtype(at::kDouble));
  // 1 - lmbda in double, then rounded once: the reference computes it as a Python float.
  const FsamScalars c{static_cast<float>(sigma), static_cast<float>(lmbda), static_cast<float>(1.0 - lmbda),
                      static_cast<float>(eta)};
  at::Tensor out;
  dispatch_storage(lists.dtype(), [&](auto tag) { out = run<decltype(tag)>(lists, first, c); });
  lists.finish();
  return out;
}

}  // namespace sam_fused::cpu
