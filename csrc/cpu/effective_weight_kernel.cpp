// effective_weight / CPU: out[o, index[o, k]] = float(decode(cells[o, k])) * scale[o].
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../common.h"

namespace crossbar_torch {
namespace {

at::Tensor effective_weight_cpu(const at::Tensor& cells_in, const at::Tensor& index_in,
                                const at::Tensor& scale_in, int64_t weight_bits,
                                int64_t bits_per_cell, int64_t encoding, bool check_values) {
  TORCH_CHECK(cells_in.device().is_cpu(),
              "crossbar_torch.effective_weight: cells must be a CPU tensor here, got ",
              cells_in.device());
  check_effective_weight(cells_in, index_in, scale_in, weight_bits, bits_per_cell, encoding);
  const int64_t out = cells_in.size(0), K = cells_in.size(1);
  const int64_t S = slices_for(weight_bits, bits_per_cell, encoding);
  const int64_t c = cells_for(weight_bits, bits_per_cell, encoding);
  const at::Tensor cells = cells_in.contiguous();
  const at::Tensor index = index_in.contiguous();
  const at::Tensor scale = scale_in.contiguous();
  if (check_values) check_effective_weight_values(cells, index, bits_per_cell);
  at::Tensor result = at::zeros({out, K}, cells.options().dtype(at::kFloat));
  const uint8_t* cp = cells.const_data_ptr<uint8_t>();
  const int64_t* ip = index.const_data_ptr<int64_t>();
  const float* sp = scale.const_data_ptr<float>();
  float* rp = result.mutable_data_ptr<float>();
  const int B = int(weight_bits), b = int(bits_per_cell), e = int(encoding), s = int(S);
  at::parallel_for(0, out, std::max<int64_t>(1, 4096 / std::max<int64_t>(K, 1)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      const float so = sp[o];
      for (int64_t k = 0; k < K; ++k) {
        const float q = static_cast<float>(decode_one(cp + (o * K + k) * c, B, b, e, s));
        rp[o * K + ip[o * K + k]] = q * so;
      }
    }
  });
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(crossbar_torch, CPU, m) { m.impl("effective_weight", &effective_weight_cpu); }

}  // namespace crossbar_torch
