// feedback_quantize / CUDA: one thread per filter (row), each running feedback_row
// (feedback_row.h), the arithmetic the CPU kernel runs; the running targets live in a device
// copy of `target`. Filters of one layer number in the hundreds to thousands, each O(K^2).
#include <torch/library.h>

#include "../common.h"
#include "../feedback_quantize_args.h"
#include "../feedback_row.h"
#include "cuda_utils.cuh"

namespace crossbar_torch {
namespace {

__global__ void feedback_kernel(double* t, const double* u, const bool* held, const uint8_t* lv,
                                int32_t* q, int64_t out, int64_t K, int64_t c,
                                int64_t per_group, CompFormat fmt) {
  for (int64_t o = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; o < out;
       o += int64_t(blockDim.x) * gridDim.x) {
    feedback_row(t + o * K, u + (o / per_group) * K * K, held ? held + o * K * c : nullptr,
                 lv ? lv + o * K * c : nullptr, K, fmt, q + o * K);
  }
}

at::Tensor feedback_quantize_cuda(const at::Tensor& target_in, const at::Tensor& u_in,
                                  const at::Tensor& held_in, const at::Tensor& levels_in,
                                  int64_t weight_bits, int64_t bits_per_cell, int64_t encoding,
                                  int64_t stuck_slices) {
  check_cuda(target_in, "feedback_quantize", "target");
  const int64_t c = check_feedback_quantize(target_in, u_in, held_in, levels_in, weight_bits,
                                            bits_per_cell, encoding, stuck_slices);
  const c10::cuda::CUDAGuard guard(target_in.device());
  at::Tensor t = target_in.contiguous().clone();
  const at::Tensor u = u_in.contiguous(), held = held_in.contiguous(),
                   levels = levels_in.contiguous();
  check_feedback_quantize_values(t, u, levels, bits_per_cell);
  const int64_t out = t.size(0), K = t.size(1), groups = u.size(0);
  at::Tensor q = at::empty({out, K}, t.options().dtype(at::kInt));
  if (out > 0 && K > 0) {
    feedback_kernel<<<blocks_for(out), kThreads, 0, current_stream()>>>(
        t.mutable_data_ptr<double>(), u.const_data_ptr<double>(),
        held.numel() ? held.const_data_ptr<bool>() : nullptr,
        levels.numel() ? levels.const_data_ptr<uint8_t>() : nullptr,
        q.mutable_data_ptr<int32_t>(), out, K, c, out / groups,
        make_comp_format(int(weight_bits), int(bits_per_cell), int(encoding),
                         int(stuck_slices)));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return q;
}

}  // namespace

TORCH_LIBRARY_IMPL(crossbar_torch, CUDA, m) {
  m.impl("feedback_quantize", &feedback_quantize_cuda);
}

}  // namespace crossbar_torch
