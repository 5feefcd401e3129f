// program_layer: argument checks and the host-side tile layout (see program_layer_args.h).
#include "program_layer_args.h"

#include <algorithm>

#include "common.h"

namespace crossbar_torch {

namespace {

constexpr const char* kProgramOp = "program_layer";

// Rule 13 enumerates at most 2**(bits - bits_per_cell) assignments per weight: the same bound
// as CrossbarConfig (MAX_COMPENSATION_BITS).
constexpr int64_t kMaxCompensationBits = 21;

// Crossbar rows and columns: the bound CrossbarConfig puts on them (2**20); it keeps every
// size derived from them (words, slots, grid sizes) far from overflowing.
constexpr int64_t kMaxRowsCols = int64_t(1) << 20;

void check_on_device_of_cells(const at::Tensor& t, const at::Tensor& cells, const char* name) {
  check_device(t, cells, kProgramOp, name, "cells");
}

}  // namespace

ProgramLayout check_program_layer(const at::Tensor& cells, const at::Tensor& filter_index,
                                  const at::Tensor& order, const at::Tensor& pinned,
                                  const at::Tensor& state, const at::Tensor& written,
                                  const at::Tensor& stuck, const at::Tensor& cell_writes,
                                  int64_t tile_offset, int64_t rows, int64_t cols,
                                  int64_t weight_bits, int64_t bits_per_cell, int64_t encoding,
                                  bool count_cells, int64_t compensate_slices, int64_t window) {
  TORCH_CHECK(rows >= 1 && rows <= kMaxRowsCols, "crossbar_torch.program_layer: rows must be in "
              "[1, ", kMaxRowsCols, "], got ", rows);
  TORCH_CHECK(cols >= 1 && cols <= kMaxRowsCols, "crossbar_torch.program_layer: cols must be in "
              "[1, ", kMaxRowsCols, "], got ", cols);
  check_format(weight_bits, bits_per_cell, encoding);
  TORCH_CHECK(tile_offset >= 0, "crossbar_torch.program_layer: tile_offset must be >= 0, got ",
              tile_offset);
  TORCH_CHECK(window >= 0, "crossbar_torch.program_layer: window must be >= 0 (0: section-major "
              "order), got ", window);
  const int64_t S = slices_for(weight_bits, bits_per_cell, encoding);
  const int64_t c = cells_for(weight_bits, bits_per_cell, encoding);
  TORCH_CHECK(compensate_slices >= 0 && compensate_slices <= S,
              "crossbar_torch.program_layer: compensate_slices must be in [0, ", S,
              "] (the slices of one weight), got ", compensate_slices);
  const int64_t comp_bits = (c / S) * compensate_slices * bits_per_cell;
  TORCH_CHECK(comp_bits <= kMaxCompensationBits, "crossbar_torch.program_layer: compensation "
              "over ", compensate_slices, " slices searches ", comp_bits, " bits per weight; at "
              "most ", kMaxCompensationBits, " are supported");

  check_dtype(cells, at::kByte, kProgramOp, "cells");
  check_dtype(filter_index, at::kLong, kProgramOp, "filter_index");
  check_dtype(order, at::kLong, kProgramOp, "order");
  check_dtype(pinned, at::kByte, kProgramOp, "pinned");
  check_dtype(state, at::kLong, kProgramOp, "state");
  check_dtype(written, at::kLong, kProgramOp, "written");
  check_dtype(stuck, at::kLong, kProgramOp, "stuck");
  check_dtype(cell_writes, at::kInt, kProgramOp, "cell_writes");
  check_on_device_of_cells(filter_index, cells, "filter_index");
  check_on_device_of_cells(order, cells, "order");
  check_on_device_of_cells(pinned, cells, "pinned");
  check_on_device_of_cells(state, cells, "state");
  check_on_device_of_cells(written, cells, "written");
  check_on_device_of_cells(stuck, cells, "stuck");
  check_on_device_of_cells(cell_writes, cells, "cell_writes");
  check_contiguous(state, kProgramOp, "state");
  check_contiguous(written, kProgramOp, "written");
  check_contiguous(cell_writes, kProgramOp, "cell_writes");

  check_dim(cells, 3, kProgramOp, "cells", "(out, K, c)");
  check_dim(state, 4, kProgramOp, "state", "(pool, rows, bits_per_cell, words)");
  check_dim(written, 3, kProgramOp, "written", "(pool, rows, words)");
  check_dim(stuck, 3, kProgramOp, "stuck", "(pool, rows, words)");
  check_dim(filter_index, 1, kProgramOp, "filter_index", "(n_blocks * F,)");
  check_dim(order, 1, kProgramOp, "order", "(tiles,) or (0,)");

  ProgramLayout L;
  L.out = cells.size(0);
  L.K = cells.size(1);
  L.c = c;
  L.S = S;
  L.pool = state.size(0);
  L.words = (cols + 63) / 64;
  L.planes = bits_per_cell;
  check_size(cells, 2, c, kProgramOp, "cells", "cells per weight c");
  TORCH_CHECK(c <= cols, "crossbar_torch.program_layer: cells per weight c = ", c,
              " must be <= cols = ", cols, " (at least one filter per crossbar)");
  TORCH_CHECK(L.pool >= 1, "crossbar_torch.program_layer: state.size(0) (pool) must be >= 1, got ",
              state.sizes());
  check_size(state, 1, rows, kProgramOp, "state", "rows");
  check_size(state, 2, bits_per_cell, kProgramOp, "state", "bits_per_cell (planes)");
  check_size(state, 3, L.words, kProgramOp, "state", "words = ceil(cols / 64)");
  check_size(written, 0, L.pool, kProgramOp, "written", "pool = state.size(0)");
  check_size(written, 1, rows, kProgramOp, "written", "rows");
  check_size(written, 2, L.words, kProgramOp, "written", "words = ceil(cols / 64)");
  check_size(stuck, 0, L.pool, kProgramOp, "stuck", "pool = state.size(0)");
  check_size(stuck, 1, rows, kProgramOp, "stuck", "rows");
  check_size(stuck, 2, L.words, kProgramOp, "stuck", "words = ceil(cols / 64)");
  if (count_cells) {
    check_dim(cell_writes, 3, kProgramOp, "cell_writes", "(pool, rows, cols)");
    check_size(cell_writes, 0, L.pool, kProgramOp, "cell_writes", "pool = state.size(0)");
    check_size(cell_writes, 1, rows, kProgramOp, "cell_writes", "rows");
    check_size(cell_writes, 2, cols, kProgramOp, "cell_writes", "cols");
  }
  if (pinned.numel() != 0) {
    TORCH_CHECK(pinned.sizes() == cells.sizes(), "crossbar_torch.program_layer: pinned must be "
                "empty or have the shape of cells ", cells.sizes(), ", got ", pinned.sizes());
    // the CPU kernel checks the levels in its first pass over the cells: these three
    // full-size temporaries cost as much as programming the layer's stuck cells
    if (!pinned.is_cpu()) {
      const int64_t top = (int64_t(1) << bits_per_cell) - 1;
      check_pinned_fit(
          at::logical_and(at::gt(pinned, top), at::ne(pinned, 255)).any().item<bool>() ? top + 1
                                                                                       : 0,
          bits_per_cell);
    }
  }

  L.F = cols / c;
  L.n_blocks = L.out ? (L.out + L.F - 1) / L.F : 0;
  L.n_sections = L.K ? (L.K + rows - 1) / rows : 0;
  L.tiles = L.n_blocks * L.n_sections;
  L.nw = (L.F * c + 63) / 64;
  L.nsl = std::min(c, S);

  // Filter placement (rule 11): slot f of block j holds filter_index[j*F + f], -1 when unused;
  // every filter exactly once. Empty: the natural placement (filter o in block o / F).
  const int64_t nslots = L.n_blocks * L.F;
  if (filter_index.numel() == 0) {
    L.slot_filter = at::full({nslots}, -1, at::kLong);
    if (L.out) L.slot_filter.narrow(0, 0, L.out).copy_(at::arange(L.out, at::kLong));
  } else {
    TORCH_CHECK(filter_index.numel() == nslots, "crossbar_torch.program_layer: filter_index must "
                "have n_blocks * F = ", L.n_blocks, " * ", L.F, " = ", nslots, " entries, got ",
                filter_index.numel());
    L.slot_filter = filter_index.to(at::kCPU).contiguous();
    std::vector<char> seen(size_t(L.out), 0);
    const int64_t* fi = L.slot_filter.const_data_ptr<int64_t>();
    for (int64_t i = 0; i < nslots; ++i) {
      TORCH_CHECK(fi[i] >= -1 && fi[i] < L.out, "crossbar_torch.program_layer: filter_index[", i,
                  "] = ", fi[i], " is not a filter in [0, ", L.out, ") nor -1 (unused slot)");
      if (fi[i] < 0) continue;
      TORCH_CHECK(!seen[size_t(fi[i])], "crossbar_torch.program_layer: filter_index places "
                  "filter ", fi[i], " twice");
      seen[size_t(fi[i])] = 1;
    }
    for (int64_t o = 0; o < L.out; ++o) {
      TORCH_CHECK(seen[size_t(o)], "crossbar_torch.program_layer: filter_index places no slot "
                  "for filter ", o);
    }
  }
  // Columns each block uses, and the slice each used column holds.
  L.covered = at::zeros({std::max<int64_t>(L.n_blocks, 1), L.words}, at::kLong);
  uint64_t* cov = reinterpret_cast<uint64_t*>(L.covered.mutable_data_ptr<int64_t>());
  const int64_t* fi = L.slot_filter.const_data_ptr<int64_t>();
  for (int64_t j = 0; j < L.n_blocks; ++j) {
    for (int64_t f = 0; f < L.F; ++f) {
      if (fi[j * L.F + f] < 0) continue;
      for (int64_t col = f * c; col < (f + 1) * c; ++col) {
        cov[j * L.words + col / 64] |= uint64_t(1) << (col % 64);
      }
    }
  }
  L.slice_mask = at::zeros({std::max<int64_t>(L.nsl, 1), L.words}, at::kLong);
  uint64_t* sm = reinterpret_cast<uint64_t*>(L.slice_mask.mutable_data_ptr<int64_t>());
  for (int64_t col = 0; col < L.F * c; ++col) {
    sm[((col % c) % S) * L.words + col / 64] |= uint64_t(1) << (col % 64);
  }
  // A given order is replayed: it must be a permutation of the layer's tiles.
  if (order.numel() != 0) {
    TORCH_CHECK(order.numel() == L.tiles, "crossbar_torch.program_layer: order must be empty "
                "(choose it) or hold the layer's ", L.tiles, " tiles, got ", order.numel());
    L.order = order.to(at::kCPU).contiguous();
    std::vector<char> seen(size_t(L.tiles), 0);
    const int64_t* od = L.order.const_data_ptr<int64_t>();
    for (int64_t i = 0; i < L.tiles; ++i) {
      TORCH_CHECK(od[i] >= 0 && od[i] < L.tiles && !seen[size_t(od[i])],
                  "crossbar_torch.program_layer: order must be a permutation of [0, ", L.tiles,
                  "); entry ", i, " is ", od[i]);
      seen[size_t(od[i])] = 1;
    }
  }
  return L;
}

}  // namespace crossbar_torch
