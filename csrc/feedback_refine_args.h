// feedback_refine: argument checks (rule 24's refinement sweeps; host only).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace crossbar_torch {

// Validates feedback_refine's arguments from their metadata; returns the cells per weight c.
int64_t check_feedback_refine(const at::Tensor& target, const at::Tensor& hs,
                              const at::Tensor& q, const at::Tensor& pred,
                              const at::Tensor& sort_index, int64_t weight_bits,
                              int64_t bits_per_cell, int64_t encoding, double write_penalty,
                              int64_t sweeps, const std::optional<at::Tensor>& filter_weight);

// Values, on the contiguous copies the kernel reads: finite targets and scaled moment, integers
// in [-qmax, qmax], each sort index row a permutation.
void check_feedback_refine_values(const at::Tensor& target, const at::Tensor& hs,
                                  const at::Tensor& q, const at::Tensor& sort_index,
                                  int64_t weight_bits);

}  // namespace crossbar_torch
