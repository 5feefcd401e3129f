// Argument validation shared by the CPU and CUDA kernels.
#include "common.h"

namespace crossbar_torch {

ProgramArgs check_program_layer(const at::Tensor& cells, const at::Tensor& state,
                                const at::Tensor& written, const at::Tensor& stuck,
                                const at::Tensor& cell_writes, int64_t tile_offset, int64_t rows,
                                int64_t cols, int64_t bits_per_cell, int64_t slices,
                                bool count_cells, bool check_levels) {
  const char* op = "program_layer";
  TORCH_CHECK(rows >= 1, "crossbar_torch.program_layer: rows must be >= 1, got ", rows);
  TORCH_CHECK(cols >= 1, "crossbar_torch.program_layer: cols must be >= 1, got ", cols);
  TORCH_CHECK(bits_per_cell >= 1 && bits_per_cell <= kMaxPlanes,
              "crossbar_torch.program_layer: bits_per_cell must be in [1, 8], got ",
              bits_per_cell);
  TORCH_CHECK(slices >= 1, "crossbar_torch.program_layer: slices must be >= 1, got ", slices);
  TORCH_CHECK(tile_offset >= 0, "crossbar_torch.program_layer: tile_offset must be >= 0, got ",
              tile_offset);

  check_dtype(cells, at::kByte, op, "cells");
  check_dtype(state, at::kLong, op, "state");
  check_dtype(written, at::kLong, op, "written");
  check_dtype(stuck, at::kLong, op, "stuck");
  check_dtype(cell_writes, at::kInt, op, "cell_writes");
  check_device(state, cells, op, "state", "cells");
  check_device(written, cells, op, "written", "cells");
  check_device(stuck, cells, op, "stuck", "cells");
  check_device(cell_writes, cells, op, "cell_writes", "cells");
  check_contiguous(state, op, "state");
  check_contiguous(written, op, "written");
  check_contiguous(cell_writes, op, "cell_writes");

  check_dim(cells, 3, op, "cells", "(out, K, c)");
  check_dim(state, 4, op, "state", "(pool, rows, bits_per_cell, words)");
  check_dim(written, 3, op, "written", "(pool, rows, words)");
  check_dim(stuck, 3, op, "stuck", "(pool, rows, words)");

  ProgramArgs a;
  a.out = cells.size(0);
  a.K = cells.size(1);
  a.c = cells.size(2);
  a.pool = state.size(0);
  a.words = (cols + 63) / 64;
  a.planes = bits_per_cell;
  TORCH_CHECK(a.c >= 1, "crossbar_torch.program_layer: cells.size(2) (cells per weight c) must be "
              ">= 1, got shape ", cells.sizes());
  TORCH_CHECK(a.c <= cols, "crossbar_torch.program_layer: cells per weight c = cells.size(2) = ",
              a.c, " must be <= cols = ", cols, " (at least one filter per crossbar)");
  TORCH_CHECK(a.pool >= 1, "crossbar_torch.program_layer: state.size(0) (pool) must be >= 1, got ",
              state.sizes());
  check_size(state, 1, rows, op, "state", "rows");
  check_size(state, 2, bits_per_cell, op, "state", "bits_per_cell (planes)");
  check_size(state, 3, a.words, op, "state", "words = ceil(cols / 64)");
  check_size(written, 0, a.pool, op, "written", "pool = state.size(0)");
  check_size(written, 1, rows, op, "written", "rows");
  check_size(written, 2, a.words, op, "written", "words = ceil(cols / 64)");
  check_size(stuck, 0, a.pool, op, "stuck", "pool = state.size(0)");
  check_size(stuck, 1, rows, op, "stuck", "rows");
  check_size(stuck, 2, a.words, op, "stuck", "words = ceil(cols / 64)");
  if (count_cells) {
    check_dim(cell_writes, 3, op, "cell_writes", "(pool, rows, cols)");
    check_size(cell_writes, 0, a.pool, op, "cell_writes", "pool = state.size(0)");
    check_size(cell_writes, 1, rows, op, "cell_writes", "rows");
    check_size(cell_writes, 2, cols, op, "cell_writes", "cols");
  }
  if (check_levels && cells.numel() > 0 && bits_per_cell < 8) {
    check_levels_fit(cells.max().item<int64_t>(), bits_per_cell);
  }
  a.nsl = std::min(a.c, slices);  // slices a column can actually hold
  return a;
}

void check_levels_fit(int64_t max_level, int64_t bits_per_cell) {
  TORCH_CHECK(max_level < (int64_t(1) << bits_per_cell),
              "crossbar_torch.program_layer: cells hold level ", max_level,
              " but a cell with bits_per_cell=", bits_per_cell, " holds levels in [0, ",
              (int64_t(1) << bits_per_cell) - 1, "]");
}

void clear_padding_bits(at::Tensor& state, at::Tensor& written, int64_t cols) {
  const int64_t rem = cols % 64;
  if (rem == 0) return;
  const int64_t words = (cols + 63) / 64;
  const int64_t mask = static_cast<int64_t>((uint64_t(1) << rem) - 1);
  state.select(-1, words - 1).bitwise_and_(mask);
  written.select(-1, words - 1).bitwise_and_(mask);
}

void check_sort_and_encode(const at::Tensor& w, const at::Tensor& scale, const at::Tensor& index,
                           int64_t weight_bits, int64_t bits_per_cell, int64_t encoding) {
  const char* op = "sort_and_encode";
  check_format(weight_bits, bits_per_cell, encoding);
  check_dtype(w, at::kFloat, op, "w");
  check_dtype(scale, at::kFloat, op, "scale");
  check_dtype(index, at::kLong, op, "index");
  check_device(scale, w, op, "scale", "w");
  check_device(index, w, op, "index", "w");
  check_dim(w, 2, op, "w", "(out, K)");
  check_dim(scale, 1, op, "scale", "(out,)");
  check_dim(index, 2, op, "index", "(out, K)");
  const int64_t out = w.size(0), K = w.size(1);
  check_size(scale, 0, out, op, "scale", "out = w.size(0)");
  check_size(index, 0, out, op, "index", "out = w.size(0)");
  check_size(index, 1, K, op, "index", "K = w.size(1)");
  TORCH_CHECK(w.numel() == 0 || at::isfinite(w).all().item<bool>(),
              "crossbar_torch.sort_and_encode: w contains NaN or Inf; weights must be finite");
  TORCH_CHECK(scale.numel() == 0 || at::isfinite(scale).all().item<bool>(),
              "crossbar_torch.sort_and_encode: scale contains NaN or Inf; scales must be finite");
  TORCH_CHECK(scale.numel() == 0 || at::ne(scale, 0).all().item<bool>(),
              "crossbar_torch.sort_and_encode: scale contains 0; scales must be nonzero");
  check_index_range(index, op);
}

void check_effective_weight(const at::Tensor& cells, const at::Tensor& index,
                            const at::Tensor& scale, int64_t weight_bits, int64_t bits_per_cell,
                            int64_t encoding) {
  const char* op = "effective_weight";
  check_format(weight_bits, bits_per_cell, encoding);
  check_dtype(cells, at::kByte, op, "cells");
  check_dtype(index, at::kLong, op, "index");
  check_dtype(scale, at::kFloat, op, "scale");
  check_device(index, cells, op, "index", "cells");
  check_device(scale, cells, op, "scale", "cells");
  check_dim(cells, 3, op, "cells", "(out, K, c)");
  check_dim(index, 2, op, "index", "(out, K)");
  check_dim(scale, 1, op, "scale", "(out,)");
  const int64_t out = cells.size(0), K = cells.size(1);
  const int64_t c = cells_for(weight_bits, bits_per_cell, encoding);
  check_size(cells, 2, c, op, "cells", "cells per weight c");
  check_size(index, 0, out, op, "index", "out = cells.size(0)");
  check_size(index, 1, K, op, "index", "K = cells.size(1)");
  check_size(scale, 0, out, op, "scale", "out = cells.size(0)");
  check_index_range(index, op);
}

}  // namespace crossbar_torch
