// The rule-3 cells of every value of [-qmax, qmax], packed b bits apiece in one word each, built
// once per call: the cells in which two values' encodings differ are then an XOR and a count,
// not a loop over c cells. Rule 23's choice for a weight without held cells
// (feedback_quantize_kernel.cpp: the branch was most of the mpnet_best reprogramming) and rule
// 24's write terms (feedback_refine_kernel.cpp) count with it.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "../common.h"
#include "../program_row.h"

namespace crossbar_torch {

struct CellCodes {
  std::vector<uint64_t> code;  // value v -> its rule-3 cells, cell i at bits [i*b, (i+1)*b)
  int64_t qmax = 0;
  uint64_t lsb = 0;            // bit i*b of every cell
  bool usable = false;         // c * b <= 64
  // `code` with kPadBefore zero words before it and kPadAfter after, so that the vector paths
  // (cell_codes_wide.h) load a window of values around any v of [-qmax, qmax] in one piece:
  // codes_from(v)[i] is the code of v + i (0 outside the range: those lanes are never used)
  static constexpr int64_t kPadBefore = 3, kPadAfter = 32;
  std::vector<uint64_t> padded;
  const uint64_t* codes_from(int64_t v) const { return padded.data() + (v + qmax + kPadBefore); }
};

inline uint64_t pack_cells(const uint8_t* cells, const CompFormat& f) {
  uint64_t w = 0;
  for (int i = 0; i < f.c; ++i) w |= uint64_t(cells[i]) << (i * f.b);
  return w;
}

inline CellCodes make_cell_codes(const CompFormat& f) {
  CellCodes t;
  if (int64_t(f.c) * f.b > 64) return t;
  t.usable = true;
  t.qmax = qmax_for(f.B);
  for (int i = 0; i < f.c; ++i) t.lsb |= uint64_t(1) << (i * f.b);
  uint8_t cells[kMaxCells];
  t.code.resize(size_t(2 * t.qmax + 1));
  for (int64_t v = -t.qmax; v <= t.qmax; ++v) {
    encode_one(v, f.B, f.b, f.enc, f.S, cells);
    t.code[size_t(v + t.qmax)] = pack_cells(cells, f);
  }
  t.padded.assign(t.code.size() + size_t(CellCodes::kPadBefore + CellCodes::kPadAfter), 0);
  std::copy(t.code.begin(), t.code.end(), t.padded.begin() + CellCodes::kPadBefore);
  return t;
}

// Cells whose b-bit fields differ between two packed words. Always inlined, so that a caller
// compiled for the POPCNT instruction (target("popcnt")) counts with it, not with libgcc.
inline __attribute__((always_inline)) int64_t cells_differing(uint64_t x,
                                                               const CellCodes& t, int b) {
  uint64_t any = x;
  for (int s = 1; s < b; ++s) any |= x >> s;
  return __builtin_popcountll(any & t.lsb);
}

}  // namespace crossbar_torch
