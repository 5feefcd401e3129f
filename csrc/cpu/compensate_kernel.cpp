// compensate / CPU: rule 13 on its own, for the training forward. Every weight with a held cell
// (one that keeps its `old` level) gets, in its free low cells, the levels that bring it closest
// to the value its plain target `cells` encode (ties: fewest cells changed against `old`, then
// the smallest assignment); other weights take their plain targets. compensate_slices = 0:
// held cells keep `old`, the rest take the target.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../common.h"
#include "../compensate_args.h"
#include "../program_row.h"
#include "comp_table.h"

namespace crossbar_torch {
namespace {

at::Tensor compensate_cpu(const at::Tensor& cells_in, const at::Tensor& held_in,
                          const at::Tensor& old_in, int64_t weight_bits, int64_t bits_per_cell,
                          int64_t encoding, int64_t compensate_slices, bool check_values) {
  TORCH_CHECK(cells_in.device().is_cpu(),
              "crossbar_torch.compensate: cells must be a CPU tensor here, got ",
              cells_in.device());
  const int64_t c = check_compensate(cells_in, held_in, old_in, weight_bits, bits_per_cell,
                                     encoding, compensate_slices);
  const at::Tensor cells = cells_in.contiguous(), held = held_in.contiguous(),
                   old = old_in.contiguous();
  if (check_values) check_compensate_values(cells, old, bits_per_cell);
  at::Tensor out = at::empty_like(cells);
  const uint8_t* cp = cells.const_data_ptr<uint8_t>();
  const bool* hp = held.const_data_ptr<bool>();
  const uint8_t* olp = old.const_data_ptr<uint8_t>();
  uint8_t* op = out.mutable_data_ptr<uint8_t>();
  const CompFormat fmt = make_comp_format(int(weight_bits), int(bits_per_cell), int(encoding),
                                          int(compensate_slices));
  const int64_t n = c ? cells.numel() / c : 0;
  const std::shared_ptr<const CompTableHolder> table =
      compensate_slices > 0 ? comp_table_for(fmt) : nullptr;
  at::parallel_for(0, n, 2048, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      compensate_one_weight(cp + i * c, hp + i * c, olp + i * c, fmt, compensate_slices > 0,
                            op + i * c, table ? &table->view : nullptr);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(crossbar_torch, CPU, m) { m.impl("compensate", &compensate_cpu); }

}  // namespace crossbar_torch
