// sort_and_encode / CUDA: cells[o, k] = encode(clamp(rint(w[o, index[o, k]] / scale[o]), +-qmax)).
#include <torch/library.h>

#include "../common.h"
#include "cuda_utils.cuh"

namespace crossbar_torch {
namespace {

__global__ void sort_and_encode_kernel(const float* __restrict__ w, const float* __restrict__ scale,
                                       const int64_t* __restrict__ index,
                                       uint8_t* __restrict__ cells, int64_t n, int64_t K,
                                       int64_t c, float qmax, int B, int b, int e, int S) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(blockDim.x) * gridDim.x) {
    const int64_t o = i / K;
    // IEEE float32 division (round to nearest), then round half to even, then clamp.
    float v = rintf(__fdiv_rn(w[o * K + index[i]], scale[o]));
    v = fminf(fmaxf(v, -qmax), qmax);
    encode_one(static_cast<int64_t>(v), B, b, e, S, cells + i * c);
  }
}

at::Tensor sort_and_encode_cuda(const at::Tensor& w_in, const at::Tensor& scale_in,
                                const at::Tensor& index_in, int64_t weight_bits,
                                int64_t bits_per_cell, int64_t encoding, bool check_values) {
  check_cuda(w_in, "sort_and_encode", "w");
  check_sort_and_encode(w_in, scale_in, index_in, weight_bits, bits_per_cell, encoding);
  const int64_t out = w_in.size(0), K = w_in.size(1);
  const c10::cuda::CUDAGuard guard(w_in.device());
  const at::Tensor w = w_in.contiguous();
  const at::Tensor scale = scale_in.contiguous();
  const at::Tensor index = index_in.contiguous();
  if (check_values) check_sort_and_encode_values(w, scale, index);
  const int64_t S = slices_for(weight_bits, bits_per_cell, encoding);
  const int64_t c = cells_for(weight_bits, bits_per_cell, encoding);
  at::Tensor cells = at::empty({out, K, c}, w.options().dtype(at::kByte));
  const int64_t n = out * K;
  if (n > 0) {
    sort_and_encode_kernel<<<blocks_for(n), kThreads, 0, current_stream()>>>(
        w.const_data_ptr<float>(), scale.const_data_ptr<float>(), index.const_data_ptr<int64_t>(),
        cells.mutable_data_ptr<uint8_t>(), n, K, c, static_cast<float>(qmax_for(weight_bits)),
        int(weight_bits), int(bits_per_cell), int(encoding), int(S));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return cells;
}

}  // namespace

TORCH_LIBRARY_IMPL(crossbar_torch, CUDA, m) { m.impl("sort_and_encode", &sort_and_encode_cuda); }

}  // namespace crossbar_torch
