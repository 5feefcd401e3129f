// program_layer: argument validation and the host-side layout of one layer's tiles, shared by
// the CPU and CUDA kernels (all checks run before anything is mutated).
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace crossbar_torch {

struct ProgramLayout {
  int64_t out, K, c, S, pool, words, planes, nsl;
  int64_t F;           // filters (slots) per crossbar
  int64_t n_blocks;    // column blocks nb = ceil(out / F)
  int64_t n_sections;  // ceil(K / rows)
  int64_t tiles;       // n_sections * n_blocks; tile id = s * n_blocks + j (section-major)
  int64_t nw;          // words that can hold a used column: ceil(F * c / 64)
  // host copies (int64): slot_filter (n_blocks * F), covered (n_blocks * words),
  // slice_mask (nsl * words), order (tiles, empty when it is to be chosen)
  at::Tensor slot_filter, covered, slice_mask, order;
};

// Checks every argument of program_layer and returns the layout; `order` is kept when given.
ProgramLayout check_program_layer(const at::Tensor& cells, const at::Tensor& filter_index,
                                  const at::Tensor& order, const at::Tensor& pinned,
                                  const at::Tensor& state, const at::Tensor& written,
                                  const at::Tensor& stuck, const at::Tensor& cell_writes,
                                  int64_t tile_offset, int64_t rows, int64_t cols,
                                  int64_t weight_bits, int64_t bits_per_cell, int64_t encoding,
                                  bool count_cells, int64_t compensate_slices, int64_t window);

}  // namespace crossbar_torch
