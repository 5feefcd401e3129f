// pack_levels / CPU (host only: on a device the torch ops of crossbar_torch/packing.py run
// there): cell levels uint8 (..., cells) -> packed uint8 (..., width), packing.py's layout (a
// b-bit level in a slot of s bits, s the smallest power of two >= b, 8 / s slots a byte, little
// end first, unused bits 0). As numpy's packbits path did: with s = 1 a nonzero level is a 1;
// otherwise a level's low s bits are kept. Reference: packing._pack_levels_torch.
//
// Why a kernel: every programming packs each layer's levels and stuck flags (1.2G cells on the
// ViT-Base-sized model); numpy's packbits, one bit a byte, took about a second of each.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

#include "../common.h"

namespace crossbar_torch {
namespace {

at::Tensor pack_levels_cpu(const at::Tensor& levels_in, int64_t bits_per_cell) {
  const int s = checked_slot_bits(bits_per_cell, "pack_levels");
  check_dtype(levels_in, at::kByte, "pack_levels", "levels");
  TORCH_CHECK(levels_in.device().is_cpu(),
              "crossbar_torch.pack_levels: levels must be a CPU tensor, got ", levels_in.device());
  TORCH_CHECK(levels_in.dim() >= 1,
              "crossbar_torch.pack_levels: levels must have a trailing cell axis");
  const at::Tensor levels = levels_in.contiguous();
  if (s == 8) return levels.clone();  // one cell a byte: a copy (an op's output never aliases)
  const int64_t cells = levels.size(-1), per = 8 / s, width = packed_width(cells, s);
  auto sizes = levels.sizes().vec();
  sizes.back() = width;
  at::Tensor out = at::empty(sizes, levels.options());
  if (out.numel() == 0) return out;
  const int64_t n = out.numel() / width;
  const uint8_t* lp = levels.const_data_ptr<uint8_t>();
  uint8_t* op = out.mutable_data_ptr<uint8_t>();
  const unsigned top = (1u << s) - 1;
  at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const uint8_t* src = lp + i * cells;
      uint8_t* dst = op + i * width;
      for (int64_t j = 0; j < width; ++j) {
        const int64_t c0 = j * per, c1 = std::min<int64_t>(cells, c0 + per);
        unsigned byte = 0;
        for (int64_t c = c0; c < c1; ++c) {
          const unsigned v = s == 1 ? unsigned(src[c] != 0) : (src[c] & top);
          byte |= v << ((c - c0) * s);
        }
        dst[j] = uint8_t(byte);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(crossbar_torch, CPU, m) { m.impl("pack_levels", &pack_levels_cpu); }

}  // namespace crossbar_torch
