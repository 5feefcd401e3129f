// feedback_quantize / CPU: rule 21, error-feedback programming targets. Filters (rows) are
// independent given U, so they run in parallel; each runs feedback_row (feedback_row.h), the
// arithmetic the CUDA kernel runs. With rule 23's write penalty a filter is charged against
// the cells its predecessor chose, so the chains run in parallel, each filter after its
// predecessor.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../common.h"
#include "../feedback_quantize_args.h"
#include "../feedback_row.h"

namespace crossbar_torch {
namespace {

at::Tensor feedback_quantize_cpu(const at::Tensor& target_in, const at::Tensor& u_in,
                                 const at::Tensor& held_in, const at::Tensor& levels_in,
                                 int64_t weight_bits, int64_t bits_per_cell, int64_t encoding,
                                 int64_t stuck_slices, const at::Tensor& pred,
                                 const at::Tensor& sort_index, double write_penalty) {
  TORCH_CHECK(target_in.device().is_cpu(),
              "crossbar_torch.feedback_quantize: target must be a CPU tensor here, got ",
              target_in.device());
  const int64_t c = check_feedback_quantize(target_in, u_in, held_in, levels_in, weight_bits,
                                            bits_per_cell, encoding, stuck_slices, pred,
                                            sort_index, write_penalty);
  at::Tensor t = target_in.contiguous().clone();  // running targets, updated in place
  const at::Tensor u = u_in.contiguous(), held = held_in.contiguous(),
                   levels = levels_in.contiguous();
  check_feedback_quantize_values(t, u, levels, bits_per_cell);
  const int64_t out = t.size(0), K = t.size(1), groups = u.size(0);
  at::Tensor q = at::empty({out, K}, t.options().dtype(at::kInt));
  if (out == 0 || K == 0) return q;
  const CompFormat fmt = make_comp_format(int(weight_bits), int(bits_per_cell), int(encoding),
                                          int(stuck_slices));
  double* tp = t.mutable_data_ptr<double>();
  const double* up = u.const_data_ptr<double>();
  const bool* hp = held.numel() ? held.const_data_ptr<bool>() : nullptr;
  const uint8_t* lp = levels.numel() ? levels.const_data_ptr<uint8_t>() : nullptr;
  int32_t* qp = q.mutable_data_ptr<int32_t>();
  const int64_t per_group = out / groups;
  if (write_penalty > 0.0) {
    const FeedbackChains ch = feedback_chains(pred, out);
    const at::Tensor pos = sorted_positions(sort_index.contiguous());
    const int64_t* pp = pos.const_data_ptr<int64_t>();
    // the cells each filter chose, in sorted order: its successor's reference
    at::Tensor chosen = at::empty({out, K, c}, t.options().dtype(at::kByte));
    uint8_t* cp = chosen.mutable_data_ptr<uint8_t>();
    const int64_t heads = int64_t(ch.heads.size());
    at::parallel_for(0, heads, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        int64_t prev = -1;
        for (int64_t o = ch.heads[i]; o >= 0; prev = o, o = ch.succ[o]) {
          feedback_row(tp + o * K, up + (o / per_group) * K * K, hp ? hp + o * K * c : nullptr,
                       lp ? lp + o * K * c : nullptr, K, fmt, qp + o * K, write_penalty,
                       pp + o * K, prev >= 0 ? cp + prev * K * c : nullptr, cp + o * K * c);
        }
      }
    });
    return q;
  }
  at::parallel_for(0, out, 1, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      feedback_row(tp + o * K, up + (o / per_group) * K * K, hp ? hp + o * K * c : nullptr,
                   lp ? lp + o * K * c : nullptr, K, fmt, qp + o * K);
    }
  });
  return q;
}

}  // namespace

TORCH_LIBRARY_IMPL(crossbar_torch, CPU, m) {
  m.impl("feedback_quantize", &feedback_quantize_cpu);
}

}  // namespace crossbar_torch
