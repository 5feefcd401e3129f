// effective_weight / CPU: out[o, index[o, k]] = float(decode(cells[o, k])) * scale[o]. The
// cells are unpacked (out, K, c) or a layer's packed buffer (out, K, width): decoded from its
// bytes, where unpacking a layer first (packing.unpack_levels) wrote and read its c bytes a
// weight again (on the ViT-Base-sized model, half of computing its effective weights).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../common.h"
#include "../program_row.h"  // kMaxCells
#include "slot_table.h"

namespace crossbar_torch {
namespace {

// The decoded value of every packed pattern of a weight of at most two bytes (16 one-bit
// cells: ViT-Base's 14), by its bytes read little end first; empty beyond two bytes.
std::vector<int32_t> packed_values(int64_t width, int64_t c, int s, int B, int b, int e, int S) {
  std::vector<int32_t> table;
  if (width > 2) return table;
  table.resize(size_t(1) << (8 * width));
  uint8_t bytes[2], cells[kMaxCells];
  for (size_t v = 0; v < table.size(); ++v) {
    bytes[0] = uint8_t(v & 0xff);
    bytes[1] = uint8_t(v >> 8);
    unpack_slots(bytes, c, s, cells);
    table[v] = int32_t(decode_one(cells, B, b, e, S));
  }
  return table;
}

at::Tensor effective_weight_cpu(const at::Tensor& cells_in, const at::Tensor& index_in,
                                const at::Tensor& scale_in, int64_t weight_bits,
                                int64_t bits_per_cell, int64_t encoding, bool check_values) {
  TORCH_CHECK(cells_in.device().is_cpu(),
              "crossbar_torch.effective_weight: cells must be a CPU tensor here, got ",
              cells_in.device());
  check_effective_weight(cells_in, index_in, scale_in, weight_bits, bits_per_cell, encoding,
                         /*allow_packed=*/true);
  const int64_t out = cells_in.size(0), K = cells_in.size(1);
  const int64_t S = slices_for(weight_bits, bits_per_cell, encoding);
  const int64_t c = cells_for(weight_bits, bits_per_cell, encoding);
  const int64_t width = cells_in.size(2);
  const bool packed = width != c;  // (with width == c the packed bytes are the levels)
  const at::Tensor cells = cells_in.contiguous();
  const at::Tensor index = index_in.contiguous();
  const at::Tensor scale = scale_in.contiguous();
  if (check_values) check_effective_weight_values(cells, index, bits_per_cell, packed);
  // every element is written once: the index is a permutation of each row
  at::Tensor result = at::empty({out, K}, cells.options().dtype(at::kFloat));
  const uint8_t* cp = cells.const_data_ptr<uint8_t>();
  const int64_t* ip = index.const_data_ptr<int64_t>();
  const float* sp = scale.const_data_ptr<float>();
  float* rp = result.mutable_data_ptr<float>();
  const int B = int(weight_bits), b = int(bits_per_cell), e = int(encoding), s = int(S);
  const int slot = checked_slot_bits(bits_per_cell, "effective_weight");
  const std::vector<int32_t> table =
      packed ? packed_values(width, c, slot, B, b, e, s) : std::vector<int32_t>();
  at::parallel_for(0, out, std::max<int64_t>(1, 4096 / std::max<int64_t>(K, 1)),
                   [&](int64_t begin, int64_t end) {
    uint8_t unpacked[kMaxCells];
    for (int64_t o = begin; o < end; ++o) {
      const float so = sp[o];
      const uint8_t* row = cp + o * K * width;
      for (int64_t k = 0; k < K; ++k) {
        const uint8_t* w = row + k * width;
        int64_t v;
        if (!packed) {
          v = decode_one(w, B, b, e, s);
        } else if (!table.empty()) {
          v = table[size_t(w[0]) | (width > 1 ? size_t(w[1]) << 8 : 0)];
        } else {
          unpack_slots(w, c, slot, unpacked);
          v = decode_one(unpacked, B, b, e, s);
        }
        rp[o * K + ip[o * K + k]] = static_cast<float>(v) * so;
      }
    }
  });
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(crossbar_torch, CPU, m) { m.impl("effective_weight", &effective_weight_cpu); }

}  // namespace crossbar_torch
