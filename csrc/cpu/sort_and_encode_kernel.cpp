// sort_and_encode / CPU: cells[o, k] = encode(clamp(rint(w[o, index[o, k]] / scale[o]), +-qmax)).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cfenv>
#include <cmath>

#include "../common.h"

namespace crossbar_torch {
namespace {

at::Tensor sort_and_encode_cpu(const at::Tensor& w_in, const at::Tensor& scale_in,
                               const at::Tensor& index_in, int64_t weight_bits,
                               int64_t bits_per_cell, int64_t encoding, bool check_values) {
  TORCH_CHECK(w_in.device().is_cpu(),
              "crossbar_torch.sort_and_encode: w must be a CPU tensor here, got ", w_in.device());
  check_sort_and_encode(w_in, scale_in, index_in, weight_bits, bits_per_cell, encoding);
  const int64_t out = w_in.size(0), K = w_in.size(1);
  const at::Tensor w = w_in.contiguous();
  const at::Tensor scale = scale_in.contiguous();
  const at::Tensor index = index_in.contiguous();
  if (check_values) check_sort_and_encode_values(w, scale, index);
  const int64_t S = slices_for(weight_bits, bits_per_cell, encoding);
  const int64_t c = cells_for(weight_bits, bits_per_cell, encoding);
  at::Tensor cells = at::empty({out, K, c}, w.options().dtype(at::kByte));
  const float* wp = w.const_data_ptr<float>();
  const float* sp = scale.const_data_ptr<float>();
  const int64_t* ip = index.const_data_ptr<int64_t>();
  uint8_t* cp = cells.mutable_data_ptr<uint8_t>();
  const float qmax = static_cast<float>(qmax_for(weight_bits));
  const int B = int(weight_bits), b = int(bits_per_cell), e = int(encoding), s = int(S);
  TORCH_CHECK(std::fegetround() == FE_TONEAREST,
              "crossbar_torch.sort_and_encode: the floating-point rounding mode must be "
              "round-to-nearest");
  at::parallel_for(0, out, std::max<int64_t>(1, 4096 / std::max<int64_t>(K, 1)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      const float so = sp[o];
      for (int64_t k = 0; k < K; ++k) {
        // float32 division, round half to even (nearbyint in the default rounding mode), clamp.
        float v = std::nearbyint(wp[o * K + ip[o * K + k]] / so);
        v = std::fmin(std::fmax(v, -qmax), qmax);
        encode_one(static_cast<int64_t>(v), B, b, e, s, cp + (o * K + k) * c);
      }
    }
  });
  return cells;
}

}  // namespace

TORCH_LIBRARY_IMPL(crossbar_torch, CPU, m) { m.impl("sort_and_encode", &sort_and_encode_cpu); }

}  // namespace crossbar_torch
