// sort_and_encode / CPU: cells[o, k] = encode(clamp(rint(w[o, index[o, k]] / scale[o]), +-qmax)).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cfenv>
#include <cmath>
#include <cstring>
#include <vector>

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
  // The c cells of every level, once per call (2 * qmax + 1 rows, padded to 16 or 32 bytes):
  // a weight's cells are then one fixed-size copy instead of c shifts. The copy may run past
  // the weight's c cells into the next weights', which their own copies overwrite just after;
  // near the end of a row the copy is exactly c (rows are split across threads).
  const int64_t qm = qmax_for(weight_bits), levels = 2 * qm + 1;
  const int64_t pad = c <= 16 ? 16 : 32;
  const bool by_table = c <= 32 && levels * pad <= (int64_t(1) << 22) && levels <= out * K;
  std::vector<uint8_t> table;
  if (by_table) {
    table.assign(size_t(levels * pad), 0);
    for (int64_t v = -qm; v <= qm; ++v) encode_one(v, B, b, e, s, table.data() + (v + qm) * pad);
  }
  const uint8_t* tp = table.data();
  at::parallel_for(0, out, std::max<int64_t>(1, 4096 / std::max<int64_t>(K, 1)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      const float so = sp[o];
      const float* wrow = wp + o * K;
      const int64_t* irow = ip + o * K;
      uint8_t* crow = cp + o * K * c;
      for (int64_t k = 0; k < K; ++k) {
        // float32 division, round half to even (nearbyint in the default rounding mode), clamp.
        float v = std::nearbyint(wrow[irow[k]] / so);
        v = std::fmin(std::fmax(v, -qmax), qmax);
        const int64_t q = static_cast<int64_t>(v);
        if (!by_table) {
          encode_one(q, B, b, e, s, crow + k * c);
        } else if ((k + 1) * c + (pad - c) > K * c) {  // the copy would leave the row
          std::memcpy(crow + k * c, tp + (q + qm) * pad, size_t(c));
        } else if (pad == 16) {
          std::memcpy(crow + k * c, tp + (q + qm) * 16, 16);
        } else {
          std::memcpy(crow + k * c, tp + (q + qm) * 32, 32);
        }
      }
    }
  });
  return cells;
}

}  // namespace

TORCH_LIBRARY_IMPL(crossbar_torch, CPU, m) { m.impl("sort_and_encode", &sort_and_encode_cpu); }

}  // namespace crossbar_torch
