// launch.h — the interface between the host side of the CUDA backend (ops.cpp: validation, layouts, allocation,
// planning; compiled by the host compiler against torch) and the kernels (*.cu: compiled by nvcc WITHOUT torch
// headers). Keeping torch out of the .cu files keeps nvcc's work small (CI builds this on a 2-core machine) and the
// device code independent of torch's headers; only raw addresses, element counts and scalars cross this line.
//
// Every launcher enqueues its kernels on `stream` (the caller's current stream), never synchronizes, and returns the
// first CUDA error it saw (cudaSuccess otherwise); the caller turns errors into exceptions.
#pragma once

#include <cuda_runtime_api.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "cuda/mta_planner.h"

namespace sam_fused::cuda {

enum class DType : int { kFloat, kBFloat16, kHalf };

// Addresses of D lists, tensor by tensor (ptrs[d][i] is list d's tensor i), and each position's element count (of
// one micro-batch slice where a list is sliced). A null address means "list absent" (e.g. no params: T = 1).
template <int D>
struct PtrTable {
  std::array<std::vector<void*>, D> ptrs;
  std::vector<int64_t> numel;
};

// Kernel parameter budget of this build: 32,764 bytes from CUDA 12.1 on (the .cu files and this host code see the
// same toolkit, so the argument struct and the plans agree), else the classic 4 KB.
#if CUDART_VERSION >= 12010
constexpr int kParamBytes = mta::kParamBytesLarge;
#else
constexpr int kParamBytes = mta::kParamBytesClassic;
#endif

// The plan every launcher below expects: chunks of kChunkElems, limits for a depth-D argument struct.
inline mta::Plan plan_for_depth(const std::vector<int64_t>& numel, int depth) {
  return mta::plan_chunks(numel, mta::kChunkElems, mta::max_tensors_for(depth, kParamBytes),
                          mta::max_blocks_for(kParamBytes));
}

struct PerturbScalars {
  double rho, eps;  // as given: the scale is computed in fp64 (perturb_scale) and rounded once to fp32
  float eta;
  bool adaptive, normalize;
};

struct FsamScalars {
  float sigma, lmbda, one_minus_lmbda, eta;  // one_minus_lmbda rounded from double, as the reference does
  bool first;
};

// Sums of squares are fp64 for every storage dtype (sam_math.h): partial sums, results and the sumsq the perturb
// kernels read are device fp64.

// grad_sumsq, first stage. Lists: 0 grads (k slices of numel[i] each), 1 params (or null: T = 1). Writes block b's
// sum for slice j to partials[j * plan.total_blocks + b].
cudaError_t launch_grad_sumsq(DType dtype, const mta::Plan& plan, const PtrTable<2>& t, int64_t k, float eta,
                              double* partials, cudaStream_t stream);

// Second stage of every reduction: out[j] = sum of partials[j * blocks .. (j + 1) * blocks), in a fixed order.
cudaError_t launch_finish_sums(const double* partials, int64_t blocks, int64_t k, double* out, cudaStream_t stream);

// perturb_. Lists: 0 params (written), 1 grads, 2 backups (written). sumsq: device fp64, element 0 is read.
cudaError_t launch_perturb(DType dtype, const mta::Plan& plan, const PtrTable<3>& t, const double* sumsq,
                           const PerturbScalars& s, cudaStream_t stream);

// perturb_batched. Lists: 0 params, 1 grads (k slices), 2 outputs (k slices, written). sumsq: device fp64 [k].
cudaError_t launch_perturb_batched(DType dtype, const mta::Plan& plan, const PtrTable<3>& t, int64_t k,
                                   const double* sumsq, const PerturbScalars& s, cudaStream_t stream);

// restore_: list 0 (written) <- list 1, as raw words of elem_size bytes (bit-exact whatever the dtype).
cudaError_t launch_restore(size_t elem_size, const mta::Plan& plan, const PtrTable<2>& t, cudaStream_t stream);

// fsam_direction_. Lists: 0 grads (written: d), 1 ema (written), 2 params (or null: T = 1). Writes block b's sum of
// (T*d)^2 to partials[b].
cudaError_t launch_fsam(DType dtype, const mta::Plan& plan, const PtrTable<3>& t, const FsamScalars& s,
                        double* partials, cudaStream_t stream);

}  // namespace sam_fused::cuda
