// analog_matmul: argument checks (see analog_matmul_args.h).
#include "analog_matmul_args.h"

#include <c10/util/safe_numerics.h>

#include <cmath>

#include "common.h"

namespace crossbar_torch {

namespace {

constexpr const char* kAnalogOp = "analog_matmul";

void check_on_device_of_x(const at::Tensor& t, const at::Tensor& x, const char* name) {
  check_device(t, x, kAnalogOp, name, "x");
}

}  // namespace

AnalogLayout check_analog_matmul(const at::Tensor& x, const at::Tensor& g,
                                 const at::Tensor& sort_index, const at::Tensor& cell_weight,
                                 const at::Tensor& adc_steps, int64_t groups, int64_t rows,
                                 int64_t input_bits, int64_t input_bits_per_cycle,
                                 double input_scale, int64_t adc_bits, double g0,
                                 double encoding_offset, bool signed_weights) {
  TORCH_CHECK(groups >= 1, "crossbar_torch.analog_matmul: groups must be >= 1, got ", groups);
  TORCH_CHECK(rows >= 1, "crossbar_torch.analog_matmul: rows must be >= 1, got ", rows);
  TORCH_CHECK(input_bits >= 0 && input_bits <= kMaxInputBits,
              "crossbar_torch.analog_matmul: input_bits must be in [0, ", kMaxInputBits,
              "] (0: ideal DAC), got ", input_bits);
  TORCH_CHECK(input_bits_per_cycle >= 1 && input_bits_per_cycle <= kMaxInputBits,
              "crossbar_torch.analog_matmul: input_bits_per_cycle must be in [1, ",
              kMaxInputBits, "], got ", input_bits_per_cycle);
  if (input_bits > 0) {
    // the inputs are divided by the scale in float32: it must stay finite and > 0 there
    const float s32 = static_cast<float>(input_scale);
    TORCH_CHECK(std::isfinite(input_scale) && input_scale > 0 && std::isfinite(s32) && s32 > 0,
                "crossbar_torch.analog_matmul: input_scale must be finite and > 0 (in float32, "
                "where the inputs are quantized) when input_bits > 0, got ", input_scale);
  }
  TORCH_CHECK(adc_bits >= 0 && adc_bits <= kMaxAdcBits,
              "crossbar_torch.analog_matmul: adc_bits must be in [0, ", kMaxAdcBits,
              "] (0: no ADC), got ", adc_bits);
  TORCH_CHECK(std::isfinite(g0) && g0 >= 0, "crossbar_torch.analog_matmul: g0 must be finite "
              "and >= 0, got ", g0);
  TORCH_CHECK(std::isfinite(encoding_offset), "crossbar_torch.analog_matmul: encoding_offset "
              "must be finite, got ", encoding_offset);

  check_dtype(x, at::kFloat, kAnalogOp, "x");
  check_dtype(g, at::kFloat, kAnalogOp, "g");
  check_dtype(sort_index, at::kLong, kAnalogOp, "sort_index");
  check_dtype(cell_weight, at::kDouble, kAnalogOp, "cell_weight");
  check_dtype(adc_steps, at::kDouble, kAnalogOp, "adc_steps");
  check_on_device_of_x(g, x, "g");
  check_on_device_of_x(sort_index, x, "sort_index");
  check_on_device_of_x(cell_weight, x, "cell_weight");
  check_on_device_of_x(adc_steps, x, "adc_steps");
  check_dim(x, 2, kAnalogOp, "x", "(N, groups * K)");
  check_dim(g, 3, kAnalogOp, "g", "(out, c, K)");
  check_dim(sort_index, 2, kAnalogOp, "sort_index", "(out, K)");
  check_dim(cell_weight, 1, kAnalogOp, "cell_weight", "(c,)");
  check_dim(adc_steps, 1, kAnalogOp, "adc_steps", "(c,)");

  AnalogLayout L;
  L.N = x.size(0);
  L.out = g.size(0);
  L.c = g.size(1);
  L.K = g.size(2);
  L.groups = groups;
  L.rows = rows;
  TORCH_CHECK(L.out % groups == 0, "crossbar_torch.analog_matmul: groups = ", groups,
              " must divide out = g.size(0) = ", L.out);
  L.per_group = L.out / groups;
  int64_t in_cols = 0;
  TORCH_CHECK(!c10::mul_overflows(groups, L.K, &in_cols), "crossbar_torch.analog_matmul: "
              "groups * K = ", groups, " * ", L.K, " overflows int64");
  check_size(x, 1, in_cols, kAnalogOp, "x", "groups * K = groups * g.size(2)");
  check_size(sort_index, 0, L.out, kAnalogOp, "sort_index", "out = g.size(0)");
  check_size(sort_index, 1, L.K, kAnalogOp, "sort_index", "K = g.size(2)");
  check_size(cell_weight, 0, L.c, kAnalogOp, "cell_weight", "c = g.size(1)");
  check_size(adc_steps, 0, L.c, kAnalogOp, "adc_steps", "c = g.size(1)");
  if (signed_weights) {
    TORCH_CHECK(L.c == 1, "crossbar_torch.analog_matmul: signed_weights needs one cell per "
                "weight (g.size(1) = c = 1, the signed weight), got c = ", L.c);
    TORCH_CHECK(input_bits > 0, "crossbar_torch.analog_matmul: signed_weights needs quantized "
                "inputs (input_bits > 0), got input_bits = 0");
  }
  check_output_size(L.N, L.out, kAnalogOp, "the output's N * out entries");
  L.sections = L.K == 0 ? 0 : (L.K - 1) / rows + 1;
  L.fmt = make_analog_format(input_bits, input_bits_per_cycle, input_scale, adc_bits, g0,
                             signed_weights);
  return L;
}

void check_analog_matmul_values(const at::Tensor& g, const at::Tensor& sort_index,
                                const at::Tensor& cell_weight, const at::Tensor& adc_steps,
                                int64_t adc_bits) {
  if (sort_index.numel() != 0) {
    const int64_t K = sort_index.size(1);
    auto mm = at::aminmax(sort_index);
    const int64_t lo = std::get<0>(mm).item<int64_t>();
    const int64_t hi = std::get<1>(mm).item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < K, "crossbar_torch.analog_matmul: sort_index entries must be in "
                "[0, K-1] = [0, ", K - 1, "], got min ", lo, ", max ", hi);
  }
  TORCH_CHECK(all_finite(g),
              "crossbar_torch.analog_matmul: g contains NaN or Inf; conductances must be finite");
  TORCH_CHECK(all_finite(cell_weight),
              "crossbar_torch.analog_matmul: cell_weight contains NaN or Inf; cell weights "
              "must be finite");
  if (adc_bits > 0 && adc_steps.numel() != 0) {
    TORCH_CHECK(all_finite(adc_steps),
                "crossbar_torch.analog_matmul: adc_steps contains NaN or Inf; ADC steps must be "
                "finite and > 0 when adc_bits > 0");
    TORCH_CHECK(at::gt(adc_steps, 0).all().item<bool>(),
                "crossbar_torch.analog_matmul: adc_steps must be > 0 when adc_bits > 0, got min ",
                adc_steps.min().item<double>());
  }
}

}  // namespace crossbar_torch
