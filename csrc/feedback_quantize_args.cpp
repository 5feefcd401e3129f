// feedback_quantize: argument checks (see feedback_quantize_args.h).
#include "feedback_quantize_args.h"

#include <cmath>

#include "common.h"

namespace crossbar_torch {

int64_t check_feedback_quantize(const at::Tensor& target, const at::Tensor& u,
                                const at::Tensor& held, const at::Tensor& levels,
                                int64_t weight_bits, int64_t bits_per_cell, int64_t encoding,
                                int64_t stuck_slices, const at::Tensor& pred,
                                const at::Tensor& sort_index, double write_penalty,
                                const std::optional<at::Tensor>& filter_weight) {
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
  const bool packed = held_packed(held);
  TORCH_CHECK(packed || held.scalar_type() == at::kBool, "crossbar_torch.feedback_quantize: held "
              "must be bool (out, K, c), or uint8 packed flags in sorted order, got ",
              held.scalar_type());
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
  } else if (!packed) {
    check_dim(held, 3, op, "held", "(out, K, c)");
    check_size(held, 0, out, op, "held", "out");
    check_size(held, 1, K, op, "held", "K");
    check_size(held, 2, c, op, "held", "cells per weight c");
    TORCH_CHECK(levels.sizes() == held.sizes(), "crossbar_torch.feedback_quantize: levels ",
                levels.sizes(), " must have the shape of held ", held.sizes());
  } else {  // a layer's own buffers: packed (crossbar_torch/packing.py), in sorted order
    const int s = checked_slot_bits(bits_per_cell, op);
    check_dim(held, 3, op, "held", "(out, K, ceil(c / 8)) packed");
    check_size(held, 0, out, op, "held", "out");
    check_size(held, 1, K, op, "held", "K");
    check_size(held, 2, packed_width(c, 1), op, "held", "ceil(c / 8) bytes of packed flags");
    check_dim(levels, 3, op, "levels", "(out, K, bytes) packed");
    check_size(levels, 0, out, op, "levels", "out");
    check_size(levels, 1, K, op, "levels", "K");
    check_size(levels, 2, packed_width(c, s), op, "levels", "the packed width of c cells");
    TORCH_CHECK(held.device().is_cpu(), "crossbar_torch.feedback_quantize: packed held cells "
                "are read on the host only; on ", held.device(), " give them unpacked (bool "
                "(out, K, c) and their levels, original order)");
  }
  TORCH_CHECK(std::isfinite(write_penalty) && write_penalty >= 0.0,
              "crossbar_torch.feedback_quantize: write_penalty must be a finite number >= 0, got ",
              write_penalty);
  if (write_penalty > 0.0) {
    check_dtype(pred, at::kLong, op, "pred");
    check_dim(pred, 1, op, "pred", "(out,)");
    check_size(pred, 0, out, op, "pred", "out");
  }
  if (write_penalty > 0.0 || (packed && held.numel())) {  // sorted positions are read
    check_dtype(sort_index, at::kLong, op, "sort_index");
    check_device(sort_index, target, op, "sort_index", "target");
    check_dim(sort_index, 2, op, "sort_index", "(out, K)");
    check_size(sort_index, 0, out, op, "sort_index", "out");
    check_size(sort_index, 1, K, op, "sort_index", "K");
  }
  check_filter_weight(filter_weight, out, op);
  return c;
}

std::vector<double> filter_penalties(double write_penalty,
                                     const std::optional<at::Tensor>& filter_weight,
                                     int64_t out) {
  std::vector<double> lam(size_t(out), write_penalty);
  if (filter_weight.has_value() && filter_weight->defined()) {
    const at::Tensor a = filter_weight->to(at::kCPU).contiguous();
    const double* ap = a.const_data_ptr<double>();
    for (int64_t o = 0; o < out; ++o) lam[size_t(o)] = write_penalty / ap[o];
  }
  return lam;
}

bool held_packed(const at::Tensor& held) { return held.scalar_type() == at::kByte; }

void check_feedback_quantize_values(const at::Tensor& target, const at::Tensor& u,
                                    const at::Tensor& levels, int64_t bits_per_cell,
                                    bool packed) {
  if (target.numel()) {
    TORCH_CHECK(all_finite(target),
                "crossbar_torch.feedback_quantize: target holds NaN or Inf");
  }
  if (u.numel()) {
    TORCH_CHECK(all_finite(u),
                "crossbar_torch.feedback_quantize: u holds NaN or Inf");
    TORCH_CHECK((u.diagonal(0, 1, 2) > 0).all().item<bool>(),
                "crossbar_torch.feedback_quantize: the diagonal of u must be positive (the pivots "
                "D of H + lambda I = U D U^T)");
  }
  if (!levels.numel()) return;
  if (packed) return check_packed_levels(levels, bits_per_cell, "feedback_quantize", "levels");
  check_levels(levels, bits_per_cell, "feedback_quantize", "levels");
}

FeedbackChains feedback_chains(const at::Tensor& pred_in, int64_t out, const char* op) {
  const at::Tensor pred = pred_in.to(at::kCPU).contiguous();
  const int64_t* p = pred.const_data_ptr<int64_t>();
  FeedbackChains ch;
  ch.succ.assign(out, -1);
  for (int64_t o = 0; o < out; ++o) {
    const int64_t q = p[o];
    TORCH_CHECK(q >= -1 && q < out && q != o, "crossbar_torch.", op, ": pred[", o,
                "] = ", q, " must be -1 or another filter in [0, ", out, ")");
    if (q < 0) {
      ch.heads.push_back(o);
      continue;
    }
    TORCH_CHECK(ch.succ[q] < 0, "crossbar_torch.", op, ": filter ", q,
                " is the predecessor of both ", ch.succ[q], " and ", o, " (pred must form chains)");
    ch.succ[q] = o;
  }
  int64_t reached = 0;
  for (int64_t o : ch.heads) {
    int64_t d = 0;
    for (int64_t x = o; x >= 0; x = ch.succ[x], ++d, ++reached) {
      if (int64_t(ch.waves.size()) <= d) ch.waves.emplace_back();
      ch.waves[d].push_back(x);
    }
  }
  TORCH_CHECK(reached == out, "crossbar_torch.", op, ": pred has a cycle (", out - reached,
              " filters are not reached from a filter without a predecessor)");
  return ch;
}

at::Tensor sorted_positions(const at::Tensor& sort_index) {
  return inverse_permutation(sort_index, "feedback_quantize");
}

}  // namespace crossbar_torch
