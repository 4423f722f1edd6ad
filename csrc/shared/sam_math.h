// sam_math.h — the per-element formulas of every sam_fused op, shared by the CPU (csrc/cpu) and CUDA (csrc/cuda)
// kernels so that there is one formula with two callers. The reference they must match is
// sam_fused/reference.py; the order of operations below is the reference's, so fp32 results agree to rounding.
//
// Each function is a template over the value type V: float on CUDA and in scalar tails, at::vec::Vectorized<float>
// in the CPU vector loops. Only +, -, * are used on V; abs and sqrt are done by the caller (their spelling differs).
#pragma once

#include <cmath>
#include <math.h>  // unqualified isfinite/sqrt on the host, as on the device

#if defined(__CUDACC__) || defined(__HIPCC__)
#define SAM_HD __host__ __device__ __forceinline__
#else
#define SAM_HD inline
#endif

namespace sam_fused {

constexpr float kDefaultEps = 1e-12f;

// The sum of squares is fp64 whatever the storage dtype: each term is formed and squared in fp64 (exact for fp32
// values), so any finite fp32/bf16/fp16 gradient has a finite sum (|g| <= 3.4e38: g^2 <= 1.2e77), where an fp32 sum
// overflows once |g| > 1.8e19 and would skip the step.
//
// scale = rho / (sqrt(sumsq) + eps), or rho when the perturbation is unnormalized; 0 when sumsq is not finite
// (non-finite gradients: the kernels then leave w untouched rather than multiply inf by 0). Computed in fp64 and
// rounded once to the weights' math dtype by the caller (a norm above the fp32 range still gives a nonzero scale).
SAM_HD double perturb_scale(double sumsq, double rho, double eps, bool normalize) {
  if (!isfinite(sumsq)) return 0.0;
  return normalize ? rho / (sqrt(sumsq) + eps) : rho;
}

SAM_HD bool perturb_enabled(double sumsq) { return isfinite(sumsq); }

// ASAM's factor T = |w| + eta, in the weights' math dtype (fp32); the caller takes |w| (its spelling differs).
template <class V>
SAM_HD V adaptive_factor(V abs_w, V eta) {
  return abs_w + eta;
}

// SAM: w' = w + scale * g
template <class V>
SAM_HD V perturbed(V w, V g, V scale) {
  return w + scale * g;
}

// ASAM: t = adaptive_factor(|w|, eta), w' = w + scale * ((t * t) * g)
template <class V>
SAM_HD V perturbed_adaptive(V w, V t, V g, V scale) {
  return w + scale * ((t * t) * g);
}

// Term of the squared norm: g^2 (in fp64, see above).
template <class V>
SAM_HD V square(V x) {
  return x * x;
}

// F-SAM direction d = g - sigma * m_prev (m_prev is the EMA before this step)
template <class V>
SAM_HD V fsam_direction(V g, V m_prev, V sigma) {
  return g - m_prev * sigma;
}

// F-SAM EMA m = lmbda * m_prev + (1 - lmbda) * g
template <class V>
SAM_HD V fsam_ema(V g, V m_prev, V lmbda, V one_minus_lmbda) {
  return m_prev * lmbda + g * one_minus_lmbda;
}

// Term of the ASAM squared norm ||T * g||^2: (g * t)^2, called with V = double (or a vector of doubles): t =
// adaptive_factor(|w|, eta) in the weights' math dtype (as the perturbation uses it), then g * t and its square in fp64.
template <class V>
SAM_HD V square_scaled(V g, V t) {
  return square(g * t);
}

}  // namespace sam_fused
