// feedback_quantize: argument checks shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace crossbar_torch {

// Validates feedback_quantize's arguments from their metadata; returns the cells per weight c.
int64_t check_feedback_quantize(const at::Tensor& target, const at::Tensor& u,
                                const at::Tensor& held, const at::Tensor& levels,
                                int64_t weight_bits, int64_t bits_per_cell, int64_t encoding,
                                int64_t stuck_slices, const at::Tensor& pred,
                                const at::Tensor& sort_index, double write_penalty,
                                const std::optional<at::Tensor>& filter_weight);

// Rule 25: each filter's write penalty, write_penalty / filter_weight[o] (float64 division),
// or write_penalty itself for every filter when filter_weight is absent (rule 23). Read on
// the host (the chains are too).
std::vector<double> filter_penalties(double write_penalty,
                                     const std::optional<at::Tensor>& filter_weight,
                                     int64_t out);

// Whether held / levels are a layer's own buffers (held uint8): packed flags and levels
// (crossbar_torch/packing.py) in sorted order, read through sort_index, on the host only.
// Otherwise held is bool (out, K, c) and levels uint8 (out, K, c), both in original order.
bool held_packed(const at::Tensor& held);

// Values, on the contiguous copies the kernel reads: finite targets, a finite u with a positive
// diagonal, levels in [0, 2**bits_per_cell) (packed: every slot's).
void check_feedback_quantize_values(const at::Tensor& target, const at::Tensor& u,
                                    const at::Tensor& levels, int64_t bits_per_cell,
                                    bool packed = false);

// Rule 23's chains: pred[o] is the filter whose chosen cells filter o is charged against (-1:
// none). Every filter has at most one successor and every chain starts at a filter without a
// predecessor (no cycle). `waves[d]` lists the filters at depth d of their chain: a wave needs
// only the waves before it. Checked here, on a host copy of pred.
struct FeedbackChains {
  std::vector<int64_t> succ;                // successor of each filter, -1: none
  std::vector<int64_t> heads;               // filters without a predecessor
  std::vector<std::vector<int64_t>> waves;  // filters by depth
};
// `op` names the op in the messages (feedback_refine checks the same chains).
FeedbackChains feedback_chains(const at::Tensor& pred, int64_t out,
                               const char* op = "feedback_quantize");

// inverse of each row of the sort index (a checked permutation): pos[o, index[o, p]] = p.
at::Tensor sorted_positions(const at::Tensor& sort_index);

}  // namespace crossbar_torch
