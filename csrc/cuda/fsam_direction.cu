// fsam_direction.cu — fsam_direction_ (Friendly-SAM, docs/DESIGN.md sections 1 and 3), in place and fused with its norm:
//   first step:  ema <- g, d = g
//   later steps: d = g - sigma * ema_prev;  ema <- lmbda * ema_prev + (1 - lmbda) * g
//   grads <- d, and the op returns sum of (T * d)^2 over all tensors (T = |w| + eta with params, else 1).
// The sum is taken over d as STORED (rounded to the storage dtype), exactly what a later grad_sumsq of the grads
// would see, so one pass replaces two. The sum is fp64 and reduced like grad_sumsq's (each term squared in fp64,
// fp64 accumulators): per-block partials written to a buffer (stage 1, here), summed in a fixed order by finish_sums
// (stage 2, grad_sumsq.cu).
#include "cuda/mta.cuh"

namespace sam_fused::cuda {
namespace {

// Lists: 0 grads (read, written: d), 1 ema (read unless first, written), 2 params (or null).
template <class S>
__global__ void __launch_bounds__(kThreads)
    fsam_kernel(const __grid_constant__ MtaArgs<3> a, FsamScalars s, int64_t first_block, double* partials) {
  using B = typename S::Bits;
  const Chunk c = chunk_of(a);
  B* g = list_ptr<B>(a, 0, c) + c.start;
  B* m = list_ptr<B>(a, 1, c) + c.start;
  const B* p = list_ptr<const B>(a, 2, c);
  if (p != nullptr) p += c.start;
  const Rn sigma{s.sigma}, lmbda{s.lmbda}, one_minus_lmbda{s.one_minus_lmbda}, eta{s.eta};
  double acc = 0.0;
  with_flag(s.first, [&](auto first_flag) {
    with_flag(p != nullptr, [&](auto adaptive_flag) {
      constexpr bool kFirst = decltype(first_flag)::value, kAdaptive = decltype(adaptive_flag)::value;
      for_each_packet<S::kWidth>(
          c.len, aligned16(g) && aligned16(m) && aligned16(p),
          [&](auto width, int64_t i) {  // 0: g, 1: ema (unless first), 2: the weight (ASAM)
            constexpr int W = decltype(width)::value;
            Packs<B, W, 3> r;
            r.v[0] = load_raw<B, W>(g + i);
            if constexpr (!kFirst) r.v[1] = load_raw<B, W>(m + i);
            if constexpr (kAdaptive) r.v[2] = load_raw<B, W>(p + i);
            return r;
          },
          [&](auto width, int64_t i, const auto& r) {
            constexpr int W = decltype(width)::value;
            float d[W];
            if constexpr (kFirst) {
              store_raw<B, W>(m + i, r.v[0]);  // bit-exact copy, like the reference's copy_
              to_float<S, W>(r.v[0], d);
            } else {
              float gf[W], mf[W], m_new[W];
              to_float<S, W>(r.v[0], gf);
              to_float<S, W>(r.v[1], mf);
#pragma unroll
              for (int e = 0; e < W; ++e) {
                d[e] = fsam_direction(Rn{gf[e]}, Rn{mf[e]}, sigma).v;
                m_new[e] = fsam_ema(Rn{gf[e]}, Rn{mf[e]}, lmbda, one_minus_lmbda).v;
              }
              const Raw<B, W> draw = from_float<S, W>(d);
              store_raw<B, W>(g + i, draw);
              store_raw<B, W>(m + i, from_float<S, W>(m_new));
              to_float<S, W>(draw, d);  // the norm is of the stored (rounded) direction
            }
            if constexpr (kAdaptive) {
              float pf[W];
              to_float<S, W>(r.v[2], pf);
#pragma unroll
              for (int e = 0; e < W; ++e) acc += square_scaled(Rd{d[e]}, Rd{adaptive_factor(pf[e], eta).v}).v;
            } else {
#pragma unroll
              for (int e = 0; e < W; ++e) acc += square(Rd{d[e]}).v;
            }
          });
    });
  });
  const double block_total = block_sum(acc);
  if (threadIdx.x == 0) partials[first_block + blockIdx.x] = block_total;
}

}  // namespace

cudaError_t launch_fsam(DType dtype, const mta::Plan& plan, const PtrTable<3>& t, const FsamScalars& s,
                        double* partials, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto storage) {
    using S = decltype(storage);
    return for_each_launch(plan, t, [&](const MtaArgs<3>& args, int64_t first_block, unsigned blocks) {
      fsam_kernel<S><<<blocks, kThreads, 0, stream>>>(args, s, first_block, partials);
    });
  });
}

}  // namespace sam_fused::cuda
