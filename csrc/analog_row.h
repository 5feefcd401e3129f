// analog_matmul: the per-element arithmetic the CPU and CUDA kernels share (XB_HD: compiled for
// both, so the two devices run literally the same operations). Semantics: docs/semantics.md
// rules 17 (the DAC: input quantization, passes, bit-serial cycles) and 18 (column partial sums,
// the ADC, the digital shift and add); reference: crossbar_torch/ops/analog_reference.py.
//
// Planes: the digit vectors driven on the rows, one per (pass, cycle). With signed_weights
// (adc_scope "weight") a single signed plane, the quantized input itself; otherwise the
// positive pass's `cycles` planes (least significant first), then the negative pass's.
//
// Floating point: every sum is accumulated in a fixed order (the section's rows in sorted order,
// then sections / planes / cells as in the reference) and no multiply-add is fused (xb_mul /
// xb_add pin the rounding on the device, where nvcc would otherwise contract), so the CPU and
// CUDA kernels agree bit for bit.
#pragma once

#include <cmath>
#include <cstdint>

#include "common.h"

namespace crossbar_torch {

constexpr int64_t kMaxInputBits = 16;
constexpr int64_t kMaxAdcBits = 24;

struct AnalogFormat {
  int input_bits;   // I (0: ideal DAC, the real magnitudes)
  int per_cycle;    // d
  int cycles;       // m = ceil(I / d) cycles per pass (1 when I = 0)
  int planes;       // 1 (signed_weights) or 2 * cycles
  int adc_bits;     // A (0: no ADC)
  bool signed_weights;
  float input_scale;  // s_x, in float32 as the quantizer divides by it
  float top;          // 2**I - 1
  double adc_lo, adc_hi;  // the ADC's code range
  double g0;
};

inline AnalogFormat make_analog_format(int64_t input_bits, int64_t per_cycle, double input_scale,
                                       int64_t adc_bits, double g0, bool signed_weights) {
  AnalogFormat f;
  f.input_bits = int(input_bits);
  f.per_cycle = int(per_cycle);
  f.cycles = input_bits == 0 ? 1 : int((input_bits + per_cycle - 1) / per_cycle);
  f.planes = signed_weights ? 1 : 2 * f.cycles;
  f.adc_bits = int(adc_bits);
  f.signed_weights = signed_weights;
  f.input_scale = static_cast<float>(input_scale);
  f.top = static_cast<float>((int64_t(1) << input_bits) - 1);
  if (adc_bits == 0) {
    f.adc_lo = f.adc_hi = 0.0;
  } else if (signed_weights) {
    f.adc_hi = static_cast<double>((int64_t(1) << (adc_bits - 1)) - 1);
    f.adc_lo = -f.adc_hi;
  } else {
    f.adc_hi = static_cast<double>((int64_t(1) << adc_bits) - 1);
    f.adc_lo = 0.0;
  }
  f.g0 = g0;
  return f;
}

// ---- rounding-pinned arithmetic (xb_mul: common.h) -----------------------------------------

XB_HD double xb_add(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

XB_HD double xb_sub(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dsub_rn(a, b);
#else
  return a - b;
#endif
}

// Round half to even (the default rounding mode; the CPU kernel checks it).
XB_HD float xb_rint(float v) {
#if defined(__CUDA_ARCH__)
  return rintf(v);
#else
  return std::nearbyint(v);
#endif
}

XB_HD double xb_rint(double v) {
#if defined(__CUDA_ARCH__)
  return rint(v);
#else
  return std::nearbyint(v);
#endif
}

// ---- rule 17: the DAC ----------------------------------------------------------------------

// The signed quantized input xq = clamp(round_half_even(x / s_x), -(2**I - 1), 2**I - 1) in
// float32 (an integer, exact in float32 for I <= 16); I = 0: x itself. x must be finite.
XB_HD float quantize_input(float x, const AnalogFormat& f) {
  if (f.input_bits == 0) return x;
  float q = xb_rint(x / f.input_scale);
  q = q < -f.top ? -f.top : q;
  q = q > f.top ? f.top : q;
  return q;
}

// The digit plane p drives for the quantized input xq.
XB_HD double input_digit(float xq, int p, const AnalogFormat& f) {
  if (f.signed_weights) return static_cast<double>(xq);
  const bool neg = p >= f.cycles;
  const float part = neg ? (xq < 0.0f ? -xq : 0.0f) : (xq > 0.0f ? xq : 0.0f);
  if (f.input_bits == 0) return static_cast<double>(part);
  const int j = neg ? p - f.cycles : p;
  const int64_t mag = static_cast<int64_t>(part);
  return static_cast<double>((mag >> (f.per_cycle * j)) & ((int64_t(1) << f.per_cycle) - 1));
}

// Bits of |xq| (or 1 when nonzero, for I = 0 and signed planes) that make the planes of one
// pass nonzero: OR them over inputs, then plane_active tells whether a plane has any nonzero
// digit. A plane whose digits are all zero contributes exactly nothing (P = 0, ADC(0) = 0).
XB_HD void plane_bits(float xq, const AnalogFormat& f, int64_t& pos, int64_t& neg) {
  if (f.signed_weights || f.input_bits == 0) {
    pos |= xq > 0.0f ? 1 : 0;
    neg |= xq < 0.0f ? 1 : 0;
  } else {
    pos |= xq > 0.0f ? static_cast<int64_t>(xq) : 0;
    neg |= xq < 0.0f ? static_cast<int64_t>(-xq) : 0;
  }
}

XB_HD bool plane_active(int p, int64_t pos, int64_t neg, const AnalogFormat& f) {
  if (f.signed_weights) return (pos | neg) != 0;
  const bool is_neg = p >= f.cycles;
  const int64_t bits = is_neg ? neg : pos;
  if (f.input_bits == 0) return bits != 0;
  const int j = is_neg ? p - f.cycles : p;
  return ((bits >> (f.per_cycle * j)) & ((int64_t(1) << f.per_cycle) - 1)) != 0;
}

// sign * 2**(d*j) of plane p (the reference's `sign * weight`).
XB_HD double plane_weight(int p, const AnalogFormat& f) {
  if (f.signed_weights) return 1.0;
  const bool neg = p >= f.cycles;
  const int j = neg ? p - f.cycles : p;
  const double w = static_cast<double>(int64_t(1) << (f.per_cycle * j));
  return neg ? -w : w;
}

// ---- rule 18: the ADC and the shift and add ------------------------------------------------

// code = clamp(round_half_even(P / step), lo, hi); returns code * step (P itself without ADC).
XB_HD double adc_read(double P, double step, const AnalogFormat& f) {
  if (f.adc_bits == 0) return P;
  double q = xb_rint(P / step);
  q = q < f.adc_lo ? f.adc_lo : q;
  q = q > f.adc_hi ? f.adc_hi : q;
  return xb_mul(q, step);
}

// One converted partial sum's contribution: coef * (ADC(P) - g0 * dsum), with coef =
// sign * 2**(d*j) * w_i and dsum the sum of the section's digits.
XB_HD double analog_term(double P, double dsum, double step, double coef,
                         const AnalogFormat& f) {
  return xb_mul(coef, xb_sub(adc_read(P, step, f), xb_mul(f.g0, dsum)));
}

// What pmax records of a partial sum: P (|P| for signed_weights).
XB_HD double pmax_value(double P, const AnalogFormat& f) {
  return f.signed_weights ? (P < 0.0 ? -P : P) : P;
}

}  // namespace crossbar_torch
