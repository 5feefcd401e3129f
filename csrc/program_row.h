// Programming one tile row: the arithmetic the CPU and CUDA program_layer kernels share
// (XB_HD: compiled for both, so the two devices run literally the same code).
//
// A tile row is row r of one tile (section s, column block j) on crossbar x: slot f of the
// block holds filter filter_index[j*F + f] (-1: unused slot, its cells are don't care), its
// cells sit in columns f*c .. f*c + c - 1, and the row holds sorted position k' = s*rows + r.
// Semantics: docs/semantics.md rules 5 to 13; reference: crossbar_torch/ops/reference.py.
#pragma once

#include <cstring>

#include "common.h"

namespace crossbar_torch {

constexpr uint8_t kNotPinned = 255;  // `pinned` level meaning "no level known for this cell"
constexpr int kMaxCells = 32;        // cells per weight: 2 * ceil(15 / 1) = 30 at most

// ---- rule 13: stuck-aware compensation of one weight -----------------------------------------

struct CompFormat {
  int B, b, enc, S, c, L, m;  // m = L*b: the weight of the high part is 2**m
  int64_t hmin, hmax;         // integers the high slices (>= L) can hold
  int hbits;                  // bits of the high part (0: no high slices)
  double inv_unit;            // 2**-m (exact): a division by 2**m as a multiplication
  uint32_t low;               // bit i: cell i lies in a low slice (slice_of(i, S) < L)
};

XB_HD CompFormat make_comp_format(int B, int b, int enc, int L) {
  CompFormat f;
  f.B = B;
  f.b = b;
  f.enc = enc;
  f.S = int(slices_for(B, b, enc));
  f.c = int(cells_for(B, b, enc));
  f.L = L < f.S ? L : f.S;
  f.m = f.L * b;
  f.inv_unit = 1.0 / double(int64_t(1) << f.m);
  f.low = 0;
  for (int i = 0; i < f.c; ++i) f.low |= uint32_t(i % f.S < f.L) << i;  // slice_of
  const int stored = enc == kDifferential ? B - 1 : B;
  f.hbits = f.L < f.S ? stored - f.m : 0;
  if (f.hbits <= 0) {
    f.hbits = 0;
    f.hmin = f.hmax = 0;
  } else if (enc == kDifferential) {
    f.hmax = (int64_t(1) << f.hbits) - 1;
    f.hmin = -f.hmax;
  } else if (enc == kTwosComplement) {
    f.hmax = (int64_t(1) << (f.hbits - 1)) - 1;
    f.hmin = -(int64_t(1) << (f.hbits - 1));
  } else {
    f.hmin = 0;
    f.hmax = (int64_t(1) << f.hbits) - 1;
  }
  return f;
}

XB_HD int slice_of(int cell, int S) { return cell % S; }

// The representable high part nearest v / 2**m, exact ties to the even integer.
XB_HD int64_t nearest_high(int64_t v, const CompFormat& f) {
  if (f.hbits == 0) return 0;
  const int64_t unit = int64_t(1) << f.m;
  const int64_t fl = v >> f.m;       // floor(v / unit): arithmetic shift
  const int64_t rem = v & (unit - 1);  // in [0, unit)
  int64_t h = fl;
  if (2 * rem > unit || (2 * rem == unit && (fl & 1))) h = fl + 1;
  return h < f.hmin ? f.hmin : (h > f.hmax ? f.hmax : h);
}

// Levels of the high slices (>= L) holding the rule-3 encoding of h; low slices untouched.
XB_HD void encode_high(int64_t h, const CompFormat& f, uint8_t* lv) {
  const int64_t mask = (int64_t(1) << f.b) - 1;
  if (f.enc == kDifferential) {
    const int64_t pos = h > 0 ? h : 0, neg = h < 0 ? -h : 0;
    for (int i = f.L; i < f.S; ++i) {
      lv[i] = uint8_t((pos >> ((i - f.L) * f.b)) & mask);
      lv[f.S + i] = uint8_t((neg >> ((i - f.L) * f.b)) & mask);
    }
  } else {
    const int64_t word =
        f.enc == kTwosComplement ? (h & ((int64_t(1) << f.hbits) - 1)) : h;
    for (int i = f.L; i < f.S; ++i) lv[i] = uint8_t((word >> ((i - f.L) * f.b)) & mask);
  }
}

// Rule 13 for one weight with at least one held cell. `old`: the levels its c cells hold now;
// `fixed` (bit i): cell i takes no search level (held, or pinned to a known stuck level);
// `fixed_lv`: the level a fixed cell ends with. Writes into `out` the levels that make the
// weight decode closest to q; ties: fewest cells changed, then the smallest x (free low cells
// as digits, the first free cell least significant). Enumerates x in increasing order (an
// odometer, first free cell fastest), the high part in closed form. d(x) is linear in the
// levels (each cell weighs +-2**(slice*b)) except for two's complement with every slice low,
// whose top bit weighs negatively: that case decodes each x in full.
XB_HD void compensate_weight(int64_t q, const uint8_t* old, uint32_t fixed, const uint8_t* fixed_lv,
                             const CompFormat& f, uint8_t* out) {
  uint8_t cur[kMaxCells], hi[kMaxCells];
  int free_cells[kMaxCells];
  int64_t coef[kMaxCells];
  int nfree = 0;
  for (int i = 0; i < f.c; ++i) {
    const bool low = slice_of(i, f.S) < f.L;
    cur[i] = ((fixed >> i) & 1u) && low ? fixed_lv[i] : 0;  // high slices read as 0 in d(x)
    if (!((fixed >> i) & 1u) && low) {
      coef[nfree] = (f.enc == kDifferential && i >= f.S ? -1 : 1) * (int64_t(1) << (slice_of(i, f.S) * f.b));
      free_cells[nfree++] = i;
    }
  }
  const bool linear = !(f.enc == kTwosComplement && f.hbits == 0);
  const int64_t unit = int64_t(1) << f.m;
  const int top = (1 << f.b) - 1;
  int64_t d = decode_one(cur, f.B, f.b, f.enc, f.S);
  int64_t low_writes = 0;  // free low cells whose level differs from `old`
  for (int k = 0; k < nfree; ++k) low_writes += cur[free_cells[k]] != old[free_cells[k]];
  int high_cells[kMaxCells];
  int nhigh = 0;
  for (int i = 0; i < f.c; ++i) {
    if (slice_of(i, f.S) >= f.L) high_cells[nhigh++] = i;
  }
  int64_t best_err = -1, best_writes = 0, best_h = 0;
  uint8_t best[kMaxCells];
  for (int i = 0; i < f.c; ++i) best[i] = cur[i];
  for (;;) {
    if (!linear) d = decode_one(cur, f.B, f.b, f.enc, f.S);
    const int64_t h = nearest_high(q - d, f);
    const int64_t val = h * unit + d;
    const int64_t err = val > q ? val - q : q - val;
    if (best_err < 0 || err <= best_err) {
      // the high cells' writes only matter against an equal error: count them lazily
      int64_t writes = low_writes;
      encode_high(h, f, hi);
      for (int k = 0; k < nhigh; ++k) writes += hi[high_cells[k]] != old[high_cells[k]];
      if (best_err < 0 || err < best_err || writes < best_writes) {
        best_err = err;
        best_writes = writes;
        best_h = h;
        for (int k = 0; k < nfree; ++k) best[free_cells[k]] = cur[free_cells[k]];
      }
    }
    int k = 0;  // next x
    while (k < nfree && cur[free_cells[k]] == top) {
      const int i = free_cells[k];
      low_writes += (0 != old[i]) - (top != old[i]);
      d -= coef[k] * top;
      cur[i] = 0;
      ++k;
    }
    if (k == nfree) break;
    const int i = free_cells[k];
    low_writes += (cur[i] + 1 != old[i]) - (cur[i] != old[i]);
    d += coef[k];
    cur[i] += 1;
  }
  for (int i = 0; i < f.c; ++i) {
    out[i] = ((fixed >> i) & 1u) ? fixed_lv[i] : best[i];
  }
  encode_high(best_h, f, out);
}

// ---- rule 13 by table: the same result, looked up ---------------------------------------------
//
// Where d(x) is linear, the search's outcome depends on a weight only through which low cells
// are free, through q' = q - d0 (d0: d with every free cell at 0, the fixed low cells at their
// levels, the high slices read as 0; for offset it holds the encoding's constant), and, for the
// write tie-break alone, through the levels its free low and high cells hold now:
// |h * 2**m + d0 + dfree(x) - q| = |h * 2**m + dfree(x) - q'| with h = nearest_high(q' - dfree).
// So for every (free set, q') the assignments of minimal error are listed once, in increasing x,
// with the levels they give the free low cells and the high cells; a weight then takes the
// first of them with the fewest writes, which is what the enumeration keeps (it replaces the
// best only on a strictly smaller error, or an equal error and strictly fewer writes).
// Levels travel as bit planes over a weight's c <= 32 cells: bit i of plane p is bit p of cell i.
struct CompTable {
  const int32_t* start;   // (2**n_low * span + 1): key k's candidates are [start[k], start[k+1])
  const uint32_t* cand;   // planes masks per candidate: levels of the free low and high cells
  int64_t qlo, span;      // keys cover q' in [qlo, qlo + span); others are searched directly
  int n_low;              // cells in slices < L (the free-set index has one bit per low cell)
  uint32_t low_mask, high_mask;  // cells in slices < L, and in slices >= L
};

XB_HD uint32_t low_cells_mask(const CompFormat& f) {
  const uint32_t lo = (uint32_t(1) << f.L) - 1u;
  return f.enc == kDifferential ? lo | (lo << f.S) : lo;
}

// Free low cells (a cell mask) as a dense index: low cells of the first array, then the second.
XB_HD uint32_t low_index(uint32_t cells, const CompFormat& f) {
  const uint32_t lo = (uint32_t(1) << f.L) - 1u;
  return f.enc == kDifferential ? (cells & lo) | (((cells >> f.S) & lo) << f.L) : cells & lo;
}

// sum_i level_i * 2**(i*b) over cells first .. first + S - 1, levels as bit planes.
XB_HD int64_t array_value(const uint32_t* pm, int b, int first, int S) {
  const uint32_t sm = (uint32_t(1) << S) - 1u;
  if (b == 1) return int64_t((pm[0] >> first) & sm);
  int64_t w = 0;
  for (int p = 0; p < b; ++p) {
    for (uint64_t m = (pm[p] >> first) & sm; m; m &= m - 1) w += int64_t(1) << (ctz64(m) * b + p);
  }
  return w;
}

// decode_one on bit planes (the same int32 result).
XB_HD int32_t decode_planes(const uint32_t* pm, const CompFormat& f) {
  int64_t q;
  if (f.enc == kDifferential) {
    q = array_value(pm, f.b, 0, f.S) - array_value(pm, f.b, f.S, f.S);
  } else {
    const int64_t w = array_value(pm, f.b, 0, f.S);
    q = f.enc == kTwosComplement ? w - 2 * (w & (int64_t(1) << (f.B - 1)))
                                 : w - qmax_for(f.B);
  }
  return static_cast<int32_t>(static_cast<uint32_t>(static_cast<uint64_t>(q)));
}

// decode_planes for one-bit cells: the plane is the weight's bits.
XB_HD int32_t decode_planes_1bit(uint32_t m, const CompFormat& f) {
  const uint32_t sm = (uint32_t(1) << f.S) - 1u;
  int64_t q;
  if (f.enc == kDifferential) {
    q = int64_t(m & sm) - int64_t((m >> f.S) & sm);
  } else {
    const int64_t w = m & sm;
    q = f.enc == kTwosComplement ? w - 2 * (w & (int64_t(1) << (f.B - 1))) : w - qmax_for(f.B);
  }
  return static_cast<int32_t>(static_cast<uint32_t>(static_cast<uint64_t>(q)));
}

// Rule 13 for one weight from the table: as compensate_weight, on bit planes (`old`, `fixed_lv`,
// `out`: planes masks; `fixed_lv` only read on fixed cells). Returns false, touching nothing,
// when q' lies outside the table (the caller then searches directly).
template <int kPlanes = 0>  // 1: one-bit cells, the planes loops unrolled; 0: f.b planes
XB_HD bool compensate_by_table(const CompTable& t, int64_t q, const uint32_t* old, uint32_t fixed,
                               const uint32_t* fixed_lv, const CompFormat& f, uint32_t* out) {
  const int planes = kPlanes ? kPlanes : f.b;
  const uint32_t fixed_low = fixed & t.low_mask;
  uint32_t base[kMaxPlanes];  // fixed low cells at their levels, every other cell 0
  for (int p = 0; p < planes; ++p) base[p] = fixed_lv[p] & fixed_low;
  const int64_t d0 = kPlanes == 1 ? decode_planes_1bit(base[0], f) : decode_planes(base, f);
  const int64_t key_q = q - d0 - t.qlo;
  if (key_q < 0 || key_q >= t.span) return false;
  const uint32_t searched = (t.low_mask & ~fixed) | t.high_mask;  // cells the writes count
  const int64_t key = int64_t(low_index(t.low_mask & ~fixed, f)) * t.span + key_q;
  const uint32_t* cand = t.cand + int64_t(t.start[key]) * planes;
  const int n = t.start[key + 1] - t.start[key];
  int best = 0, best_writes = kMaxCells + 1;
  for (int k = 0; k < n; ++k) {
    uint32_t diff = 0;
    for (int p = 0; p < planes; ++p) diff |= cand[k * planes + p] ^ old[p];
    const int writes = popcount64(diff & searched);
    if (writes < best_writes) {
      best_writes = writes;
      best = k;
    }
  }
  for (int p = 0; p < planes; ++p) out[p] = base[p] | cand[best * planes + p];
  return true;
}

// One weight of the compensate op: held cells keep `old`; with `on` and a held cell, rule 13
// against the value the plain target `cells` encode (from `table` where it covers the key);
// otherwise the plain target.
XB_HD void compensate_one_weight(const uint8_t* cells, const bool* held, const uint8_t* old,
                                 const CompFormat& f, bool on, uint8_t* out,
                                 const CompTable* table = nullptr) {
  uint32_t fixed = 0;
  for (int i = 0; i < f.c; ++i) fixed |= uint32_t(held[i]) << i;
  if (!on || !fixed) {
    for (int i = 0; i < f.c; ++i) out[i] = held[i] ? old[i] : cells[i];
    return;
  }
  if (table != nullptr) {
    uint32_t old_pm[kMaxPlanes], cells_pm[kMaxPlanes], out_pm[kMaxPlanes];
    for (int p = 0; p < f.b; ++p) {
      old_pm[p] = cells_pm[p] = 0;
      for (int i = 0; i < f.c; ++i) {
        old_pm[p] |= uint32_t((old[i] >> p) & 1) << i;
        cells_pm[p] |= uint32_t((cells[i] >> p) & 1) << i;
      }
    }
    if (compensate_by_table(*table, decode_planes(cells_pm, f), old_pm, fixed, old_pm, f,
                            out_pm)) {
      for (int i = 0; i < f.c; ++i) {
        uint8_t v = 0;
        for (int p = 0; p < f.b; ++p) v |= uint8_t(((out_pm[p] >> i) & 1u) << p);
        out[i] = v;
      }
      return;
    }
  }
  compensate_weight(decode_one(cells, f.B, f.b, f.enc, f.S), old, fixed, old, f, out);
}

// ---- one tile row ------------------------------------------------------------------------------

struct TileRowArgs {
  // layer
  const uint8_t* cells;     // targets (out, K, c): plain rule-3 encoding of q
  const uint8_t* pinned;    // (out, K, c) known stuck levels, kNotPinned elsewhere; or null
  uint8_t* eff;             // (out, K, c) what the cells hold after programming
  const int64_t* slot_filter;  // this block's F slots: filter or -1
  int64_t K, c, kp;
  // crossbar row
  uint64_t* state;           // planes x words
  uint64_t* written;         // words
  const uint64_t* stuck;     // words
  int32_t* cell_writes;      // cols, or null
  const uint64_t* covered;   // words: columns of used slots
  const uint64_t* slice_mask;  // nsl x words
  int64_t words, nw, nsl;
  int planes;
  bool stuck_initial;
  int comp_slices;  // rule 13 over slices < comp_slices (0: off)
  CompFormat fmt;
  const CompTable* table = nullptr;  // rule 13 by table where it covers the key; null: search
  // scratch: packed targets of the row (planes x words) as the tile asks them (`plain`) and as
  // programmed (`target`, may be the same buffer when nothing changes them), and `allowed`
  uint64_t* plain;
  uint64_t* target;
  uint64_t* allowed;
};

XB_HD uint8_t level_at(const uint64_t* planes_, int64_t words, int planes, int64_t col) {
  uint8_t v = 0;
  for (int p = 0; p < planes; ++p) v |= uint8_t(((planes_[p * words + (col >> 6)] >> (col & 63)) & 1) << p);
  return v;
}

// Bits [col, col + n) of a packed plane, n <= 32 (a weight's cells, one plane).
XB_HD uint64_t bits_at(const uint64_t* plane, int64_t col, int n) {
  const int64_t w = col >> 6;
  const int sh = int(col & 63);
  uint64_t v = plane[w] >> sh;
  if (sh + n > 64) v |= plane[w + 1] << (64 - sh);
  return v & ((uint64_t(1) << n) - 1);
}

XB_HD void put_bits(uint64_t* plane, int64_t col, int n, uint64_t v) {
  const int64_t w = col >> 6;
  const int sh = int(col & 63);
  const uint64_t mask = (uint64_t(1) << n) - 1;
  plane[w] = (plane[w] & ~(mask << sh)) | (v << sh);
  if (sh + n > 64) {
    const int hi = 64 - sh;
    plane[w + 1] = (plane[w + 1] & ~(mask >> hi)) | (v >> hi);
  }
}

XB_HD void set_level_at(uint64_t* planes_, int64_t words, int planes, int64_t col, uint8_t v) {
  const uint64_t bit = uint64_t(1) << (col & 63);
  for (int p = 0; p < planes; ++p) {
    uint64_t& w = planes_[p * words + (col >> 6)];
    w = ((v >> p) & 1) ? (w | bit) : (w & ~bit);
  }
}

// Packs the plain target levels of a tile row (scalar; the CPU kernel has a SIMD twin).
XB_HD void pack_row_targets(const TileRowArgs& a, int64_t F, uint64_t* out) {
  for (int64_t i = 0; i < a.planes * a.words; ++i) out[i] = 0;
  for (int64_t f = 0; f < F; ++f) {
    const int64_t o = a.slot_filter[f];
    if (o < 0) continue;
    const uint8_t* src = a.cells + (o * a.K + a.kp) * a.c;
    for (int64_t i = 0; i < a.c; ++i) {
      const int64_t col = f * a.c + i;
      for (int p = 0; p < a.planes; ++p) {
        out[p * a.words + (col >> 6)] |= uint64_t((src[i] >> p) & 1) << (col & 63);
      }
    }
  }
}

// Calls fn(slot, col0) once for every slot (columns col0 .. col0 + c - 1) holding a set bit of
// word_mask(w), w < nw, in increasing order: the slot is found by stepping over whole slots (no
// division per bit), and the slot's other bits, in this word or the next, are skipped.
template <class WordMask, class Fn>
XB_HD void for_each_slot(int64_t nw, int64_t c, const WordMask& word_mask, const Fn& fn) {
  int64_t slot = 0, col0 = 0;
  int64_t done = 0;  // columns before `done` lie in slots already visited
  for (int64_t w = 0; w < nw; ++w) {
    uint64_t m = word_mask(w);
    for (;;) {
      const int64_t skip = done - w * 64;  // bits of this word already visited
      if (skip >= 64) m = 0;
      else if (skip > 0) m &= ~((uint64_t(1) << skip) - 1);
      if (!m) break;
      const int64_t col = w * 64 + ctz64(m);
      while (col >= col0 + c) {
        ++slot;
        col0 += c;
      }
      fn(slot, col0);
      done = col0 + c;
    }
  }
}

// Bits 0..7 of x as 8 bytes of 0 / 1, bit i in byte i (little end first, as x86 and CUDA are).
XB_HD uint64_t bits_to_bytes(uint64_t x) {
  const uint64_t ones = 0x0101010101010101ULL;
  const uint64_t y = ((x & 0xFF) * ones) & 0x8040201008040201ULL;  // byte i: bit i of x, in place
  return ((y + 0x7F7F7F7F7F7F7F7FULL) >> 7) & ones;                // byte i: 0 or 1
}

// The levels of a weight's c cells, from bit planes, into bytes.
template <int kPlanes>
XB_HD void planes_to_levels(const uint32_t* pm, int planes, int c, uint8_t* out) {
  if (kPlanes == 1 && c >= 8) {  // whole bytes: 8 cells at a time, the last 8 overlapping
    for (int i = 0; i + 8 <= c; i += 8) {
      const uint64_t v = bits_to_bytes(pm[0] >> i);
      memcpy(out + i, &v, 8);
    }
    if (c % 8) {
      const uint64_t v = bits_to_bytes(pm[0] >> (c - 8));
      memcpy(out + c - 8, &v, 8);
    }
    return;
  }
  for (int i = 0; i < c; ++i) {
    uint8_t v = 0;
    for (int p = 0; p < planes; ++p) v |= uint8_t(((pm[p] >> i) & 1u) << p);
    out[i] = v;
  }
}

// Rule 13 for the weight in the slot whose first column is col0 (filter o; it has a held cell):
// its levels now (state), held and pinned cells and plain target are read from the row, the
// levels chosen go into `target`.
template <int kPlanes>  // 1: one-bit cells, the planes loops unrolled; 0: a.planes
XB_HD void compensate_slot(const TileRowArgs& a, int64_t o, int64_t col0, bool pin) {
  const int c = int(a.c), planes = kPlanes ? kPlanes : a.planes;
  const int64_t words = a.words;
  const uint32_t cmask = uint32_t((uint64_t(1) << c) - 1);
  uint32_t old[kMaxPlanes], fixed_lv[kMaxPlanes], plain[kMaxPlanes], out[kMaxPlanes];
  for (int p = 0; p < planes; ++p) {
    old[p] = uint32_t(bits_at(a.state + p * words, col0, c));
    plain[p] = uint32_t(bits_at(a.plain + p * words, col0, c));
    fixed_lv[p] = old[p];
  }
  const uint32_t held = ~uint32_t(bits_at(a.allowed, col0, c)) & cmask;
  uint32_t fixed = held;
  if (pin) {  // a pinned cell written now takes its known level: not searched either
    const uint8_t* pinned = a.pinned + (o * a.K + a.kp) * a.c;
    for (uint64_t pm = bits_at(a.stuck, col0, c) & ~uint64_t(held); pm; pm &= pm - 1) {
      const int i = ctz64(pm);
      if (pinned[i] != kNotPinned) {
        fixed |= 1u << i;
        for (int p = 0; p < planes; ++p) {
          fixed_lv[p] = (fixed_lv[p] & ~(1u << i)) | (uint32_t((pinned[i] >> p) & 1) << i);
        }
      }
    }
  }
  // what the plain target cells encode
  const int64_t q = kPlanes == 1 ? decode_planes_1bit(plain[0], a.fmt) : decode_planes(plain, a.fmt);
  if (a.table == nullptr ||
      !compensate_by_table<kPlanes>(*a.table, q, old, fixed, fixed_lv, a.fmt, out)) {
    uint8_t old_lv[kMaxCells], fixed_lvs[kMaxCells], lv[kMaxCells];
    for (int i = 0; i < c; ++i) {
      old_lv[i] = fixed_lvs[i] = 0;
      for (int p = 0; p < planes; ++p) {
        old_lv[i] |= uint8_t(((old[p] >> i) & 1u) << p);
        fixed_lvs[i] |= uint8_t(((fixed_lv[p] >> i) & 1u) << p);
      }
    }
    compensate_weight(q, old_lv, fixed, fixed_lvs, a.fmt, lv);
    for (int p = 0; p < planes; ++p) {
      out[p] = 0;
      for (int i = 0; i < c; ++i) out[p] |= uint32_t((lv[i] >> p) & 1) << i;
    }
  }
  for (int p = 0; p < planes; ++p) put_bits(a.target + p * words, col0, c, out[p]);
}

// Row stats layout: writes, sets, resets, pulses, rows_programmed, set_pulses, then writes per
// slice.
// `a.plain` must hold the packed plain targets. Returns nothing; updates state, written,
// cell_writes, eff and rs.
XB_HD void program_tile_row(const TileRowArgs& a, int64_t* rs) {
  const int planes = a.planes;
  const int64_t words = a.words;
  uint64_t any_held = 0, any_pinned = 0;
  for (int64_t w = 0; w < a.nw; ++w) {
    const uint64_t cov = a.covered[w];
    uint64_t allowed = cov & ~a.stuck[w];
    if (a.stuck_initial) {
      allowed |= cov & ~a.written[w];
      a.written[w] |= cov;
    }
    a.allowed[w] = allowed;
    any_held |= cov & ~allowed;
    // a known level matters only where a stuck cell is written now (its first write, when
    // stuck cells take one): a held cell keeps its level whatever the target says
    any_pinned |= allowed & a.stuck[w];
  }
  const bool pin = a.pinned != nullptr && any_pinned != 0;
  const bool comp = a.comp_slices > 0 && any_held != 0;
  const uint64_t* tgt = a.plain;
  if (pin || comp) {
    for (int64_t i = 0; i < planes * words; ++i) a.target[i] = a.plain[i];
    tgt = a.target;
  }
  // The loops below walk set bits in increasing column order and track the slot a column lies
  // in by stepping over whole slots (no division per cell).
  if (pin) {  // stuck cells written now whose level is already known take that level
    int64_t slot = 0, col0 = 0;  // slot of the current column, and its first column
    for (int64_t w = 0; w < a.nw; ++w) {
      for (uint64_t m = a.allowed[w] & a.stuck[w]; m; m &= m - 1) {
        const int64_t col = w * 64 + ctz64(m);
        while (col >= col0 + a.c) {
          ++slot;
          col0 += a.c;
        }
        const int64_t o = a.slot_filter[slot];
        const uint8_t lv = a.pinned[(o * a.K + a.kp) * a.c + (col - col0)];
        if (lv != kNotPinned) set_level_at(a.target, words, planes, col, lv);
      }
    }
  }
  if (comp) {  // rule 13: every weight with a held cell, once
    auto held_cells = [&](int64_t w) { return a.covered[w] & ~a.allowed[w]; };
    if (planes == 1) {
      for_each_slot(a.nw, a.c, held_cells, [&](int64_t slot, int64_t col0) {
        compensate_slot<1>(a, a.slot_filter[slot], col0, pin);
      });
    } else {
      for_each_slot(a.nw, a.c, held_cells, [&](int64_t slot, int64_t col0) {
        compensate_slot<0>(a, a.slot_filter[slot], col0, pin);
      });
    }
  }
  uint64_t old[kMaxPlanes], tw[kMaxPlanes], fresh[kMaxPlanes];
  bool any = false;
  uint64_t any_kept = 0;
  for (int64_t w = 0; w < a.nw; ++w) {
    const uint64_t cov = a.covered[w];
    if (!cov) continue;
    for (int p = 0; p < planes; ++p) {
      old[p] = a.state[p * words + w];
      tw[p] = tgt[p * words + w];
    }
    const WordStats ws = transition_word(old, tw, a.allowed[w], planes, fresh);
    uint64_t kept = 0;  // covered cells that end on a level other than the plain target
    for (int p = 0; p < planes; ++p) {
      a.state[p * words + w] = fresh[p];
      kept |= fresh[p] ^ a.plain[p * words + w];
    }
    kept &= cov;
    if (ws.changed) {
      any = true;
      rs[0] += popcount64(ws.changed);
      rs[1] += popcount64(ws.gt);
      rs[2] += popcount64(ws.lt);
      rs[3] += ws.pulses;
      rs[5] += ws.set_pulses;
      for (int64_t sl = 0; sl < a.nsl; ++sl) {
        rs[kNumStats + sl] += popcount64(ws.changed & a.slice_mask[sl * words + w]);
      }
      if (a.cell_writes) {
        for (uint64_t m = ws.changed; m; m &= m - 1) {
          int32_t& cw = a.cell_writes[w * 64 + ctz64(m)];
          cw = static_cast<int32_t>(static_cast<uint32_t>(cw) + 1u);
        }
      }
    }
    a.allowed[w] = kept;  // `allowed` is spent for this word: it holds the kept cells from here
    any_kept |= kept;
  }
  if (any_kept) {  // effective cells start as the plain targets: patch the weights that differ
    const uint64_t* kept = a.allowed;
    for_each_slot(a.nw, a.c, [&](int64_t w) { return kept[w]; }, [&](int64_t slot, int64_t col0) {
      const int c = int(a.c);
      uint8_t* e = a.eff + (a.slot_filter[slot] * a.K + a.kp) * a.c;
      uint32_t pm[kMaxPlanes];
      for (int p = 0; p < planes; ++p) pm[p] = uint32_t(bits_at(a.state + p * words, col0, c));
      if (planes == 1) {
        planes_to_levels<1>(pm, 1, c, e);  // the whole weight: unchanged cells rewrite the same
      } else {
        for (uint64_t m = bits_at(kept, col0, c); m; m &= m - 1) {
          const int i = ctz64(m);
          uint8_t v = 0;
          for (int p = 0; p < planes; ++p) v |= uint8_t(((pm[p] >> i) & 1u) << p);
          e[i] = v;
        }
      }
    });
  }
  if (any) rs[4] += 1;
}

// Greedy distance (rule 12): covered cells of a tile row whose plain target differs from the
// level the crossbar row holds (stuck cells ignored).
XB_HD int64_t tile_row_distance(const uint64_t* state, const uint64_t* plain,
                                const uint64_t* covered, int64_t nw, int64_t words, int planes) {
  int64_t d = 0;
  for (int64_t w = 0; w < nw; ++w) {
    uint64_t diff = 0;
    for (int p = 0; p < planes; ++p) diff |= state[p * words + w] ^ plain[p * words + w];
    d += popcount64(diff & covered[w]);
  }
  return d;
}

}  // namespace crossbar_torch
