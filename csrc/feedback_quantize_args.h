// feedback_quantize: argument checks shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/ATen.h>

namespace crossbar_torch {

// Validates feedback_quantize's arguments from their metadata; returns the cells per weight c.
int64_t check_feedback_quantize(const at::Tensor& target, const at::Tensor& u,
                                const at::Tensor& held, const at::Tensor& levels,
                                int64_t weight_bits, int64_t bits_per_cell, int64_t encoding,
                                int64_t stuck_slices);

// Values, on the contiguous copies the kernel reads: finite targets, a finite u with a positive
// diagonal, levels in [0, 2**bits_per_cell).
void check_feedback_quantize_values(const at::Tensor& target, const at::Tensor& u,
                                    const at::Tensor& levels, int64_t bits_per_cell);

}  // namespace crossbar_torch
