// Error-feedback programming (docs/semantics.md rule 21): the arithmetic the CPU and CUDA
// feedback_quantize kernels share (XB_HD: compiled for both, literally the same code).
//
// One filter (row of W in scale units, original input order) is quantized column by column:
// each weight takes, among the values its held cells allow, the one nearest its running target
// t; its error against its own target, v - t0[k], is carried onto the columns not yet chosen
// through row k of U, the unit upper triangular factor of the damped input second moment
// H + lambda I = U D U^T (GPTQ / OBQ in the form of Babai's nearest plane: the same choices
// as carrying (t - v) / R[k][k] through the upper Cholesky factor R of the inverse, without
// inverting anything).
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

// The best candidates so far of nearest_allowed: within [-qmax, qmax] (in) and among every
// decodable value (any).
struct NearestSoFar {
  bool found_in = false, found_any = false;
  int64_t best_in = 0, best_any = 0;
  XB_HD int64_t value() const { return found_in ? best_in : best_any; }
};

// The high parts h that keep h * 2**m + d in [-qmax, qmax] (before the high slices' range):
// [lo, hi], the ceiling and floor of (-qmax - d) / 2**m and (qmax - d) / 2**m, as shifts.
XB_HD void in_range_highs(int64_t d, const CompFormat& f, int64_t& lo, int64_t& hi) {
  const int64_t qmax = qmax_for(f.B);
  lo = -((qmax + d) >> f.m);
  hi = (qmax - d) >> f.m;
}

// nearest_allowed's step for one assignment of the low cells, which decode to d: the two high
// parts around (t - d) / 2**m, each clamped to the range of the high slices (any) and, when
// some are, to those that keep the value in [-qmax, qmax] (in).
// The unit is a power of two, so its divisions are shifts and a scaling (the same results:
// an arithmetic shift right is the floor of the quotient, and x / 2**m and x * 2**-m are both
// x * 2**-m rounded once), where dividing took most of a weight's time on the CPU.
XB_HD void nearest_with_low(double t, int64_t d, const CompFormat& f, NearestSoFar& s) {
  const int64_t unit = int64_t(1) << f.m;
  const double r = (t - double(d)) * f.inv_unit;
  const int64_t h0 = int64_t(floor(r));
  int64_t lo, hi;
  in_range_highs(d, f, lo, hi);
  for (int64_t step = 0; step < 2; ++step) {
    int64_t h = h0 + step;
    h = h < f.hmin ? f.hmin : (h > f.hmax ? f.hmax : h);
    const int64_t any = h * unit + d;
    if (!s.found_any || feedback_better(any, s.best_any, t)) s.best_any = any;
    s.found_any = true;
    const int64_t a = lo > f.hmin ? lo : f.hmin, z = hi < f.hmax ? hi : f.hmax;
    if (a <= z) {
      int64_t hin = h0 + step;
      hin = hin < a ? a : (hin > z ? z : hin);
      const int64_t v = hin * unit + d;
      if (!s.found_in || feedback_better(v, s.best_in, t)) s.best_in = v;
      s.found_in = true;
    }
  }
}

// The low cells of one weight with held cells (held != 0) as nearest_allowed starts them: held
// low cells at their level, the others 0 (high slices read as 0 in d(x)); `free_cells` gets
// the free low cells (nearest_allowed's odometer). Returns their number.
XB_HD int held_low_cells(const uint8_t* lv, uint32_t held, const CompFormat& f, uint8_t* cur,
                         int* free_cells) {
  int nfree = 0;
  for (int i = 0; i < f.c; ++i) {
    const bool low = (f.low >> i) & 1u;  // slice_of's division, once per call (make_comp_format)
    const bool h = (held >> i) & 1u;
    cur[i] = h && low ? lv[i] : 0;
    if (!h && low) free_cells[nfree++] = i;
  }
  return nfree;
}

// The value nearest t that one weight can decode to (rule 21). `held` (bit i): cell i keeps
// level lv[i] (held cells lie in the low slices < L); the other cells are free. Values are
// restricted to [-qmax, qmax] when any is reachable there (with a high part, h = 0 always is),
// otherwise every decodable value competes. Enumerates the free low cells (an odometer) and,
// for each, the two high parts around (t - d) / 2**m (nearest_with_low). A weight whose low
// cells are all held has one assignment: the CPU kernel decodes it once, before the weight's
// target is known, and calls nearest_with_low alone (the same operations).
XB_HD int64_t nearest_allowed(double t, const uint8_t* lv, uint32_t held, const CompFormat& f) {
  if (!held) {  // every integer of [-qmax, qmax]: round half to even, clamp
    const int64_t qmax = qmax_for(f.B);
    const double fl = floor(t);
    const double r = t - fl;
    int64_t v = int64_t(fl);
    if (r > 0.5 || (r == 0.5 && (v & 1))) v += 1;
    return v < -qmax ? -qmax : (v > qmax ? qmax : v);
  }
  uint8_t cur[kMaxCells];
  int free_cells[kMaxCells];
  const int nfree = held_low_cells(lv, held, f, cur, free_cells);
  const int top = (1 << f.b) - 1;
  NearestSoFar s;
  for (;;) {
    nearest_with_low(t, decode_one(cur, f.B, f.b, f.enc, f.S), f, s);
    int k = 0;  // next assignment of the free low cells
    while (k < nfree && cur[free_cells[k]] == top) cur[free_cells[k++]] = 0;
    if (k == nfree) break;
    cur[free_cells[k]] += 1;
  }
  return s.value();
}

// Rule 23 (write-aware feedback): the cost of value v reached with candidate cells `cand`:
// (t - v)^2 + lambda * (cells not held whose level differs from `ref`), each product rounded on
// its own. Without a reference every candidate writes nothing.
XB_HD double write_aware_cost(double t, int64_t v, const uint8_t* cand, uint32_t held,
                              const uint8_t* ref, double lambda, int c) {
  const double e = t - double(v);
  int64_t w = 0;
  if (ref) {
    for (int i = 0; i < c; ++i) w += !((held >> i) & 1u) && cand[i] != ref[i];
  }
  return xb_mul(e, e) + xb_mul(lambda, double(w));
}

// Rule 23: among every allowed value v of rule 21 and every way its cells can reach it (the free
// low cells x, the high part h; a weight without held cells has only its rule-3 encoding), the
// one with the smallest write_aware_cost; ties: nearer t, the even value, the smaller value,
// then the smaller x. Writes into `cells` the chosen levels (held cells at `lv`). Only values
// within sqrt(cost of the nearest value with every cell written) of t can win, so the high
// parts are enumerated in that window (widened by one on each side).
XB_HD int64_t write_aware_allowed(double t, const uint8_t* lv, uint32_t held, const uint8_t* ref,
                                  double lambda, const CompFormat& f, uint8_t* cells) {
  const int64_t qmax = qmax_for(f.B);
  const int64_t v0 = nearest_allowed(t, lv, held, f);
  const bool in_range = v0 >= -qmax && v0 <= qmax;  // rule 21's restriction applies
  const double e0 = t - double(v0);
  const double r = sqrt(xb_mul(e0, e0) + xb_mul(lambda, double(f.c)));
  uint8_t cand[kMaxCells];
  bool found = false;
  double best_cost = 0.0;
  int64_t best_v = 0;
  if (!held) {
    int64_t lo = int64_t(floor(t - r)) - 1, hi = int64_t(ceil(t + r)) + 1;
    lo = lo < -qmax ? -qmax : lo;
    hi = hi > qmax ? qmax : hi;
    for (int64_t v = lo; v <= hi; ++v) {
      encode_one(v, f.B, f.b, f.enc, f.S, cand);
      const double cost = write_aware_cost(t, v, cand, 0u, ref, lambda, f.c);
      if (!found || cost < best_cost || (cost == best_cost && feedback_better(v, best_v, t))) {
        found = true;
        best_cost = cost;
        best_v = v;
        for (int i = 0; i < f.c; ++i) cells[i] = cand[i];
      }
    }
    return best_v;
  }
  uint8_t cur[kMaxCells];
  int free_cells[kMaxCells];
  const int nfree = held_low_cells(lv, held, f, cur, free_cells);
  const int64_t unit = int64_t(1) << f.m;
  const int top = (1 << f.b) - 1;
  for (;;) {
    const int64_t d = decode_one(cur, f.B, f.b, f.enc, f.S);
    int64_t lo = int64_t(floor((t - r - double(d)) * f.inv_unit)) - 1;
    int64_t hi = int64_t(ceil((t + r - double(d)) * f.inv_unit)) + 1;
    lo = lo < f.hmin ? f.hmin : lo;
    hi = hi > f.hmax ? f.hmax : hi;
    if (in_range) {
      int64_t a, z;
      in_range_highs(d, f, a, z);
      lo = lo < a ? a : lo;
      hi = hi > z ? z : hi;
    }
    for (int64_t h = lo; h <= hi; ++h) {
      const int64_t v = h * unit + d;
      for (int i = 0; i < f.c; ++i) cand[i] = cur[i];
      encode_high(h, f, cand);
      const double cost = write_aware_cost(t, v, cand, held, ref, lambda, f.c);
      if (!found || cost < best_cost || (cost == best_cost && feedback_better(v, best_v, t))) {
        found = true;
        best_cost = cost;
        best_v = v;
        for (int i = 0; i < f.c; ++i) cells[i] = cand[i];
      }
    }
    int k = 0;  // next assignment of the free low cells
    while (k < nfree && cur[free_cells[k]] == top) cur[free_cells[k++]] = 0;
    if (k == nfree) break;
    cur[free_cells[k]] += 1;
  }
  return best_v;
}

// One weight: the value it takes (rule 21, or rule 23 with `chosen`), from its running target
// tk. `mask` (bit i: cell i held) and `lk` (its c levels; may be null when nothing is held);
// rule 23: `p` its sorted position, ref / chosen as in feedback_row.
XB_HD int64_t feedback_pick_weight(double tk, uint32_t mask, const uint8_t* lk,
                                   const CompFormat& f, double lambda, int64_t p,
                                   const uint8_t* ref, uint8_t* chosen) {
  if (chosen) {
    return write_aware_allowed(tk, lk, mask, ref ? ref + p * f.c : nullptr, lambda, f,
                               chosen + p * f.c);
  }
  return nearest_allowed(tk, lk, mask, f);
}

// Weight k of one filter (feedback_pick_weight). held / lv: the filter's (K x c, original
// order; held may be null); rule 23: pos / ref / chosen as in feedback_row.
XB_HD int64_t feedback_pick(double tk, int64_t k, const bool* held, const uint8_t* lv,
                            const CompFormat& f, double lambda, const int64_t* pos,
                            const uint8_t* ref, uint8_t* chosen) {
  uint32_t mask = 0;
  if (held) {
    for (int i = 0; i < f.c; ++i) mask |= uint32_t(held[k * f.c + i]) << i;
  }
  return feedback_pick_weight(tk, mask, lv ? lv + k * f.c : nullptr, f, lambda,
                              chosen ? pos[k] : 0, ref, chosen);
}

// One filter: t (K doubles, updated in place: the running targets), t0 (K doubles: the
// targets before any carry), u (K x K, row-major, strictly upper triangle read), held / lv
// (K x c, original order; held may be null: nothing held), out (K).
// Rule 23 (lambda > 0): `pos[k]` is weight k's sorted position; `ref` (K x c, sorted order) the
// cells the filter's predecessor chose (null: none); the chosen cells go to `chosen` (K x c,
// sorted order) for the filter's successor. (The CPU kernel runs the same steps for a few
// filters at once: feedback_rows in cpu/feedback_quantize_kernel.cpp.)
XB_HD void feedback_row(double* t, const double* t0, const double* u, const bool* held,
                        const uint8_t* lv, int64_t K, const CompFormat& f, int32_t* out,
                        double lambda = 0.0,
                        const int64_t* pos = nullptr, const uint8_t* ref = nullptr,
                        uint8_t* chosen = nullptr) {
  for (int64_t k = 0; k < K; ++k) {
    const int64_t v = feedback_pick(t[k], k, held, lv, f, lambda, pos, ref, chosen);
    out[k] = int32_t(v);
    const double e = double(v) - t0[k];
    const double* uk = u + k * K;
    for (int64_t j = k + 1; j < K; ++j) t[j] = t[j] - xb_mul(e, uk[j]);
  }
}

}  // namespace crossbar_torch
