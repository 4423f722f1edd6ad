// cuda_emu.h — runs the CUDA kernels' own source on the CPU, for tests on machines without a GPU.
//
// Test support only (tests/test_cuda_planner.py builds it on the fly; it is not part of any extension). The kernel
// files csrc/cuda/*.cu are compiled by the host compiler after their `kernel<<<grid, block, smem, stream>>>(args)`
// launches are rewritten to `emu::launch(kernel, emu::Grid{grid, block, smem, stream}, args)`. This header then
// supplies what the kernels use of CUDA's device side: one std::thread per CUDA thread, a std::barrier for
// __syncthreads, a per-warp exchange for __shfl_down_sync, function-static storage for __shared__ (blocks run
// one after another), and the IEEE intrinsics as plain fp32/fp64 operations (built with -ffp-contract=off). The
// bf16/fp16 conversions are the CUDA headers' own host implementations. Shuffles carry a double, which holds every
// value the kernels exchange (fp32 or fp64) exactly.
//
// What this verifies: the kernels' indexing (chunks, micro-batch slices, vector packets and scalar tails, aligned
// and misaligned pointers), the argument struct filling and multi-launch loop, the per-element math and the
// two-stage reductions — against the torch reference. What it cannot: anything about real GPU execution (memory
// model, warp scheduling, the device compiler, launch limits).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <barrier>
#include <cmath>
#include <cstring>
#include <deque>
#include <thread>
#include <vector>

using std::isfinite;  // sam_math.h calls isfinite unqualified (CUDA's device overload); on the host it is std's

namespace emu {

struct WarpState {
  std::barrier<> bar{32};
  double lanes[32];
};

inline thread_local uint3 thread_idx;
inline thread_local uint3 block_idx;
inline dim3 block_dim;
inline thread_local WarpState* warp;
inline thread_local std::barrier<>* block_barrier;
inline long long launch_count = 0;

// Lane i gets lane i + off's value (its own when i + off >= 32), like __shfl_down_sync over a full warp.
template <class T>
T shfl_down(unsigned /*mask*/, T v, int off) {
  const int lane = static_cast<int>(thread_idx.x & 31);
  warp->bar.arrive_and_wait();  // everyone has read the previous exchange
  warp->lanes[lane] = static_cast<double>(v);
  warp->bar.arrive_and_wait();  // everyone has written this one
  return lane + off < 32 ? static_cast<T>(warp->lanes[lane + off]) : v;
}

inline void syncthreads() { block_barrier->arrive_and_wait(); }

inline float uint_as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

struct Grid {
  unsigned blocks;
  int threads;
  int smem;
  cudaStream_t stream;
};

// One std::thread per CUDA thread of a block, created once per launch; the threads run the blocks one after another
// in lockstep (a barrier between blocks), so function-static "__shared__" storage is never used by two blocks at once.
template <class K, class... A>
void launch(K kernel, Grid g, A... args) {
  ++launch_count;
  block_dim = dim3(static_cast<unsigned>(g.threads), 1, 1);
  std::barrier<> bar(g.threads);
  std::deque<WarpState> warps(static_cast<size_t>(g.threads / 32));
  std::vector<std::thread> threads;
  threads.reserve(static_cast<size_t>(g.threads));
  for (int t = 0; t < g.threads; ++t) {
    threads.emplace_back([&, t] {
      thread_idx = uint3{static_cast<unsigned>(t), 0, 0};
      warp = &warps[static_cast<size_t>(t / 32)];
      block_barrier = &bar;
      for (unsigned b = 0; b < g.blocks; ++b) {
        block_idx = uint3{b, 0, 0};
        kernel(args...);
        bar.arrive_and_wait();
      }
    });
  }
  for (auto& th : threads) th.join();
}

}  // namespace emu

#undef __shared__
#define __shared__ static
#undef __global__
#define __global__
#undef __grid_constant__
#define __grid_constant__
#undef __launch_bounds__
#define __launch_bounds__(...)
#define threadIdx emu::thread_idx
#define blockIdx emu::block_idx
#define blockDim emu::block_dim
#define __shfl_down_sync emu::shfl_down
#define __syncthreads emu::syncthreads
#define __uint_as_float emu::uint_as_float
#define __fadd_rn(a, b) ((a) + (b))
#define __fsub_rn(a, b) ((a) - (b))
#define __fmul_rn(a, b) ((a) * (b))
#define __dmul_rn(a, b) ((a) * (b))
#define cudaGetLastError() cudaSuccess
#define cudaDriverGetVersion(v) (*(v) = CUDART_VERSION, cudaSuccess)
