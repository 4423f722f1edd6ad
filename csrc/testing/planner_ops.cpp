// planner_ops.cpp — exposes the CUDA kernels' launch planner (csrc/cuda/mta_planner.h) as a torch op, so that its
// guarantees are unit-tested on machines without a GPU (tests/test_cuda_planner.py). Test support only: built on the
// fly by the tests (tests/native.py, a C++ compiler is all it needs), never part of an installed extension.
//
//   torch.ops.sam_fused_planner.plan_chunks(numels, chunk_size, max_tensors, max_blocks) -> int[]
//
// returns the plan as flattened rows (launch, block, tensor, chunk_start, chunk_len): one row per block, `block` the
// block's index within its launch and `tensor` the index into `numels`.
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "cuda/mta_planner.h"

namespace {

std::vector<int64_t> plan_chunks(std::vector<int64_t> numels, int64_t chunk_size, int64_t max_tensors,
                                 int64_t max_blocks) {
  TORCH_CHECK_VALUE(chunk_size >= 1, "plan_chunks: chunk_size must be >= 1, got ", chunk_size);
  TORCH_CHECK_VALUE(max_tensors >= 1 && max_tensors <= INT32_MAX, "plan_chunks: bad max_tensors ", max_tensors);
  TORCH_CHECK_VALUE(max_blocks >= 1 && max_blocks <= INT32_MAX, "plan_chunks: bad max_blocks ", max_blocks);
  for (size_t i = 0; i < numels.size(); ++i) {
    TORCH_CHECK_VALUE(numels[i] >= 0, "plan_chunks: numels[", i, "] is negative (", numels[i], ")");
  }
  const sam_fused::mta::Plan plan = sam_fused::mta::plan_chunks(numels, chunk_size, static_cast<int>(max_tensors),
                                                                static_cast<int>(max_blocks));
  std::vector<int64_t> rows;
  rows.reserve(static_cast<size_t>(plan.total_blocks) * 5);
  for (size_t l = 0; l < plan.launches.size(); ++l) {
    const auto& launch = plan.launches[l];
    for (size_t b = 0; b < launch.blocks.size(); ++b) {
      const auto& block = launch.blocks[b];
      rows.insert(rows.end(), {static_cast<int64_t>(l), static_cast<int64_t>(b), launch.tensors[block.slot],
                               block.chunk_start, block.chunk_len});
    }
  }
  return rows;
}

// The limits the CUDA kernels use for a kernel parameter budget (kParamBytesLarge: CUDA >= 12.1 builds;
// kParamBytesClassic: older ones), so tests can plan with exactly them: [chunk, max_blocks, max_tensors(depth 1..4)].
std::vector<int64_t> kernel_limits(int64_t param_bytes) {
  using namespace sam_fused::mta;
  TORCH_CHECK_VALUE(param_bytes == kParamBytesLarge || param_bytes == kParamBytesClassic,
                    "kernel_limits: param_bytes must be ", kParamBytesLarge, " or ", kParamBytesClassic);
  const int b = static_cast<int>(param_bytes);
  return {kChunkElems, max_blocks_for(b), max_tensors_for(1, b), max_tensors_for(2, b), max_tensors_for(3, b),
          max_tensors_for(4, b)};
}

}  // namespace

// Test-only namespace (not sam_fused_testing: extensions built before this file left _C_cpu still register that one).
TORCH_LIBRARY(sam_fused_planner, m) {
  // Registered as catch-all kernels: these ops take no tensors, so there is no dispatch key to select on.
  m.def("plan_chunks(int[] numels, int chunk_size, int max_tensors, int max_blocks) -> int[]", TORCH_FN(plan_chunks));
  m.def("kernel_limits(int param_bytes=32764) -> int[]", TORCH_FN(kernel_limits));
}
