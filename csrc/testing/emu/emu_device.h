// emu_device.h — csrc/cuda/device.h for the kernel emulation. tests/native.py compiles csrc/cuda/ops.cpp with its
// `#include "cuda/device.h"` pointed here, so the shipped CUDA host code (validation and staging through
// csrc/shared/host.h, address tables, launch plans, two-stage reductions) runs over CPU tensors with the emulated
// kernels: the target is the CPU, there is no device to make current and no stream, and scratch buffers start as
// NaN so that a partial sum no block wrote poisons the result.
#pragma once

#include <ATen/ops/full.h>
#include <cuda_runtime_api.h>

#include <cmath>

#include "shared/host.h"

namespace sam_fused::cuda {

inline constexpr host::Target kTarget = host::kCpu;

struct DeviceGuard {
  explicit DeviceGuard(at::Device) {}
};

inline cudaStream_t current_stream(at::Device) { return nullptr; }

inline void check_launch(cudaError_t err) { TORCH_CHECK(err == cudaSuccess, "emulated launch failed: error ", err); }

inline at::Tensor scratch(int64_t n, at::TensorOptions options) { return at::full({n}, NAN, options); }

}  // namespace sam_fused::cuda
