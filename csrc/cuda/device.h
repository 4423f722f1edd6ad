// device.h — what the CUDA host ops (ops.cpp) take from c10::cuda: the backend's target for host::prepare, a guard
// making the tensors' device current, that device's current stream, the error check, and the allocation of scratch
// buffers. Kept in one small header so that the kernel emulation (csrc/testing/emu) can compile ops.cpp unchanged
// over CPU tensors with its own version of these few names: the host code it tests is the shipped one.
#pragma once

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "shared/host.h"

namespace sam_fused::cuda {

inline constexpr host::Target kTarget = host::kCuda;
using DeviceGuard = c10::cuda::CUDAGuard;

inline cudaStream_t current_stream(at::Device device) {
  return c10::cuda::getCurrentCUDAStream(device.index()).stream();
}

// Raises (c10::Error, with CUDA's message) when a launcher returned an error.
inline void check_launch(cudaError_t err) { C10_CUDA_CHECK(err); }

// A buffer every element of which the kernels write before anything reads it (reduction partials).
inline at::Tensor scratch(int64_t n, at::TensorOptions options) { return at::empty({n}, options); }

}  // namespace sam_fused::cuda
