// decode / CPU: cell levels uint8 (*shape, c) -> integer weights int32 (*shape). Never clamps.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../common.h"

namespace crossbar_torch {
namespace {

at::Tensor decode_cpu(const at::Tensor& cells_in, int64_t weight_bits, int64_t bits_per_cell,
                      int64_t encoding, bool check_values) {
  check_format(weight_bits, bits_per_cell, encoding);
  check_dtype(cells_in, at::kByte, "decode", "cells");
  TORCH_CHECK(cells_in.device().is_cpu(),
              "crossbar_torch.decode: cells must be a CPU tensor here, got ", cells_in.device());
  TORCH_CHECK(cells_in.dim() >= 1, "crossbar_torch.decode: cells must have a trailing cell axis");
  const int64_t S = slices_for(weight_bits, bits_per_cell, encoding);
  const int64_t c = cells_for(weight_bits, bits_per_cell, encoding);
  check_size(cells_in, cells_in.dim() - 1, c, "decode", "cells", "cells per weight c");
  const at::Tensor cells = cells_in.contiguous();
  if (check_values) check_levels(cells, bits_per_cell, "decode", "cells");
  auto sizes = cells.sizes().vec();
  sizes.pop_back();
  at::Tensor out = at::empty(sizes, cells.options().dtype(at::kInt));
  const uint8_t* cp = cells.const_data_ptr<uint8_t>();
  int32_t* op = out.mutable_data_ptr<int32_t>();
  const int B = int(weight_bits), b = int(bits_per_cell), e = int(encoding), s = int(S);
  at::parallel_for(0, out.numel(), 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) op[i] = decode_one(cp + i * c, B, b, e, s);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(crossbar_torch, CPU, m) { m.impl("decode", &decode_cpu); }

}  // namespace crossbar_torch
