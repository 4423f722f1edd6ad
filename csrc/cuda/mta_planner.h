// mta_planner.h — the host-side launch planner of the CUDA multi-tensor kernels (plain C++: no CUDA, no torch).
//
// A multi-tensor kernel gets, by value, one argument struct holding the addresses of up to `max_tensors` tensors and
// a map of up to `max_blocks` thread blocks to (tensor, chunk): block b processes elements
// [chunk_start, chunk_start + chunk_len) of one tensor. Kernel arguments are limited in size (4 KB is the portable
// budget; CUDA >= 12.1 allows 32 KB), so a list of many tensors or many chunks needs several launches; the planner
// decides where to cut. It lives in its own header, free of CUDA, so that the same code is unit-tested on the CPU
// build of torch through the sam_fused_planner::plan_chunks op (csrc/testing/planner_ops.cpp, built on the fly by
// tests/native.py; tests/test_cuda_planner.py).
//
// Guarantees (what the tests check): every element of every non-empty tensor is in exactly one block; empty tensors
// get no block and no slot; a launch never has more than max_tensors tensors or max_blocks blocks; a tensor whose
// chunks do not fit in the current launch continues in the next one (it then has a slot in both); blocks are numbered
// globally in list order (tensor by tensor, chunk by chunk), which the reductions use to place their partial sums.
#pragma once

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <vector>

namespace sam_fused::mta {

// Elements per block of work. 16K elements (64 KB of fp32) is 16 vector packets per thread of a 256-thread block:
// enough work to hide the block's start-up, small enough to give a ResNet-50 ~1,600 blocks to spread over the SMs.
// It must be a multiple of every vector width the kernels use (8 elements), so that a chunk of an aligned tensor
// starts aligned.
constexpr int64_t kChunkElems = 16384;

// Kernel parameter budgets. The multi-tensor kernels take their argument struct by value, so the budget bounds how
// many tensors and blocks one launch covers. 4 KB is the classic limit; CUDA >= 12.1 allows 32,764 bytes on sm_70+
// (driver r530+), which every architecture the project builds meets. launch.h picks one at compile time.
constexpr int kParamBytesClassic = 4096;
constexpr int kParamBytesLarge = 32764;
// Bytes of each budget kept for the kernels' other parameters (pointers, counts, the *Scalars structs: <= 64 today).
constexpr int kScalarBytes = 256;

// Blocks per launch: 6 bytes each in the argument struct (a 4-byte chunk index and a 2-byte slot). With the large
// budget, 2,048 blocks (12 KB of the 32 KB) are more than an H200 holds resident at once (132 SMs x at most 8 blocks
// of 256 threads = 1,056), so one launch fills every SM with loads in flight; the classic budget's 320 (1,920 bytes)
// left most SMs with 2-3 blocks.
constexpr int max_blocks_for(int param_bytes) { return param_bytes >= kParamBytesLarge ? 2048 : 320; }

// Tensors per launch for a kernel that reads or writes `depth` lists: every slot costs depth addresses plus one
// element count (8 bytes each), in what the blocks and the scalars leave of the budget. Large budget: 1,263 / 842 /
// 631 / 505 tensors for depth 1 / 2 / 3 / 4 (classic: 120 / 80 / 60 / 48).
constexpr int max_tensors_for(int depth, int param_bytes) {
  return (param_bytes - kScalarBytes - 6 * max_blocks_for(param_bytes)) / (8 * (depth + 1));
}

struct Block {
  int32_t slot;         // the tensor's index within its launch (see Launch::tensors)
  int64_t chunk_start;  // first element of the block, in the tensor
  int64_t chunk_len;    // number of elements (chunk_size except at a tensor's end)
};

struct Launch {
  std::vector<int64_t> tensors;  // tensors[slot] = index of the tensor in the caller's list
  std::vector<Block> blocks;     // in launch order: block b of the grid is blocks[b]
  int64_t first_block = 0;       // global number of blocks[0] among all blocks of the plan
};

struct Plan {
  std::vector<Launch> launches;
  int64_t total_blocks = 0;
};

// Splits tensors of the given element counts into chunks of `chunk` elements and packs them into launches.
inline Plan plan_chunks(const std::vector<int64_t>& numels, int64_t chunk, int max_tensors, int max_blocks) {
  if (chunk < 1 || max_tensors < 1 || max_blocks < 1) {
    throw std::invalid_argument("plan_chunks: chunk, max_tensors and max_blocks must be >= 1");
  }
  Plan plan;
  Launch* cur = nullptr;
  auto open_launch = [&]() {
    plan.launches.emplace_back();
    cur = &plan.launches.back();
    cur->first_block = plan.total_blocks;
  };
  for (size_t i = 0; i < numels.size(); ++i) {
    const int64_t n = numels[i];
    if (n < 0) throw std::invalid_argument("plan_chunks: negative element count");
    if (n == 0) continue;  // no work, and no slot: slots are the scarce resource
    int32_t slot = -1;     // this tensor's slot in *cur, once it has one
    for (int64_t start = 0; start < n; start += chunk) {
      const bool blocks_full = cur != nullptr && static_cast<int>(cur->blocks.size()) == max_blocks;
      const bool needs_slot = slot < 0 || blocks_full;  // a new launch means a new slot
      const bool tensors_full = cur != nullptr && static_cast<int>(cur->tensors.size()) == max_tensors;
      if (cur == nullptr || blocks_full || (needs_slot && tensors_full)) {
        open_launch();
        slot = -1;
      }
      if (slot < 0) {
        slot = static_cast<int32_t>(cur->tensors.size());
        cur->tensors.push_back(static_cast<int64_t>(i));
      }
      cur->blocks.push_back(Block{slot, start, std::min(chunk, n - start)});
      ++plan.total_blocks;
    }
  }
  return plan;
}

}  // namespace sam_fused::mta
