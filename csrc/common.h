// Shared helpers of the crossbar_torch kernels: cell encoding, the packed bit layout of the
// crossbar state, the per-word transition counter, and argument checks.
//
// Everything marked XB_HD is compiled for both the CPU and the CUDA kernels, so the two
// devices run literally the same arithmetic (and both agree with
// crossbar_torch/ops/reference.py bit for bit).
//
// Conventions (see reference.py):
//   encoding: 0 differential, 1 twos_complement, 2 offset.
//   cells: uint8 (..., c), little end first; differential stores S positive slices, then S
//          negative ones.
//   state: int64 (pool, rows, bits_per_cell, words), words = ceil(cols / 64); bit j of word w in
//          plane p is bit p of the level of column 64 * w + j. written / stuck: int64
//          (pool, rows, words) bit masks in the same column layout.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include <cstdint>

#if defined(__CUDACC__)
#define XB_HD __host__ __device__ __forceinline__
#else
#define XB_HD inline
#endif

namespace crossbar_torch {

constexpr int64_t kDifferential = 0;
constexpr int64_t kTwosComplement = 1;
constexpr int64_t kOffset = 2;
constexpr int kMaxPlanes = 8;      // bits_per_cell <= 8 (cells are uint8)
constexpr int kNumStats = 6;  // writes, sets, resets, pulses, rows_programmed, set_pulses

// ---- encoding ------------------------------------------------------------------------------

XB_HD int64_t slices_for(int64_t weight_bits, int64_t bits_per_cell, int64_t encoding) {
  const int64_t magnitude = encoding == kDifferential ? weight_bits - 1 : weight_bits;
  return (magnitude + bits_per_cell - 1) / bits_per_cell;
}

XB_HD int64_t cells_for(int64_t weight_bits, int64_t bits_per_cell, int64_t encoding) {
  const int64_t s = slices_for(weight_bits, bits_per_cell, encoding);
  return encoding == kDifferential ? 2 * s : s;
}

XB_HD int64_t qmax_for(int64_t weight_bits) { return (int64_t(1) << (weight_bits - 1)) - 1; }

// Encode one integer weight (already range-checked) into its c cells.
XB_HD void encode_one(int64_t q, int weight_bits, int b, int encoding, int S, uint8_t* out) {
  const int64_t mask = (int64_t(1) << b) - 1;
  if (encoding == kDifferential) {
    const int64_t pos = q > 0 ? q : 0;
    const int64_t neg = q < 0 ? -q : 0;
    for (int i = 0; i < S; ++i) {
      out[i] = static_cast<uint8_t>((pos >> (i * b)) & mask);
      out[S + i] = static_cast<uint8_t>((neg >> (i * b)) & mask);
    }
  } else {
    const int64_t word = encoding == kTwosComplement
                             ? (q & ((int64_t(1) << weight_bits) - 1))
                             : q + qmax_for(weight_bits);
    for (int i = 0; i < S; ++i) out[i] = static_cast<uint8_t>((word >> (i * b)) & mask);
  }
}

// Decode the c cells of one weight. Never clamps: whatever the cells hold is decoded, then wrapped
// to int32 like `.to(torch.int32)`, exactly like the reference. The ops that read cells refuse
// levels outside [0, 2**bits_per_cell) before they get here (check_levels).
XB_HD int32_t decode_one(const uint8_t* cells, int weight_bits, int b, int encoding, int S) {
  int64_t q;
  if (encoding == kDifferential) {
    int64_t pos = 0, neg = 0;
    for (int i = 0; i < S; ++i) {
      pos += int64_t(cells[i]) << (i * b);
      neg += int64_t(cells[S + i]) << (i * b);
    }
    q = pos - neg;
  } else {
    int64_t w = 0;
    for (int i = 0; i < S; ++i) w += int64_t(cells[i]) << (i * b);
    if (encoding == kTwosComplement) {
      q = w - 2 * (w & (int64_t(1) << (weight_bits - 1)));  // top bit weighs -2**(B-1)
    } else {
      q = w - qmax_for(weight_bits);
    }
  }
  return static_cast<int32_t>(static_cast<uint32_t>(static_cast<uint64_t>(q)));
}

// ---- rounding-pinned arithmetic ------------------------------------------------------------

// A product rounded on its own: never fused into a multiply-add (nvcc fuses by default), so the
// CPU kernels, the CUDA kernels and the PyTorch references round the same way, bit for bit.
XB_HD double xb_mul(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

// ---- packed transition counting ------------------------------------------------------------

XB_HD int popcount64(uint64_t x) {
#if defined(__CUDA_ARCH__)
  return __popcll(x);
#else
  return __builtin_popcountll(x);
#endif
}

XB_HD int ctz64(uint64_t x) {
#if defined(__CUDA_ARCH__)
  return __ffsll(static_cast<long long>(x)) - 1;
#else
  return __builtin_ctzll(x);
#endif
}

struct WordStats {
  uint64_t changed;  // cells whose level changes (writes)
  uint64_t gt;       // new > old (SET)
  uint64_t lt;       // new < old (RESET)
  int64_t pulses;    // sum over the word of |new - old|
  int64_t set_pulses;  // the part of `pulses` on SET cells (new > old)
};

// One 64-column word of one crossbar row, all planes at once.
//   old[p], target[p]: plane p of the current / target levels; allowed: cells that take the
//   target (covered and not stuck); out[p]: the new levels (may alias old).
XB_HD WordStats transition_word(const uint64_t* old, const uint64_t* target, uint64_t allowed,
                                int planes, uint64_t* out) {
  uint64_t n[kMaxPlanes], o[kMaxPlanes];
  WordStats r;
  r.changed = 0;
  for (int p = 0; p < planes; ++p) {
    o[p] = old[p];
    n[p] = (target[p] & allowed) | (o[p] & ~allowed);
    r.changed |= n[p] ^ o[p];
  }
  // MSB-first comparator.
  uint64_t gt = 0, lt = 0, eq = ~uint64_t(0);
  for (int p = planes - 1; p >= 0; --p) {
    gt |= eq & n[p] & ~o[p];
    lt |= eq & ~n[p] & o[p];
    eq &= ~(n[p] ^ o[p]);
  }
  r.gt = gt;
  r.lt = lt;
  // |new - old| = max - min by ripple subtraction, LSB first.
  int64_t pulses = 0, set_pulses = 0;
  uint64_t borrow = 0;
  for (int p = 0; p < planes; ++p) {
    const uint64_t a = (n[p] & gt) | (o[p] & ~gt);  // max
    const uint64_t b = (o[p] & gt) | (n[p] & ~gt);  // min
    const uint64_t d = a ^ b ^ borrow;
    borrow = (~a & b) | (~(a ^ b) & borrow);
    pulses += int64_t(popcount64(d)) << p;
    set_pulses += int64_t(popcount64(d & gt)) << p;
    out[p] = n[p];
  }
  r.pulses = pulses;
  r.set_pulses = set_pulses;
  return r;
}

// Mask of the low `nbits` bits (0 <= nbits <= 64).
XB_HD uint64_t low_mask(int64_t nbits) {
  return nbits >= 64 ? ~uint64_t(0) : ((uint64_t(1) << nbits) - 1);
}

// ---- argument checks -----------------------------------------------------------------------

inline void check_format(int64_t weight_bits, int64_t bits_per_cell, int64_t encoding) {
  TORCH_CHECK(weight_bits >= 2 && weight_bits <= 16,
              "crossbar_torch: weight_bits must be in [2, 16], got ", weight_bits);
  TORCH_CHECK(bits_per_cell >= 1 && bits_per_cell <= 8,
              "crossbar_torch: bits_per_cell must be in [1, 8], got ", bits_per_cell);
  TORCH_CHECK(encoding >= 0 && encoding <= 2,
              "crossbar_torch: encoding must be 0 (differential), 1 (twos_complement) or "
              "2 (offset), got ", encoding);
}

// The packed storage of cells (crossbar_torch/packing.py): a b-bit level in a slot of s bits,
// the smallest power of two >= b, so 8 / s slots a byte. Checks b in [1, 8]; returns s.
inline int checked_slot_bits(int64_t bits_per_cell, const char* op) {
  TORCH_CHECK(bits_per_cell >= 1 && bits_per_cell <= 8, "crossbar_torch.", op,
              ": bits_per_cell must be in [1, 8], got ", bits_per_cell);
  int s = 1;
  while (s < bits_per_cell) s *= 2;
  return s;
}

// Bytes a weight's `cells` levels take in slots of s bits (packing.packed_width).
inline int64_t packed_width(int64_t cells, int s) {
  const int64_t per = 8 / s;
  return (cells + per - 1) / per;
}

inline void check_dtype(const at::Tensor& t, at::ScalarType dtype, const char* op,
                        const char* name) {
  TORCH_CHECK(t.scalar_type() == dtype, "crossbar_torch.", op, ": ", name, " must be ",
              c10::toString(dtype), ", got ", t.scalar_type());
}

inline void check_device(const at::Tensor& t, const at::Tensor& ref, const char* op,
                         const char* name, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), "crossbar_torch.", op, ": ", name, " is on ",
              t.device(), " but ", ref_name, " is on ", ref.device(),
              " (all tensors must be on the same device)");
}

inline void check_contiguous(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_contiguous(), "crossbar_torch.", op, ": ", name,
              " must be contiguous (it is updated in place)");
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* op, const char* name,
                      const char* shape) {
  TORCH_CHECK(t.dim() == dim, "crossbar_torch.", op, ": ", name, " must have shape ", shape,
              ", got ", t.sizes());
}

inline void check_size(const at::Tensor& t, int64_t d, int64_t expected, const char* op,
                       const char* name, const char* what) {
  TORCH_CHECK(t.size(d) == expected, "crossbar_torch.", op, ": ", name, ".size(", d,
              ") must equal ", what, " = ", expected, ", got ", t.size(d), " (shape ",
              t.sizes(), ")");
}

// Integer weights must lie in the symmetric range [-qmax, qmax].
inline void check_q_range(const at::Tensor& q, int64_t weight_bits) {
  if (q.numel() == 0) return;
  const int64_t qmax = qmax_for(weight_bits);
  auto mm = at::aminmax(q);
  const int64_t lo = std::get<0>(mm).item<int64_t>();
  const int64_t hi = std::get<1>(mm).item<int64_t>();
  TORCH_CHECK(lo >= -qmax && hi <= qmax, "crossbar_torch.encode: q out of the symmetric range [-",
              qmax, ", ", qmax, "] for weight_bits=", weight_bits, " (min ", lo, ", max ", hi, ")");
}

// index (out, K) int64 entries must lie in [0, K).
inline void check_index_range(const at::Tensor& index, const char* op) {
  if (index.numel() == 0) return;
  const int64_t K = index.size(1);
  auto mm = at::aminmax(index);
  const int64_t lo = std::get<0>(mm).item<int64_t>();
  const int64_t hi = std::get<1>(mm).item<int64_t>();
  TORCH_CHECK(lo >= 0 && hi < K, "crossbar_torch.", op, ": index entries must be in [0, K-1] = [0, ",
              K - 1, "] (a permutation of each row), got min ", lo, ", max ", hi);
}

// ---- per-op argument validation (shared by the CPU and CUDA kernels) -----------------------

// Each op checks its arguments in two steps: first what the metadata says (format, dtypes, same
// device, shapes, sizes that fit int64), then, on the contiguous copies the kernel reads, their
// values (`*_values`). A huge expanded (stride 0) input thus fails when it is materialized,
// before any pass over its elements. The caller checks the device type it runs on.

// sort_and_encode: metadata.
void check_sort_and_encode(const at::Tensor& w, const at::Tensor& scale, const at::Tensor& index,
                           int64_t weight_bits, int64_t bits_per_cell, int64_t encoding);
// sort_and_encode: finite weights, usable scales, each index row a permutation of [0, K).
void check_sort_and_encode_values(const at::Tensor& w, const at::Tensor& scale,
                                  const at::Tensor& index);

// effective_weight: metadata. `allow_packed` (the host kernel): cells may also be a layer's
// packed buffer, (out, K, packed width) (crossbar_torch/packing.py).
void check_effective_weight(const at::Tensor& cells, const at::Tensor& index,
                            const at::Tensor& scale, int64_t weight_bits, int64_t bits_per_cell,
                            int64_t encoding, bool allow_packed = false);
// effective_weight: each index row a permutation of [0, K), cell levels in [0, 2**b) (packed:
// every slot's).
void check_effective_weight_values(const at::Tensor& cells, const at::Tensor& index,
                                   int64_t bits_per_cell, bool packed = false);

// Packed levels (crossbar_torch/packing.py): every slot must hold a level below 2**b (with
// b a power of two, or one cell a byte, the bytes' own check; b = 3: each nibble's).
void check_packed_levels(const at::Tensor& packed, int64_t bits_per_cell, const char* op,
                         const char* name);

// Error unless program_layer's pinned levels are in [0, 2^b - 1] or 255 (max_pinned: the
// largest level other than 255, -1 when there is none).
void check_pinned_fit(int64_t max_pinned, int64_t bits_per_cell);

// Whether every element of a floating tensor is finite (true when empty). The sum first, one
// pass without a temporary: it is finite only when every element is (a NaN or an infinity
// makes it NaN or infinite); where it is not (also when finite elements overflow it), the
// element-wise test decides. A seventh of the time of at::isfinite(t).all() on ViT-Base's
// 3072 x 3072 factors, checked once per layer.
bool all_finite(const at::Tensor& t);
// Error unless every cell level fits in bits_per_cell bits (max_level: the largest level of
// the tensor `name` given to `op`).
void check_levels_fit(int64_t max_level, int64_t bits_per_cell, const char* op = "program_layer",
                      const char* name = "cells");

// Error unless every level of the uint8 tensor `cells` (any shape, strides, device) lies in
// [0, 2**bits_per_cell): a level beyond would decode to a value no cell can hold.
void check_levels(const at::Tensor& cells, int64_t bits_per_cell, const char* op,
                  const char* name);

// Error unless each row of index (out, K), already range-checked, is a permutation of [0, K).
void check_index_permutation(const at::Tensor& index, const char* op);
// Each row's inverse of a checked permutation index (int64 (out, K), contiguous):
// inverse[o, index[o, k]] = k; on the host in the check's own pass.
at::Tensor inverse_permutation(const at::Tensor& index, const char* op);

// Error unless an output of `numel` elements of `per` items each can be indexed with int64
// (what): sizes of expanded (stride 0) inputs may be huge without any memory behind them.
void check_output_size(int64_t numel, int64_t per, const char* op, const char* what);

// Rule 25's filter weights: absent, or float64 (out,), every entry in [1e-12, 1e12] (the
// rule's clamp: a weight of 0 would divide the penalty by zero, one below 0 reward error, and
// within these bounds every penalty, window and cost of rules 23 and 24 stays finite and fits
// int64 where it is converted).
constexpr double kMinFilterWeight = 1e-12, kMaxFilterWeight = 1e12;
void check_filter_weight(const std::optional<at::Tensor>& filter_weight, int64_t out,
                         const char* op);

// Clears the bits beyond `cols` in the last word of state and written, as the reference
// does when it repacks them.
void clear_padding_bits(at::Tensor& state, at::Tensor& written, int64_t cols);

}  // namespace crossbar_torch
