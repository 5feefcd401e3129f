// feedback_quantize / CUDA: one thread per filter (row), each running feedback_row
// (feedback_row.h), the arithmetic the CPU kernel runs; the running targets live in a device
// copy of `target` (the errors against `target` itself). Filters of one layer number in the hundreds to thousands, each O(K^2).
// With rule 23's write penalty a filter needs the cells its predecessor chose: one launch per
// wave of the chains (the filters at one depth), the wave's filter numbers copied once.
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "../common.h"
#include "../feedback_quantize_args.h"
#include "../feedback_row.h"
#include "cuda_utils.cuh"

namespace crossbar_torch {
namespace {

__global__ void feedback_kernel(double* t, const double* t0, const double* u, const bool* held,
                                const uint8_t* lv, int32_t* q, int64_t out, int64_t K,
                                int64_t c, int64_t per_group, CompFormat fmt) {
  for (int64_t o = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; o < out;
       o += int64_t(blockDim.x) * gridDim.x) {
    feedback_row(t + o * K, t0 + o * K, u + (o / per_group) * K * K,
                 held ? held + o * K * c : nullptr, lv ? lv + o * K * c : nullptr, K, fmt,
                 q + o * K);
  }
}

__global__ void feedback_wave_kernel(double* t, const double* t0, const double* u,
                                     const bool* held, const uint8_t* lv, int32_t* q, int64_t K, int64_t c,
                                     int64_t per_group, CompFormat fmt, const double* lambda,
                                     const int64_t* pos, const int64_t* pred, uint8_t* chosen,
                                     const int64_t* wave, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(blockDim.x) * gridDim.x) {
    const int64_t o = wave[i], p = pred[o];
    feedback_row(t + o * K, t0 + o * K, u + (o / per_group) * K * K,
                 held ? held + o * K * c : nullptr, lv ? lv + o * K * c : nullptr, K, fmt,
                 q + o * K, lambda[o], pos + o * K,
                 p >= 0 ? chosen + p * K * c : nullptr, chosen + o * K * c);
  }
}

// (q, the running targets: each weight's at its choice, rule 21's warning reads them)
std::tuple<at::Tensor, at::Tensor> feedback_quantize_cuda(
    const at::Tensor& target_in, const at::Tensor& u_in, const at::Tensor& held_in,
    const at::Tensor& levels_in, int64_t weight_bits, int64_t bits_per_cell, int64_t encoding,
    int64_t stuck_slices, const at::Tensor& pred, const at::Tensor& sort_index,
    double write_penalty, const std::optional<at::Tensor>& filter_weight) {
  check_cuda(target_in, "feedback_quantize", "target");
  const int64_t c = check_feedback_quantize(target_in, u_in, held_in, levels_in, weight_bits,
                                            bits_per_cell, encoding, stuck_slices, pred,
                                            sort_index, write_penalty, filter_weight);
  const c10::cuda::CUDAGuard guard(target_in.device());
  const at::Tensor t0 = target_in.contiguous();  // the targets (rule 21's errors)
  at::Tensor t = t0.clone();  // running targets, updated in place
  const at::Tensor u = u_in.contiguous(), held = held_in.contiguous(),
                   levels = levels_in.contiguous();
  check_feedback_quantize_values(t, u, levels, bits_per_cell);
  const int64_t out = t.size(0), K = t.size(1), groups = u.size(0);
  at::Tensor q = at::empty({out, K}, t.options().dtype(at::kInt));
  const CompFormat fmt = make_comp_format(int(weight_bits), int(bits_per_cell), int(encoding),
                                          int(stuck_slices));
  if (out > 0 && K > 0 && write_penalty > 0.0) {
    const FeedbackChains ch = feedback_chains(pred, out);
    const at::Tensor pos = sorted_positions(sort_index.contiguous());
    const at::Tensor pred_d = pred.to(t.device(), /*non_blocking=*/false).contiguous();
    at::Tensor chosen = at::empty({out, K, c}, t.options().dtype(at::kByte));
    std::vector<int64_t> flat;  // the waves back to back, copied to the device once
    for (const auto& w : ch.waves) flat.insert(flat.end(), w.begin(), w.end());
    const at::Tensor waves = at::tensor(flat, at::TensorOptions().dtype(at::kLong))
                                 .to(t.device());
    // each filter's write penalty (rule 25), copied once beside the waves
    const at::Tensor lam = at::tensor(filter_penalties(write_penalty, filter_weight, out),
                                      at::TensorOptions().dtype(at::kDouble))
                               .to(t.device());
    int64_t start = 0;
    for (const auto& w : ch.waves) {
      const int64_t n = int64_t(w.size());
      feedback_wave_kernel<<<blocks_for(n), kThreads, 0, current_stream()>>>(
          t.mutable_data_ptr<double>(), t0.const_data_ptr<double>(), u.const_data_ptr<double>(),
          held.numel() ? held.const_data_ptr<bool>() : nullptr,
          levels.numel() ? levels.const_data_ptr<uint8_t>() : nullptr,
          q.mutable_data_ptr<int32_t>(), K, c, out / groups, fmt, lam.const_data_ptr<double>(),
          pos.const_data_ptr<int64_t>(), pred_d.const_data_ptr<int64_t>(),
          chosen.mutable_data_ptr<uint8_t>(), waves.const_data_ptr<int64_t>() + start, n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      start += n;
    }
    return {q, t};
  }
  if (out > 0 && K > 0) {
    feedback_kernel<<<blocks_for(out), kThreads, 0, current_stream()>>>(
        t.mutable_data_ptr<double>(), t0.const_data_ptr<double>(), u.const_data_ptr<double>(),
        held.numel() ? held.const_data_ptr<bool>() : nullptr,
        levels.numel() ? levels.const_data_ptr<uint8_t>() : nullptr,
        q.mutable_data_ptr<int32_t>(), out, K, c, out / groups, fmt);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {q, t};
}

}  // namespace

TORCH_LIBRARY_IMPL(crossbar_torch, CUDA, m) {
  m.impl("feedback_quantize", &feedback_quantize_cuda);
}

}  // namespace crossbar_torch
