// Error-feedback programming (docs/semantics.md rule 21): the arithmetic the CPU and CUDA
// feedback_quantize kernels share (XB_HD: compiled for both, literally the same code).
//
// One filter (row of W in scale units, original input order) is quantized column by column:
// each weight takes, among the values its held cells allow, the one nearest its running target
// t; the residual (t - v) / U[k][k] is carried onto the columns not yet chosen through row k of
// U, the upper Cholesky factor of the damped inverse input second moment (GPTQ / OBQ).
#pragma once

#include <cmath>

#include "common.h"
#include "program_row.h"

namespace crossbar_torch {

// `a` is a better value than `b` for target t: nearer; ties to the even value, then the smaller.
XB_HD bool feedback_better(int64_t a, int64_t b, double t) {
  const double da = fabs(double(a) - t), db = fabs(double(b) - t);
  if (da != db) return da < db;
  const bool ea = (a & 1) == 0, eb = (b & 1) == 0;
  if (ea != eb) return ea;
  return a < b;
}

// floor / ceil of n / d for d > 0 (integer division rounding toward -inf / +inf).
XB_HD int64_t floor_div(int64_t n, int64_t d) { return n >= 0 ? n / d : -((-n + d - 1) / d); }
XB_HD int64_t ceil_div(int64_t n, int64_t d) { return -floor_div(-n, d); }

// The value nearest t that one weight can decode to (rule 21). `held` (bit i): cell i keeps
// level lv[i] (held cells lie in the low slices < L); the other cells are free. Values are
// restricted to [-qmax, qmax] when any is reachable there (with a high part, h = 0 always is),
// otherwise every decodable value competes. Enumerates the free low cells (an odometer) and,
// for each, the two high parts around (t - d) / 2**m.
XB_HD int64_t nearest_allowed(double t, const uint8_t* lv, uint32_t held, const CompFormat& f) {
  const int64_t qmax = qmax_for(f.B);
  if (!held) {  // every integer of [-qmax, qmax]: round half to even, clamp
    const double fl = floor(t);
    const double r = t - fl;
    int64_t v = int64_t(fl);
    if (r > 0.5 || (r == 0.5 && (v & 1))) v += 1;
    return v < -qmax ? -qmax : (v > qmax ? qmax : v);
  }
  uint8_t cur[kMaxCells];
  int free_cells[kMaxCells];
  int nfree = 0;
  for (int i = 0; i < f.c; ++i) {
    const bool low = slice_of(i, f.S) < f.L;
    const bool h = (held >> i) & 1u;
    cur[i] = h && low ? lv[i] : 0;  // high slices read as 0 in d(x)
    if (!h && low) free_cells[nfree++] = i;
  }
  const int64_t unit = int64_t(1) << f.m;
  const int top = (1 << f.b) - 1;
  bool found_in = false, found_any = false;
  int64_t best_in = 0, best_any = 0;
  for (;;) {
    const int64_t d = decode_one(cur, f.B, f.b, f.enc, f.S);
    const double r = (t - double(d)) / double(unit);
    const int64_t h0 = int64_t(floor(r));
    const int64_t lo = ceil_div(-qmax - d, unit), hi = floor_div(qmax - d, unit);
    for (int64_t step = 0; step < 2; ++step) {
      int64_t h = h0 + step;
      h = h < f.hmin ? f.hmin : (h > f.hmax ? f.hmax : h);
      const int64_t any = h * unit + d;
      if (!found_any || feedback_better(any, best_any, t)) best_any = any;
      found_any = true;
      const int64_t a = lo > f.hmin ? lo : f.hmin, z = hi < f.hmax ? hi : f.hmax;
      if (a <= z) {
        int64_t hin = h0 + step;
        hin = hin < a ? a : (hin > z ? z : hin);
        const int64_t v = hin * unit + d;
        if (!found_in || feedback_better(v, best_in, t)) best_in = v;
        found_in = true;
      }
    }
    int k = 0;  // next assignment of the free low cells
    while (k < nfree && cur[free_cells[k]] == top) cur[free_cells[k++]] = 0;
    if (k == nfree) break;
    cur[free_cells[k]] += 1;
  }
  return found_in ? best_in : best_any;
}

// One filter: t (K doubles, updated in place: the running targets), u (K x K, row-major, upper
// triangle read), held / lv (K x c, original order; held may be null: nothing held), out (K).
XB_HD void feedback_row(double* t, const double* u, const bool* held, const uint8_t* lv,
                        int64_t K, const CompFormat& f, int32_t* out) {
  for (int64_t k = 0; k < K; ++k) {
    uint32_t mask = 0;
    if (held) {
      for (int i = 0; i < f.c; ++i) mask |= uint32_t(held[k * f.c + i]) << i;
    }
    const int64_t v = nearest_allowed(t[k], lv ? lv + k * f.c : nullptr, mask, f);
    out[k] = int32_t(v);
    const double e = (t[k] - double(v)) / u[k * K + k];
    const double* uk = u + k * K;
    for (int64_t j = k + 1; j < K; ++j) t[j] = t[j] - xb_mul(e, uk[j]);
  }
}

}  // namespace crossbar_torch
