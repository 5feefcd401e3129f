// compensate / CUDA: one thread per weight; the arithmetic is compensate_one_weight
// (program_row.h), the one the CPU kernel runs.
#include <torch/library.h>

#include "../common.h"
#include "../compensate_args.h"
#include "../program_row.h"
#include "cuda_utils.cuh"

namespace crossbar_torch {
namespace {

__global__ void compensate_kernel(const uint8_t* cells, const bool* held, const uint8_t* old,
                                  uint8_t* out, int64_t n, int64_t c, CompFormat fmt, bool on) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(blockDim.x) * gridDim.x) {
    compensate_one_weight(cells + i * c, held + i * c, old + i * c, fmt, on, out + i * c);
  }
}

at::Tensor compensate_cuda(const at::Tensor& cells_in, const at::Tensor& held_in,
                           const at::Tensor& old_in, int64_t weight_bits, int64_t bits_per_cell,
                           int64_t encoding, int64_t compensate_slices, bool check_values) {
  check_cuda(cells_in, "compensate", "cells");
  const int64_t c = check_compensate(cells_in, held_in, old_in, weight_bits, bits_per_cell,
                                     encoding, compensate_slices);
  const c10::cuda::CUDAGuard guard(cells_in.device());
  const at::Tensor cells = cells_in.contiguous(), held = held_in.contiguous(),
                   old = old_in.contiguous();
  if (check_values) check_compensate_values(cells, old, bits_per_cell);
  at::Tensor out = at::empty_like(cells);
  const int64_t n = c ? cells.numel() / c : 0;
  if (n > 0) {
    compensate_kernel<<<blocks_for(n), kThreads, 0, current_stream()>>>(
        cells.const_data_ptr<uint8_t>(), held.const_data_ptr<bool>(),
        old.const_data_ptr<uint8_t>(), out.mutable_data_ptr<uint8_t>(), n, c,
        make_comp_format(int(weight_bits), int(bits_per_cell), int(encoding),
                         int(compensate_slices)),
        compensate_slices > 0);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(crossbar_torch, CUDA, m) { m.impl("compensate", &compensate_cuda); }

}  // namespace crossbar_torch
