// decode / CUDA: cell levels uint8 (*shape, c) -> integer weights int32 (*shape). Never clamps.
#include <torch/library.h>

#include "../common.h"
#include "cuda_utils.cuh"

namespace crossbar_torch {
namespace {

__global__ void decode_kernel(const uint8_t* __restrict__ cells, int32_t* __restrict__ out,
                              int64_t n, int64_t c, int B, int b, int e, int S) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(blockDim.x) * gridDim.x) {
    out[i] = decode_one(cells + i * c, B, b, e, S);
  }
}

at::Tensor decode_cuda(const at::Tensor& cells_in, int64_t weight_bits, int64_t bits_per_cell,
                       int64_t encoding, bool check_values) {
  check_format(weight_bits, bits_per_cell, encoding);
  check_dtype(cells_in, at::kByte, "decode", "cells");
  check_cuda(cells_in, "decode", "cells");
  TORCH_CHECK(cells_in.dim() >= 1, "crossbar_torch.decode: cells must have a trailing cell axis");
  const int64_t S = slices_for(weight_bits, bits_per_cell, encoding);
  const int64_t c = cells_for(weight_bits, bits_per_cell, encoding);
  check_size(cells_in, cells_in.dim() - 1, c, "decode", "cells", "cells per weight c");
  const c10::cuda::CUDAGuard guard(cells_in.device());
  const at::Tensor cells = cells_in.contiguous();
  if (check_values) check_levels(cells, bits_per_cell, "decode", "cells");
  auto sizes = cells.sizes().vec();
  sizes.pop_back();
  at::Tensor out = at::empty(sizes, cells.options().dtype(at::kInt));
  const int64_t n = out.numel();
  if (n > 0) {
    decode_kernel<<<blocks_for(n), kThreads, 0, current_stream()>>>(
        cells.const_data_ptr<uint8_t>(), out.mutable_data_ptr<int32_t>(), n, c, int(weight_bits),
        int(bits_per_cell), int(encoding), int(S));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(crossbar_torch, CUDA, m) { m.impl("decode", &decode_cuda); }

}  // namespace crossbar_torch
