// mta.cuh — device-side machinery shared by the CUDA kernels of sam_fused (multi-tensor apply, our own version of
// the apex/ATen idea):
//   * MtaArgs<D>: the by-value kernel argument struct (tensor addresses of D lists, element counts, and the
//     block -> (tensor slot, chunk) map) that the host fills from an mta::Plan; for_each_launch() fills it and
//     launches once per planned launch, i.e. several times only when one struct cannot hold the whole list. With
//     CUDA >= 12.1 the struct uses the 32 KB kernel parameter budget (mta_planner.h): 631-842 tensors and 2,048
//     blocks per launch, so a 2,000-tensor list is 3-4 launches per op.
//   * Storage traits (fp32, bf16, fp16): raw packets of 16 bytes for the aligned vector path, conversions to fp32 so
//     all elementwise math is fp32, round-to-nearest-even stores (what torch's .to(dtype) does).
//   * Rn: fp32 whose + - * are the IEEE round-to-nearest intrinsics. nvcc contracts a*b+c into one FMA by default;
//     the reference (separate torch ops) rounds every step, so the shared formulas of sam_math.h are instantiated
//     with Rn to keep the reference's rounding, element for element. Rd: the same for the fp64 terms of the sums of
//     squares (sam_math.h: every term is formed and squared in fp64), so no square is fused into its accumulation.
//   * for_each_packet: the aligned vector loop with a scalar tail (or the scalar loop when a pointer is misaligned).
//     Each thread issues the 16-byte loads of kUnroll packets (every list the kernel reads) before it uses any of
//     them, so kUnroll x lists loads per thread are in flight: what a memory-bound kernel needs on an H200.
//   * block_sum: a fixed-order block reduction (warp shuffles, then one warp over the warp sums): no atomics, so the
//     per-block partial sums, and the sums the finishing kernel makes of them, are deterministic. The sums of
//     squares use it in fp64, from the per-thread accumulators to the finishing stage.
// Included only by the .cu files; it has no torch dependency.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/launch.h"
#include "cuda/mta_planner.h"
#include "shared/sam_math.h"

namespace sam_fused::cuda {

// Threads per block: a multiple of the warp size (block_sum relies on it), 8 warps to keep loads in flight.
constexpr int kThreads = 256;

template <int D>
struct MtaArgs {
  static constexpr int kMaxTensors = mta::max_tensors_for(D, kParamBytes);
  static constexpr int kMaxBlocks = mta::max_blocks_for(kParamBytes);
  void* ptr[D][kMaxTensors];
  int64_t numel[kMaxTensors];
  int32_t chunk[kMaxBlocks];  // chunk index: the block starts at chunk * kChunkElems
  uint16_t slot[kMaxBlocks];
};
// A kernel's whole parameter list must fit the budget; the struct leaves kScalarBytes for the other parameters.
static_assert(sizeof(MtaArgs<2>) + mta::kScalarBytes <= kParamBytes &&
                  sizeof(MtaArgs<3>) + mta::kScalarBytes <= kParamBytes,
              "MtaArgs exceeds the kernel parameter budget");

// The part of one tensor this block works on.
struct Chunk {
  int slot;
  int64_t start;  // first element, in the tensor (or in each micro-batch slice)
  int64_t len;    // elements in this block
  int64_t numel;  // elements of the tensor (of one slice)
};

template <int D>
__device__ __forceinline__ Chunk chunk_of(const MtaArgs<D>& a) {
  Chunk c;
  c.slot = a.slot[blockIdx.x];
  c.numel = a.numel[c.slot];
  c.start = static_cast<int64_t>(a.chunk[blockIdx.x]) * mta::kChunkElems;
  c.len = c.numel - c.start < mta::kChunkElems ? c.numel - c.start : mta::kChunkElems;
  return c;
}

// List d's address for this block's tensor, typed (null when the list is absent).
template <class B, int D>
__device__ __forceinline__ B* list_ptr(const MtaArgs<D>& a, int d, const Chunk& c) {
  return static_cast<B*>(a.ptr[d][c.slot]);
}

__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Fills the argument struct for each launch of `plan` from table `t` and calls launch(args, first_block, blocks),
// which enqueues the kernel. Returns the first launch error.
template <int D, class L>
cudaError_t for_each_launch(const mta::Plan& plan, const PtrTable<D>& t, L&& launch) {
#if CUDART_VERSION >= 12010
  // Parameters above 4 KB need a driver of CUDA 12.1 (r530) or newer; an older one (minor-version compatibility)
  // would refuse the launch with a less telling error.
  static const bool driver_ok = [] {
    int version = 0;
    return cudaDriverGetVersion(&version) == cudaSuccess && version >= 12010;
  }();
  if (!driver_ok) return cudaErrorInsufficientDriver;
#endif
  for (const mta::Launch& l : plan.launches) {
    if (l.tensors.size() > static_cast<size_t>(MtaArgs<D>::kMaxTensors) ||
        l.blocks.size() > static_cast<size_t>(MtaArgs<D>::kMaxBlocks)) {
      return cudaErrorInvalidValue;  // a plan made with other limits: refuse rather than overrun the struct
    }
    MtaArgs<D> args{};
    for (size_t s = 0; s < l.tensors.size(); ++s) {
      const size_t i = static_cast<size_t>(l.tensors[s]);
      for (int d = 0; d < D; ++d) args.ptr[d][s] = t.ptrs[d][i];
      args.numel[s] = t.numel[i];
    }
    for (size_t b = 0; b < l.blocks.size(); ++b) {
      const mta::Block& blk = l.blocks[b];
      if (blk.chunk_start % mta::kChunkElems != 0) return cudaErrorInvalidValue;
      args.chunk[b] = static_cast<int32_t>(blk.chunk_start / mta::kChunkElems);
      args.slot[b] = static_cast<uint16_t>(blk.slot);
    }
    launch(args, l.first_block, static_cast<unsigned>(l.blocks.size()));
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

// ---------------------------------------------------------------------------------------------------------------
// Storage types. Bits is what memory holds; kWidth elements make one 16-byte packet.

struct F32 {
  using Bits = float;
  static constexpr int kWidth = 4;
  static __device__ __forceinline__ float to_float(Bits b) { return b; }
  static __device__ __forceinline__ Bits from_float(float x) { return x; }
};

struct BF16 {
  using Bits = uint16_t;
  static constexpr int kWidth = 8;
  static __device__ __forceinline__ float to_float(Bits b) { return __uint_as_float(static_cast<uint32_t>(b) << 16); }
  static __device__ __forceinline__ Bits from_float(float x) { return __bfloat16_as_ushort(__float2bfloat16_rn(x)); }
};

struct F16 {
  using Bits = uint16_t;
  static constexpr int kWidth = 8;
  static __device__ __forceinline__ float to_float(Bits b) { return __half2float(__ushort_as_half(b)); }
  static __device__ __forceinline__ Bits from_float(float x) { return __half_as_ushort(__float2half_rn(x)); }
};

// W consecutive elements in storage format; alignas makes W * sizeof(B) == 16 one vector load/store.
template <class B, int W>
struct alignas(sizeof(B) * W) Raw {
  B v[W];
};

// The packets at one position of L lists: what a kernel's load step returns to its use step (for_each_packet).
template <class B, int W, int L>
struct Packs {
  Raw<B, W> v[L];
};

template <class B, int W>
__device__ __forceinline__ Raw<B, W> load_raw(const B* p) {
  return *reinterpret_cast<const Raw<B, W>*>(p);
}

template <class B, int W>
__device__ __forceinline__ void store_raw(B* p, const Raw<B, W>& r) {
  *reinterpret_cast<Raw<B, W>*>(p) = r;
}

template <class S, int W>
__device__ __forceinline__ void to_float(const Raw<typename S::Bits, W>& r, float (&x)[W]) {
#pragma unroll
  for (int e = 0; e < W; ++e) x[e] = S::to_float(r.v[e]);
}

template <class S, int W>
__device__ __forceinline__ Raw<typename S::Bits, W> from_float(const float (&x)[W]) {
  Raw<typename S::Bits, W> r;
#pragma unroll
  for (int e = 0; e < W; ++e) r.v[e] = S::from_float(x[e]);
  return r;
}

// Calls body(S{}) with S the storage traits of `dtype`.
template <class F>
cudaError_t dispatch_dtype(DType dtype, F&& body) {
  switch (dtype) {
    case DType::kFloat:
      return body(F32{});
    case DType::kBFloat16:
      return body(BF16{});
    case DType::kHalf:
      return body(F16{});
  }
  return cudaErrorInvalidValue;
}

// ---------------------------------------------------------------------------------------------------------------
// Rn, Rd: arithmetic rounded at every operation (never fused), for the formulas of sam_math.h.

struct Rn {
  float v;
};

__host__ __device__ __forceinline__ Rn operator+(Rn a, Rn b) {
#ifdef __CUDA_ARCH__
  return {__fadd_rn(a.v, b.v)};
#else
  return {a.v + b.v};
#endif
}

__host__ __device__ __forceinline__ Rn operator-(Rn a, Rn b) {
#ifdef __CUDA_ARCH__
  return {__fsub_rn(a.v, b.v)};
#else
  return {a.v - b.v};
#endif
}

__host__ __device__ __forceinline__ Rn operator*(Rn a, Rn b) {
#ifdef __CUDA_ARCH__
  return {__fmul_rn(a.v, b.v)};
#else
  return {a.v * b.v};
#endif
}

// Rd: fp64 products rounded at every operation, for the terms of the sums of squares (square, square_scaled).
struct Rd {
  double v;
};

__host__ __device__ __forceinline__ Rd operator*(Rd a, Rd b) {
#ifdef __CUDA_ARCH__
  return {__dmul_rn(a.v, b.v)};
#else
  return {a.v * b.v};
#endif
}

// t = |w| + eta, the ASAM factor (sam_math.h), on the rounding-exact Rn type.
__device__ __forceinline__ Rn adaptive_factor(float w, Rn eta) { return sam_fused::adaptive_factor(Rn{fabsf(w)}, eta); }

// ---------------------------------------------------------------------------------------------------------------
// Loops and reductions.

template <int W>
struct Width {
  static constexpr int value = W;
};

template <bool V>
struct Flag {
  static constexpr bool value = V;
};

// Calls f(Flag<b>{}): a condition uniform over the kernel made a compile-time one, so that the loop it selects is
// straight-line code whose loads can all be issued first.
template <class F>
__device__ __forceinline__ void with_flag(bool b, F&& f) {
  if (b) {
    f(Flag<true>{});
  } else {
    f(Flag<false>{});
  }
}

// Packets per thread per iteration of the vector loop. 4 x 16 bytes per list read keeps ~4x the bytes of one packet
// in flight per thread at a register cost that ptxas -v shows without spills (tests/test_cuda_static.py).
constexpr int kUnroll = 4;

// For each packet of N elements at i (when `vectorized`: every pointer the kernel touches is 16-byte aligned at the
// chunk start), then for each remaining element (Width<1>): v = load(width, i); use(width, i, v). load reads every
// list at i (and nothing else); use computes and stores. The main loop calls load for kUnroll packets before it calls
// use for any, so their loads are in flight together; each thread still visits its packets in increasing order (the
// order of its accumulations). Threads stride through the chunk, so consecutive threads touch consecutive packets
// (coalesced). Lists must not overlap except element for element (in-place ops), as loads move ahead of stores.
template <int N, class Load, class Use>
__device__ __forceinline__ void for_each_packet(int64_t len, bool vectorized, Load&& load, Use&& use) {
  int64_t tail = 0;
  if (vectorized) {
    const int64_t full = len / N * N;
    const int64_t step = static_cast<int64_t>(blockDim.x) * N;
    int64_t i = static_cast<int64_t>(threadIdx.x) * N;
    for (; i + (kUnroll - 1) * step < full; i += kUnroll * step) {
      decltype(load(Width<N>{}, i)) v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) v[u] = load(Width<N>{}, i + u * step);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) use(Width<N>{}, i + u * step, v[u]);
    }
    for (; i < full; i += step) use(Width<N>{}, i, load(Width<N>{}, i));
    tail = full;
  }
  for (int64_t i = tail + threadIdx.x; i < len; i += blockDim.x) use(Width<1>{}, i, load(Width<1>{}, i));
}

// Sum of v over the block, valid in thread 0. Fixed order: shuffle tree in each warp, then the first warp reduces
// the warp sums the same way. Every thread of the block must call it (it synchronizes); blockDim.x % 32 == 0.
template <class T>
__device__ __forceinline__ T block_sum(T v) {
  __shared__ T warp_sums[32];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < static_cast<int>(blockDim.x >> 5) ? warp_sums[lane] : T(0);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  }
  __syncthreads();  // warp_sums may be reused by the next call
  return v;
}

}  // namespace sam_fused::cuda
