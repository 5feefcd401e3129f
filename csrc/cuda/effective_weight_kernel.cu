// effective_weight / CUDA: out[o, index[o, k]] = float(decode(cells[o, k])) * scale[o].
#include <torch/library.h>

#include "../common.h"
#include "cuda_utils.cuh"

namespace crossbar_torch {
namespace {

__global__ void effective_weight_kernel(const uint8_t* __restrict__ cells,
                                        const int64_t* __restrict__ index,
                                        const float* __restrict__ scale, float* __restrict__ out,
                                        int64_t n, int64_t K, int64_t c, int B, int b, int e,
                                        int S) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(blockDim.x) * gridDim.x) {
    const int64_t o = i / K;
    const float q = static_cast<float>(decode_one(cells + i * c, B, b, e, S));
    out[o * K + index[i]] = __fmul_rn(q, scale[o]);  // float32 multiply, no FMA contraction
  }
}

at::Tensor effective_weight_cuda(const at::Tensor& cells_in, const at::Tensor& index_in,
                                 const at::Tensor& scale_in, int64_t weight_bits,
                                 int64_t bits_per_cell, int64_t encoding, bool check_values) {
  check_cuda(cells_in, "effective_weight", "cells");
  check_effective_weight(cells_in, index_in, scale_in, weight_bits, bits_per_cell, encoding);
  const int64_t out = cells_in.size(0), K = cells_in.size(1);
  const int64_t S = slices_for(weight_bits, bits_per_cell, encoding);
  const int64_t c = cells_for(weight_bits, bits_per_cell, encoding);
  const c10::cuda::CUDAGuard guard(cells_in.device());
  const at::Tensor cells = cells_in.contiguous();
  const at::Tensor index = index_in.contiguous();
  const at::Tensor scale = scale_in.contiguous();
  if (check_values) check_effective_weight_values(cells, index, bits_per_cell);
  at::Tensor result = at::zeros({out, K}, cells.options().dtype(at::kFloat));
  const int64_t n = out * K;
  if (n > 0) {
    effective_weight_kernel<<<blocks_for(n), kThreads, 0, current_stream()>>>(
        cells.const_data_ptr<uint8_t>(), index.const_data_ptr<int64_t>(),
        scale.const_data_ptr<float>(), result.mutable_data_ptr<float>(), n, K, c,
        int(weight_bits), int(bits_per_cell), int(encoding), int(S));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(crossbar_torch, CUDA, m) { m.impl("effective_weight", &effective_weight_cuda); }

}  // namespace crossbar_torch
