// unpack_levels / CPU (host only: on a device the torch ops of crossbar_torch/packing.py run
// there): packed cell levels uint8 (..., width) -> uint8 (..., cells). The layout is packing.py's:
// a b-bit level in a slot of s bits (s the smallest power of two >= b), 8 / s slots a byte,
// little end first; width = ceil(cells / (8 / s)). Reference: packing._unpack_levels_torch.
//
// Why a kernel: a programming of the ViT-Base-sized model with stuck cells unpacks every
// layer's levels and stuck flags several times (1.2G cells each time); numpy's unpackbits along
// a two-byte axis wrote them at about 1 GB/s, a seventh of that reprogramming.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

#include "../common.h"
#include "slot_table.h"

namespace crossbar_torch {
namespace {

at::Tensor unpack_levels_cpu(const at::Tensor& packed_in, int64_t cells, int64_t bits_per_cell) {
  const int s = checked_slot_bits(bits_per_cell, "unpack_levels");
  TORCH_CHECK(cells >= 0, "crossbar_torch.unpack_levels: cells must be >= 0, got ", cells);
  check_dtype(packed_in, at::kByte, "unpack_levels", "packed");
  TORCH_CHECK(packed_in.device().is_cpu(),
              "crossbar_torch.unpack_levels: packed must be a CPU tensor, got ",
              packed_in.device());
  TORCH_CHECK(packed_in.dim() >= 1,
              "crossbar_torch.unpack_levels: packed must have a trailing byte axis");
  const int64_t width = packed_width(cells, s);
  TORCH_CHECK(packed_in.size(-1) == width || (s == 8 && packed_in.size(-1) >= cells),
              "crossbar_torch.unpack_levels: packed.size(-1) must be ", width, " for ", cells,
              " cells of ", bits_per_cell, " bit(s), got ", packed_in.size(-1));
  const at::Tensor packed = packed_in.contiguous();
  auto sizes = packed.sizes().vec();
  sizes.back() = cells;
  at::Tensor out = at::empty(sizes, packed.options());
  const int64_t n = out.numel() / std::max<int64_t>(cells, 1), in_w = packed.size(-1);
  if (out.numel() == 0) return out;
  const uint8_t* pp = packed.const_data_ptr<uint8_t>();
  uint8_t* op = out.mutable_data_ptr<uint8_t>();
  if (s == 8) {  // one cell a byte: the first `cells` bytes of each row
    at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) std::memcpy(op + i * cells, pp + i * in_w, cells);
    });
    return out;
  }
  at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) unpack_slots(pp + i * width, cells, s, op + i * cells);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(crossbar_torch, CPU, m) { m.impl("unpack_levels", &unpack_levels_cpu); }

}  // namespace crossbar_torch
