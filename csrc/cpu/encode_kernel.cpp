// encode / CPU: integer weights (any shape, int32) -> cell levels uint8 (*shape, c).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../common.h"

namespace crossbar_torch {
namespace {

at::Tensor encode_cpu(const at::Tensor& q_in, int64_t weight_bits, int64_t bits_per_cell,
                      int64_t encoding) {
  check_format(weight_bits, bits_per_cell, encoding);
  check_dtype(q_in, at::kInt, "encode", "q");
  TORCH_CHECK(q_in.device().is_cpu(), "crossbar_torch.encode: q must be a CPU tensor here, got ",
              q_in.device());
  check_output_size(q_in.numel(), cells_for(weight_bits, bits_per_cell, encoding), "encode",
                    "the output's q.numel() * c cells");
  const at::Tensor q = q_in.contiguous();
  check_q_range(q, weight_bits);
  const int64_t S = slices_for(weight_bits, bits_per_cell, encoding);
  const int64_t c = cells_for(weight_bits, bits_per_cell, encoding);
  auto sizes = q.sizes().vec();
  sizes.push_back(c);
  at::Tensor out = at::empty(sizes, q.options().dtype(at::kByte));
  const int32_t* qp = q.const_data_ptr<int32_t>();
  uint8_t* op = out.mutable_data_ptr<uint8_t>();
  const int B = int(weight_bits), b = int(bits_per_cell), e = int(encoding), s = int(S);
  at::parallel_for(0, q.numel(), 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) encode_one(qp[i], B, b, e, s, op + i * c);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(crossbar_torch, CPU, m) { m.impl("encode", &encode_cpu); }

}  // namespace crossbar_torch
