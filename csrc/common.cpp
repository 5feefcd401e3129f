// Argument validation shared by the CPU and CUDA kernels.
#include "common.h"

#include <ATen/Parallel.h>
#include <c10/util/safe_numerics.h>

#include <algorithm>
#include <atomic>
#include <vector>

namespace crossbar_torch {

void check_levels_fit(int64_t max_level, int64_t bits_per_cell, const char* op,
                      const char* name) {
  TORCH_CHECK(max_level < (int64_t(1) << bits_per_cell), "crossbar_torch.", op, ": ", name,
              " hold level ", max_level, " but a cell with bits_per_cell=", bits_per_cell,
              " holds levels in [0, ", (int64_t(1) << bits_per_cell) - 1, "]");
}

void check_pinned_fit(int64_t max_pinned, int64_t bits_per_cell) {
  const int64_t top = (int64_t(1) << bits_per_cell) - 1;
  TORCH_CHECK(max_pinned <= top, "crossbar_torch.program_layer: pinned levels must be in [0, ",
              top, "] or 255 (not pinned)");
}

void check_levels(const at::Tensor& cells, int64_t bits_per_cell, const char* op,
                  const char* name) {
  if (cells.numel() == 0 || bits_per_cell >= 8) return;  // uint8 holds nothing beyond 255
  check_levels_fit(cells.max().item<int64_t>(), bits_per_cell, op, name);
}

// CPU: one pass over the (contiguous) index, rows in parallel, a bitmap of K bits per thread;
// reports the first bad row. (The ATen path below costs several full passes and allocations:
// it made sort_and_encode 4x slower on ViT-Base.) With `inverse` (contiguous, the index's
// shape), each row's inverse is written in the same pass: inverse[o, index[o, k]] = k.
static void check_index_permutation_cpu(const at::Tensor& index, const char* op,
                                        int64_t* inverse = nullptr) {
  const at::Tensor idx = index.contiguous();
  const int64_t out = idx.size(0), K = idx.size(1);
  const int64_t* data = idx.data_ptr<int64_t>();
  std::atomic<int64_t> bad_row{out};
  at::parallel_for(0, out, std::max<int64_t>(1, 65536 / std::max<int64_t>(K, 1)),
                   [&](int64_t begin, int64_t end) {
    std::vector<uint64_t> seen((K + 63) / 64);
    for (int64_t o = begin; o < end && o < bad_row.load(std::memory_order_relaxed); ++o) {
      std::fill(seen.begin(), seen.end(), 0);
      const int64_t* row = data + o * K;
      bool ok = true;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t v = row[k];
        if (v < 0 || v >= K || (seen[v >> 6] >> (v & 63)) & 1) { ok = false; break; }
        seen[v >> 6] |= uint64_t(1) << (v & 63);
        if (inverse) inverse[o * K + v] = k;
      }
      if (!ok) {
        int64_t cur = bad_row.load();
        while (o < cur && !bad_row.compare_exchange_weak(cur, o)) {}
        break;
      }
    }
  });
  const int64_t row = bad_row.load();
  if (row == out) return;
  std::vector<int64_t> counts(K, 0);
  const int64_t* r = data + row * K;
  for (int64_t k = 0; k < K; ++k) {
    TORCH_CHECK(r[k] >= 0 && r[k] < K, "crossbar_torch.", op,
                ": index entries must be in [0, K-1] = [0, ", K - 1,
                "] (a permutation of each row), got ", r[k], " in row ", row);
    ++counts[r[k]];
  }
  const int64_t value = std::max_element(counts.begin(), counts.end()) - counts.begin();
  TORCH_CHECK(false, "crossbar_torch.", op, ": index row ", row, " is not a permutation of [0, ",
              K, "): entry value ", value, " occurs ", counts[value], " times");
}

at::Tensor inverse_permutation(const at::Tensor& index, const char* op) {
  if (index.device().is_cpu() && index.dim() == 2) {
    at::Tensor inverse = at::empty(index.sizes(), index.options().memory_format(
                                                      at::MemoryFormat::Contiguous));
    if (index.numel()) check_index_permutation_cpu(index, op, inverse.mutable_data_ptr<int64_t>());
    return inverse;
  }
  check_index_permutation(index, op);
  const int64_t K = index.size(1);
  at::Tensor inverse = at::empty_like(index);
  inverse.scatter_(1, index, at::arange(K, index.options()).unsqueeze(0).expand(index.sizes()));
  return inverse.contiguous();
}

void check_index_permutation(const at::Tensor& index, const char* op) {
  if (index.numel() == 0) return;
  if (index.device().is_cpu()) return check_index_permutation_cpu(index, op);
  // entries are in [0, K): each row is a permutation iff every value occurs exactly once
  const at::Tensor counts = at::zeros(index.sizes(), index.options().dtype(at::kInt))
                                .scatter_add_(1, index, at::ones_like(index, at::kInt));
  const at::Tensor bad_rows = at::ne(counts, 1).any(1);
  if (!bad_rows.any().item<bool>()) return;
  const int64_t row = bad_rows.to(at::kInt).argmax().item<int64_t>();
  const at::Tensor row_counts = counts.select(0, row);
  const int64_t value = row_counts.argmax().item<int64_t>();
  TORCH_CHECK(false, "crossbar_torch.", op, ": index row ", row, " is not a permutation of [0, ",
              index.size(1), "): entry value ", value, " occurs ",
              row_counts[value].item<int64_t>(), " times");
}

void check_output_size(int64_t numel, int64_t per, const char* op, const char* what) {
  int64_t total = 0;
  TORCH_CHECK(!c10::mul_overflows(numel, per, &total), "crossbar_torch.", op, ": ", what,
              " = ", numel, " * ", per, " overflows int64; the inputs are too large");
}

void check_filter_weight(const std::optional<at::Tensor>& filter_weight, int64_t out,
                         const char* op) {
  if (!filter_weight.has_value() || !filter_weight->defined()) return;
  const at::Tensor& a = *filter_weight;
  check_dtype(a, at::kDouble, op, "filter_weight");
  check_dim(a, 1, op, "filter_weight", "(out,)");
  check_size(a, 0, out, op, "filter_weight", "out");
  if (a.numel()) {
    TORCH_CHECK(((a >= kMinFilterWeight) & (a <= kMaxFilterWeight)).all().item<bool>(),
                "crossbar_torch.", op, ": filter_weight must hold numbers in [",
                kMinFilterWeight, ", ", kMaxFilterWeight, "] (finite, > 0)");
  }
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
  check_output_size(w.numel(), cells_for(weight_bits, bits_per_cell, encoding), op,
                    "the output's out * K * c cells");
}

bool all_finite(const at::Tensor& t) {
  if (t.numel() == 0) return true;
  return at::isfinite(t.sum()).item<bool>() || at::isfinite(t).all().item<bool>();
}

void check_sort_and_encode_values(const at::Tensor& w, const at::Tensor& scale,
                                  const at::Tensor& index) {
  const char* op = "sort_and_encode";
  TORCH_CHECK(all_finite(w),
              "crossbar_torch.sort_and_encode: w contains NaN or Inf; weights must be finite");
  TORCH_CHECK(all_finite(scale),
              "crossbar_torch.sort_and_encode: scale contains NaN or Inf; scales must be finite");
  TORCH_CHECK(scale.numel() == 0 || at::ne(scale, 0).all().item<bool>(),
              "crossbar_torch.sort_and_encode: scale contains 0; scales must be nonzero");
  if (!index.device().is_cpu()) check_index_range(index, op);  // the CPU permutation check covers it
  check_index_permutation(index, op);
}

void check_effective_weight(const at::Tensor& cells, const at::Tensor& index,
                            const at::Tensor& scale, int64_t weight_bits, int64_t bits_per_cell,
                            int64_t encoding, bool allow_packed) {
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
  const int64_t width = packed_width(c, checked_slot_bits(bits_per_cell, op));
  if (!allow_packed || cells.size(2) != width) {
    check_size(cells, 2, c, op, "cells", allow_packed ? "cells per weight c (or, packed, their "
               "width in bytes)" : "cells per weight c");
  }
  check_size(index, 0, out, op, "index", "out = cells.size(0)");
  check_size(index, 1, K, op, "index", "K = cells.size(1)");
  check_size(scale, 0, out, op, "scale", "out = cells.size(0)");
}

void check_effective_weight_values(const at::Tensor& cells, const at::Tensor& index,
                                   int64_t bits_per_cell, bool packed) {
  const char* op = "effective_weight";
  if (!index.device().is_cpu()) check_index_range(index, op);  // the CPU permutation check covers it
  check_index_permutation(index, op);
  if (packed) return check_packed_levels(cells, bits_per_cell, op, "cells");
  check_levels(cells, bits_per_cell, op, "cells");
}

void check_packed_levels(const at::Tensor& packed, int64_t bits_per_cell, const char* op,
                         const char* name) {
  const int s = checked_slot_bits(bits_per_cell, op);
  if (packed.numel() == 0 || s == bits_per_cell) return;  // every slot value is a level
  if (s == 8) return check_levels(packed, bits_per_cell, op, name);
  for (int i = 0; i < 8 / s; ++i) {  // unused slots and bits are 0 when packed
    check_levels_fit(packed.bitwise_right_shift(i * s).bitwise_and((1 << s) - 1).max()
                         .item<int64_t>(), bits_per_cell, op, name);
  }
}

}  // namespace crossbar_torch
