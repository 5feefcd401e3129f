// feedback_refine: argument checks (see feedback_refine_args.h).
#include "feedback_refine_args.h"

#include <cmath>

#include "common.h"

namespace crossbar_torch {

int64_t check_feedback_refine(const at::Tensor& target, const at::Tensor& hs,
                              const at::Tensor& q, const at::Tensor& pred,
                              const at::Tensor& sort_index, int64_t weight_bits,
                              int64_t bits_per_cell, int64_t encoding, double write_penalty,
                              int64_t sweeps, const std::optional<at::Tensor>& filter_weight) {
  const char* op = "feedback_refine";
  check_format(weight_bits, bits_per_cell, encoding);
  const int64_t c = cells_for(weight_bits, bits_per_cell, encoding);
  check_dtype(target, at::kDouble, op, "target");
  check_dtype(hs, at::kDouble, op, "hs");
  check_dtype(q, at::kInt, op, "q");
  check_dtype(pred, at::kLong, op, "pred");
  check_dtype(sort_index, at::kLong, op, "sort_index");
  check_device(hs, target, op, "hs", "target");
  check_device(q, target, op, "q", "target");
  check_device(pred, target, op, "pred", "target");
  check_device(sort_index, target, op, "sort_index", "target");
  check_dim(target, 2, op, "target", "(out, K)");
  check_dim(hs, 3, op, "hs", "(groups, K, K)");
  check_dim(q, 2, op, "q", "(out, K)");
  check_dim(pred, 1, op, "pred", "(out,)");
  check_dim(sort_index, 2, op, "sort_index", "(out, K)");
  const int64_t out = target.size(0), K = target.size(1), groups = hs.size(0);
  TORCH_CHECK(groups >= 1, "crossbar_torch.feedback_refine: hs needs at least one group, got "
              "shape ", hs.sizes());
  TORCH_CHECK(out % groups == 0, "crossbar_torch.feedback_refine: out = ", out,
              " must be a multiple of the groups of hs = ", groups);
  check_size(hs, 1, K, op, "hs", "K = target.size(1)");
  check_size(hs, 2, K, op, "hs", "K = target.size(1)");
  check_size(q, 0, out, op, "q", "out");
  check_size(q, 1, K, op, "q", "K");
  check_size(pred, 0, out, op, "pred", "out");
  check_size(sort_index, 0, out, op, "sort_index", "out");
  check_size(sort_index, 1, K, op, "sort_index", "K");
  TORCH_CHECK(std::isfinite(write_penalty) && write_penalty >= 0.0,
              "crossbar_torch.feedback_refine: write_penalty must be a finite number >= 0, got ",
              write_penalty);
  TORCH_CHECK(sweeps >= 0 && sweeps <= 100,
              "crossbar_torch.feedback_refine: sweeps must be in [0, 100], got ", sweeps);
  check_filter_weight(filter_weight, out, op);
  return c;
}

void check_feedback_refine_values(const at::Tensor& target, const at::Tensor& hs,
                                  const at::Tensor& q, const at::Tensor& sort_index,
                                  int64_t weight_bits) {
  if (target.numel()) {
    TORCH_CHECK(all_finite(target),
                "crossbar_torch.feedback_refine: target holds NaN or Inf");
  }
  if (hs.numel()) {
    TORCH_CHECK(all_finite(hs),
                "crossbar_torch.feedback_refine: hs holds NaN or Inf");
  }
  if (q.numel()) {
    const int64_t qmax = qmax_for(weight_bits);
    auto mm = at::aminmax(q);
    const int64_t lo = std::get<0>(mm).item<int64_t>(), hi = std::get<1>(mm).item<int64_t>();
    TORCH_CHECK(lo >= -qmax && hi <= qmax, "crossbar_torch.feedback_refine: q out of the "
                "symmetric range [-", qmax, ", ", qmax, "] for weight_bits=", weight_bits,
                " (min ", lo, ", max ", hi, ")");
  }
  check_index_permutation(sort_index, "feedback_refine");
}

}  // namespace crossbar_torch
