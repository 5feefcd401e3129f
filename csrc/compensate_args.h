// compensate: argument checks shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/ATen.h>

namespace crossbar_torch {

// Validates compensate's arguments; returns the cells per weight c.
int64_t check_compensate(const at::Tensor& cells, const at::Tensor& held, const at::Tensor& old,
                         int64_t weight_bits, int64_t bits_per_cell, int64_t encoding,
                         int64_t compensate_slices);

}  // namespace crossbar_torch
