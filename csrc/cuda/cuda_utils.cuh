// Small helpers shared by the CUDA kernels (no torch/extension.h in .cu files).
#pragma once

// c10/cuda/CUDAStream.h rather than ATen/cuda/CUDAContext.h: the latter pulls in the cuBLAS /
// cuSPARSE / cuSOLVER headers, which a bare nvcc toolkit (no math libraries) does not ship, and
// these kernels only need the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

namespace crossbar_torch {

constexpr int kThreads = 256;

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Blocks for a grid-stride loop over n elements.
inline unsigned int blocks_for(int64_t n) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(b, 65535 * 8)));
}

inline void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), "crossbar_torch.", op, ": ", name, " must be a CUDA tensor here, got ",
              t.device());
}

}  // namespace crossbar_torch
