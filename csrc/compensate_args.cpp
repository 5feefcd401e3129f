// compensate: argument checks (see compensate_args.h).
#include "compensate_args.h"

#include "common.h"

namespace crossbar_torch {

int64_t check_compensate(const at::Tensor& cells, const at::Tensor& held, const at::Tensor& old,
                         int64_t weight_bits, int64_t bits_per_cell, int64_t encoding,
                         int64_t compensate_slices) {
  const char* op = "compensate";
  check_format(weight_bits, bits_per_cell, encoding);
  const int64_t S = slices_for(weight_bits, bits_per_cell, encoding);
  const int64_t c = cells_for(weight_bits, bits_per_cell, encoding);
  TORCH_CHECK(compensate_slices >= 0 && compensate_slices <= S,
              "crossbar_torch.compensate: compensate_slices must be in [0, ", S, "], got ",
              compensate_slices);
  TORCH_CHECK((c / S) * compensate_slices * bits_per_cell <= 21,
              "crossbar_torch.compensate: the search over ", compensate_slices,
              " slices exceeds 21 bits per weight");
  check_dtype(cells, at::kByte, op, "cells");
  check_dtype(held, at::kBool, op, "held");
  check_dtype(old, at::kByte, op, "old");
  check_device(held, cells, op, "held", "cells");
  check_device(old, cells, op, "old", "cells");
  TORCH_CHECK(cells.dim() >= 1, "crossbar_torch.compensate: cells must have a trailing cell axis");
  check_size(cells, cells.dim() - 1, c, op, "cells", "cells per weight c");
  TORCH_CHECK(held.sizes() == cells.sizes() && old.sizes() == cells.sizes(),
              "crossbar_torch.compensate: held ", held.sizes(), " and old ", old.sizes(),
              " must have the shape of cells ", cells.sizes());
  return c;
}

void check_compensate_values(const at::Tensor& cells, const at::Tensor& old,
                             int64_t bits_per_cell) {
  check_levels(cells, bits_per_cell, "compensate", "cells");
  check_levels(old, bits_per_cell, "compensate", "old");
}

}  // namespace crossbar_torch
