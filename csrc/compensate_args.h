// compensate: argument checks shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/ATen.h>

namespace crossbar_torch {

// Validates compensate's arguments from their metadata; returns the cells per weight c.
int64_t check_compensate(const at::Tensor& cells, const at::Tensor& held, const at::Tensor& old,
                         int64_t weight_bits, int64_t bits_per_cell, int64_t encoding,
                         int64_t compensate_slices);

// The levels of cells and old lie in [0, 2**bits_per_cell) (run on the contiguous copies).
void check_compensate_values(const at::Tensor& cells, const at::Tensor& old,
                             int64_t bits_per_cell);

}  // namespace crossbar_torch
