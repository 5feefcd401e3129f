// analog_matmul: argument checks shared by the CPU and CUDA kernels (docs/semantics.md rules 17
// and 18; reference: crossbar_torch/ops/analog_reference.py).
#pragma once

#include <ATen/ATen.h>

#include "analog_row.h"

namespace crossbar_torch {

struct AnalogLayout {
  int64_t N, out, c, K, groups, per_group, rows, sections;
  AnalogFormat fmt;
};

// Validates analog_matmul's arguments from their metadata and the scalars; returns the layout.
AnalogLayout check_analog_matmul(const at::Tensor& x, const at::Tensor& g,
                                 const at::Tensor& sort_index, const at::Tensor& cell_weight,
                                 const at::Tensor& adc_steps, int64_t groups, int64_t rows,
                                 int64_t input_bits, int64_t input_bits_per_cycle,
                                 double input_scale, int64_t adc_bits, double g0,
                                 double encoding_offset, bool signed_weights);

// The values (run on the contiguous copies the kernel reads): sort_index entries in [0, K),
// finite conductances and cell weights, ADC steps finite and > 0 when the ADC is on. The
// finiteness of x is checked by the kernels while they quantize it.
void check_analog_matmul_values(const at::Tensor& g, const at::Tensor& sort_index,
                                const at::Tensor& cell_weight, const at::Tensor& adc_steps,
                                int64_t adc_bits);

}  // namespace crossbar_torch
