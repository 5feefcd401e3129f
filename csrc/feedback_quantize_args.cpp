// feedback_quantize: argument checks (see feedback_quantize_args.h).
#include "feedback_quantize_args.h"

#include "common.h"

namespace crossbar_torch {

int64_t check_feedback_quantize(const at::Tensor& target, const at::Tensor& u,
                                const at::Tensor& held, const at::Tensor& levels,
                                int64_t weight_bits, int64_t bits_per_cell, int64_t encoding,
                                int64_t stuck_slices) {
  const char* op = "feedback_quantize";
  check_format(weight_bits, bits_per_cell, encoding);
  const int64_t S = slices_for(weight_bits, bits_per_cell, encoding);
  const int64_t c = cells_for(weight_bits, bits_per_cell, encoding);
  TORCH_CHECK(stuck_slices >= 0 && stuck_slices <= S,
              "crossbar_torch.feedback_quantize: stuck_slices must be in [0, ", S, "], got ",
              stuck_slices);
  TORCH_CHECK((c / S) * stuck_slices * bits_per_cell <= 21,
              "crossbar_torch.feedback_quantize: the search over ", stuck_slices,
              " slices exceeds 21 bits per weight");
  check_dtype(target, at::kDouble, op, "target");
  check_dtype(u, at::kDouble, op, "u");
  check_dtype(held, at::kBool, op, "held");
  check_dtype(levels, at::kByte, op, "levels");
  check_device(u, target, op, "u", "target");
  check_device(held, target, op, "held", "target");
  check_device(levels, target, op, "levels", "target");
  check_dim(target, 2, op, "target", "(out, K)");
  check_dim(u, 3, op, "u", "(groups, K, K)");
  const int64_t out = target.size(0), K = target.size(1), groups = u.size(0);
  TORCH_CHECK(groups >= 1, "crossbar_torch.feedback_quantize: u needs at least one group, got "
              "shape ", u.sizes());
  TORCH_CHECK(out % groups == 0, "crossbar_torch.feedback_quantize: out = ", out,
              " must be a multiple of the groups of u = ", groups);
  check_size(u, 1, K, op, "u", "K = target.size(1)");
  check_size(u, 2, K, op, "u", "K = target.size(1)");
  if (held.numel() == 0) {
    TORCH_CHECK(levels.numel() == 0, "crossbar_torch.feedback_quantize: levels must be empty "
                "when held is empty, got shape ", levels.sizes());
  } else {
    check_dim(held, 3, op, "held", "(out, K, c)");
    check_size(held, 0, out, op, "held", "out");
    check_size(held, 1, K, op, "held", "K");
    check_size(held, 2, c, op, "held", "cells per weight c");
    TORCH_CHECK(levels.sizes() == held.sizes(), "crossbar_torch.feedback_quantize: levels ",
                levels.sizes(), " must have the shape of held ", held.sizes());
  }
  return c;
}

void check_feedback_quantize_values(const at::Tensor& target, const at::Tensor& u,
                                    const at::Tensor& levels, int64_t bits_per_cell) {
  if (target.numel()) {
    TORCH_CHECK(at::isfinite(target).all().item<bool>(),
                "crossbar_torch.feedback_quantize: target holds NaN or Inf");
  }
  if (u.numel()) {
    TORCH_CHECK(at::isfinite(u).all().item<bool>(),
                "crossbar_torch.feedback_quantize: u holds NaN or Inf");
    TORCH_CHECK((u.diagonal(0, 1, 2) > 0).all().item<bool>(),
                "crossbar_torch.feedback_quantize: the diagonal of u must be positive (an upper "
                "Cholesky factor)");
  }
  if (levels.numel()) check_levels(levels, bits_per_cell, "feedback_quantize", "levels");
}

}  // namespace crossbar_torch
