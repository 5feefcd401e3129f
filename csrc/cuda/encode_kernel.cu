// encode / CUDA: integer weights (any shape, int32) -> cell levels uint8 (*shape, c).
#include <torch/library.h>

#include "../common.h"
#include "cuda_utils.cuh"

namespace crossbar_torch {
namespace {

__global__ void encode_kernel(const int32_t* __restrict__ q, uint8_t* __restrict__ out, int64_t n,
                              int64_t c, int B, int b, int e, int S) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(blockDim.x) * gridDim.x) {
    encode_one(q[i], B, b, e, S, out + i * c);
  }
}

at::Tensor encode_cuda(const at::Tensor& q_in, int64_t weight_bits, int64_t bits_per_cell,
                       int64_t encoding) {
  check_format(weight_bits, bits_per_cell, encoding);
  check_dtype(q_in, at::kInt, "encode", "q");
  check_cuda(q_in, "encode", "q");
  const c10::cuda::CUDAGuard guard(q_in.device());
  check_output_size(q_in.numel(), cells_for(weight_bits, bits_per_cell, encoding), "encode",
                    "the output's q.numel() * c cells");
  const at::Tensor q = q_in.contiguous();
  check_q_range(q, weight_bits);
  const int64_t S = slices_for(weight_bits, bits_per_cell, encoding);
  const int64_t c = cells_for(weight_bits, bits_per_cell, encoding);
  auto sizes = q.sizes().vec();
  sizes.push_back(c);
  at::Tensor out = at::empty(sizes, q.options().dtype(at::kByte));
  const int64_t n = q.numel();
  if (n > 0) {
    encode_kernel<<<blocks_for(n), kThreads, 0, current_stream()>>>(
        q.const_data_ptr<int32_t>(), out.mutable_data_ptr<uint8_t>(), n, c, int(weight_bits),
        int(bits_per_cell), int(encoding), int(S));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(crossbar_torch, CUDA, m) { m.impl("encode", &encode_cuda); }

}  // namespace crossbar_torch
