// perturb.cu — the weight-moving ops of SAM (docs/DESIGN.md section 3): perturb_, perturb_batched and restore_.
//
// perturb_ is the hot one: in ONE pass over memory it saves the weight to its backup and moves it,
//   backup <- w;  w <- w + scale * (T^2 * g),  scale = rho / (sqrt(sumsq) + eps)  (rho when unnormalized),
// reading the data-dependent sumsq (fp64) from device memory inside the kernel, so the host never waits for the norm
// and a whole SAM step can be captured in a CUDA graph. The scale is computed in fp64 (perturb_scale, from rho and
// eps as given) and rounded once to fp32, so a norm above the fp32 range still moves w; the per-element math is
// fp32. A non-finite sumsq (inf/NaN gradients) leaves w untouched (the backup is still written, so a later restore_
// is harmless).
// perturb_batched writes k perturbed copies (one per micro-batch slice) instead of moving w.
// restore_ copies raw storage words, so it is bit-exact for any value, NaN payloads included.
#include "cuda/mta.cuh"

namespace sam_fused::cuda {
namespace {

// The fp32 scale for a sum of squares: computed in fp64, rounded once (0 when sumsq is not finite).
__device__ __forceinline__ Rn scale_of(double sumsq, const PerturbScalars& s) {
  return Rn{static_cast<float>(perturb_scale(sumsq, s.rho, s.eps, s.normalize))};
}

// w' for one element, through the shared formulas (fp32, rounded at every step like the reference).
__device__ __forceinline__ float perturb_one(float w, float g, Rn scale, bool adaptive, Rn eta) {
  if (adaptive) return perturbed_adaptive(Rn{w}, adaptive_factor(w, eta), Rn{g}, scale).v;
  return perturbed(Rn{w}, Rn{g}, scale).v;
}

// The raw packets of w and g at element i: both perturb kernels read them (g even when a step is disabled, a rare
// case: the loads need no branch).
template <class B, int W>
__device__ __forceinline__ Packs<B, W, 2> load_w_g(const B* w, const B* g, int64_t i) {
  Packs<B, W, 2> r;
  r.v[0] = load_raw<B, W>(w + i);
  r.v[1] = load_raw<B, W>(g + i);
  return r;
}

// The perturbed packet of w from the loaded (w, g) packets.
template <class S, int W>
__device__ __forceinline__ Raw<typename S::Bits, W> perturbed_packet(const Packs<typename S::Bits, W, 2>& r, Rn scale,
                                                                      bool adaptive, Rn eta) {
  float wf[W], gf[W];
  to_float<S, W>(r.v[0], wf);
  to_float<S, W>(r.v[1], gf);
#pragma unroll
  for (int e = 0; e < W; ++e) wf[e] = perturb_one(wf[e], gf[e], scale, adaptive, eta);
  return from_float<S, W>(wf);
}

// Lists: 0 params (read, written), 1 grads, 2 backups (written).
template <class S>
__global__ void __launch_bounds__(kThreads)
    perturb_kernel(const __grid_constant__ MtaArgs<3> a, const double* sumsq, PerturbScalars s) {
  using B = typename S::Bits;
  const Chunk c = chunk_of(a);
  B* w = list_ptr<B>(a, 0, c) + c.start;
  const B* g = list_ptr<const B>(a, 1, c) + c.start;
  B* backup = list_ptr<B>(a, 2, c) + c.start;
  const double ss = sumsq[0];
  const bool enabled = perturb_enabled(ss);
  const Rn scale = scale_of(ss, s);
  const Rn eta{s.eta};
  const bool vectorized = aligned16(w) && aligned16(g) && aligned16(backup);
  for_each_packet<S::kWidth>(
      c.len, vectorized,
      [&](auto width, int64_t i) { return load_w_g<B, decltype(width)::value>(w, g, i); },
      [&](auto width, int64_t i, const auto& r) {
        constexpr int W = decltype(width)::value;
        store_raw<B, W>(backup + i, r.v[0]);
        if (!enabled) return;  // uniform over the grid: non-finite gradients, w stays as it is
        float wf[W], gf[W];
        to_float<S, W>(r.v[0], wf);
        to_float<S, W>(r.v[1], gf);
#pragma unroll
        for (int e = 0; e < W; ++e) wf[e] = perturb_one(wf[e], gf[e], scale, s.adaptive, eta);
        store_raw<B, W>(w + i, from_float<S, W>(wf));
      });
}

// Lists: 0 params, 1 grads [k, *shape], 2 outputs [k, *shape] (written). Slice j uses sumsq[j].
template <class S>
__global__ void __launch_bounds__(kThreads)
    perturb_batched_kernel(const __grid_constant__ MtaArgs<3> a, int64_t k, const double* sumsq, PerturbScalars s) {
  using B = typename S::Bits;
  const Chunk c = chunk_of(a);
  const B* w = list_ptr<const B>(a, 0, c) + c.start;
  const B* g0 = list_ptr<const B>(a, 1, c);
  B* out0 = list_ptr<B>(a, 2, c);
  const Rn eta{s.eta};
  for (int64_t j = 0; j < k; ++j) {
    const B* g = g0 + j * c.numel + c.start;
    B* out = out0 + j * c.numel + c.start;
    const double ss = sumsq[j];
    const bool enabled = perturb_enabled(ss);
    const Rn scale = scale_of(ss, s);
    const bool vectorized = aligned16(w) && aligned16(g) && aligned16(out);
    for_each_packet<S::kWidth>(
        c.len, vectorized,
        [&](auto width, int64_t i) { return load_w_g<B, decltype(width)::value>(w, g, i); },
        [&](auto width, int64_t i, const auto& r) {
          constexpr int W = decltype(width)::value;
          // This slice's gradients not finite: its copy is the unperturbed weight.
          store_raw<B, W>(out + i, enabled ? perturbed_packet<S, W>(r, scale, s.adaptive, eta) : r.v[0]);
        });
  }
}

// Lists: 0 params (written), 1 backups. B is a raw word of the element size.
template <class B>
__global__ void __launch_bounds__(kThreads) restore_kernel(const __grid_constant__ MtaArgs<2> a) {
  constexpr int kWidth = 16 / sizeof(B);
  const Chunk c = chunk_of(a);
  B* dst = list_ptr<B>(a, 0, c) + c.start;
  const B* src = list_ptr<const B>(a, 1, c) + c.start;
  for_each_packet<kWidth>(
      c.len, aligned16(dst) && aligned16(src),
      [&](auto width, int64_t i) { return load_raw<B, decltype(width)::value>(src + i); },
      [&](auto width, int64_t i, const auto& r) { store_raw<B, decltype(width)::value>(dst + i, r); });
}

}  // namespace

cudaError_t launch_perturb(DType dtype, const mta::Plan& plan, const PtrTable<3>& t, const double* sumsq,
                           const PerturbScalars& s, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto storage) {
    using S = decltype(storage);
    return for_each_launch(plan, t, [&](const MtaArgs<3>& args, int64_t, unsigned blocks) {
      perturb_kernel<S><<<blocks, kThreads, 0, stream>>>(args, sumsq, s);
    });
  });
}

cudaError_t launch_perturb_batched(DType dtype, const mta::Plan& plan, const PtrTable<3>& t, int64_t k,
                                   const double* sumsq, const PerturbScalars& s, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto storage) {
    using S = decltype(storage);
    return for_each_launch(plan, t, [&](const MtaArgs<3>& args, int64_t, unsigned blocks) {
      perturb_batched_kernel<S><<<blocks, kThreads, 0, stream>>>(args, k, sumsq, s);
    });
  });
}

cudaError_t launch_restore(size_t elem_size, const mta::Plan& plan, const PtrTable<2>& t, cudaStream_t stream) {
  switch (elem_size) {
    case 4:
      return for_each_launch(plan, t, [&](const MtaArgs<2>& args, int64_t, unsigned blocks) {
        restore_kernel<uint32_t><<<blocks, kThreads, 0, stream>>>(args);
      });
    case 2:
      return for_each_launch(plan, t, [&](const MtaArgs<2>& args, int64_t, unsigned blocks) {
        restore_kernel<uint16_t><<<blocks, kThreads, 0, stream>>>(args);
      });
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace sam_fused::cuda
