// grad_sumsq.cu — grad_sumsq (docs/DESIGN.md section 3) and the second stage shared by every reduction.
//
// grad_sumsq(grads, params, eta, k) = per micro-batch slice j, the sum over all tensors of (T * g[j])^2 with
// T = |w| + eta when params are given (broadcast over the k slices), else T = 1. It is the norm that scales SAM's
// perturbation, so it runs over every gradient every step: one multi-tensor pass reads each gradient once (and
// each weight once per slice, from cache after the first).
//
// Determinism without atomics: stage 1 has every block write its own partial sum per slice to a buffer (slot
// j * total_blocks + global block number); stage 2 (finish_sums) sums each slice's row in a fixed order. The result
// depends only on the tensor sizes, never on scheduling.
//
// Everything is fp64 (sam_math.h): each term is squared in fp64 from the fp32 value of g (and t), and the per-thread
// accumulators, the block reduction, the partials and the finishing stage are fp64, so the sum of any finite
// gradient is finite (an fp32 sum overflows once |g| > ~1.8e19).
#include "cuda/mta.cuh"

namespace sam_fused::cuda {
namespace {

template <class S>
__global__ void __launch_bounds__(kThreads)
    grad_sumsq_kernel(const __grid_constant__ MtaArgs<2> a, int64_t first_block, int64_t total_blocks, int64_t k,
                      float eta_f, double* partials) {
  using B = typename S::Bits;
  const Chunk c = chunk_of(a);
  const B* g0 = list_ptr<const B>(a, 0, c);
  const B* p = list_ptr<const B>(a, 1, c);
  if (p != nullptr) p += c.start;
  const Rn eta{eta_f};
  with_flag(p != nullptr, [&](auto adaptive) {
    for (int64_t j = 0; j < k; ++j) {
      const B* g = g0 + j * c.numel + c.start;  // slice j of a [k, *p.shape] gradient (k = 1: the gradient)
      double acc = 0.0;
      for_each_packet<S::kWidth>(
          c.len, aligned16(g) && aligned16(p),
          [&](auto width, int64_t i) {  // the gradient and, for ASAM, the weight: loaded together
            constexpr int W = decltype(width)::value;
            Packs<B, W, 2> r;
            r.v[0] = load_raw<B, W>(g + i);
            if constexpr (decltype(adaptive)::value) r.v[1] = load_raw<B, W>(p + i);
            return r;
          },
          [&](auto width, int64_t, const auto& r) {
            constexpr int W = decltype(width)::value;
            float gf[W];
            to_float<S, W>(r.v[0], gf);
            if constexpr (decltype(adaptive)::value) {
              float pf[W];
              to_float<S, W>(r.v[1], pf);
#pragma unroll
              for (int e = 0; e < W; ++e) acc += square_scaled(Rd{gf[e]}, Rd{adaptive_factor(pf[e], eta).v}).v;
            } else {
#pragma unroll
              for (int e = 0; e < W; ++e) acc += square(Rd{gf[e]}).v;
            }
          });
      const double block_total = block_sum(acc);
      if (threadIdx.x == 0) partials[j * total_blocks + first_block + blockIdx.x] = block_total;
    }
  });
}

// One block per slice j: out[j] = sum of its row of partials. Thread t adds elements t, t + blockDim, ... in order,
// then block_sum combines the threads in a fixed order.
__global__ void __launch_bounds__(kThreads) finish_sums_kernel(const double* partials, int64_t blocks, double* out) {
  const double* row = partials + static_cast<int64_t>(blockIdx.x) * blocks;
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < blocks; i += blockDim.x) acc += row[i];
  const double total = block_sum(acc);
  if (threadIdx.x == 0) out[blockIdx.x] = total;
}

}  // namespace

cudaError_t launch_grad_sumsq(DType dtype, const mta::Plan& plan, const PtrTable<2>& t, int64_t k, float eta,
                              double* partials, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto storage) {
    using S = decltype(storage);
    return for_each_launch(plan, t, [&](const MtaArgs<2>& args, int64_t first_block, unsigned blocks) {
      grad_sumsq_kernel<S><<<blocks, kThreads, 0, stream>>>(args, first_block, plan.total_blocks, k, eta, partials);
    });
  });
}

cudaError_t launch_finish_sums(const double* partials, int64_t blocks, int64_t k, double* out, cudaStream_t stream) {
  if (k < 1 || k > 0x7fffffff) return cudaErrorInvalidValue;
  finish_sums_kernel<<<static_cast<unsigned>(k), kThreads, 0, stream>>>(partials, blocks, out);
  return cudaGetLastError();
}

}  // namespace sam_fused::cuda
