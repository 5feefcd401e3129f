// feedback_refine / CPU: rule 24, refinement sweeps of coordinate descent on
// J = sum_o (q_o - t_o)^T Hs (q_o - t_o) + write_penalty * (cells differing from the predecessor).
// Within one half of a sweep (the filters of even, then odd, chain depth) a filter's write
// terms involve only filters of the other half, which do not move meanwhile: the filters of a
// half run in parallel, each through its sorted positions in order, bit for bit what the
// reference (feedback_reference.feedback_refine) computes, in scalar, AVX2 or AVX-512 code
// (vector_isa.h).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "vector_isa.h"
#ifdef XB_X86_VECTOR
#include <immintrin.h>
#endif

#include "../common.h"
#include "../feedback_quantize_args.h"
#include "../feedback_refine_args.h"
#include "../program_row.h"
#include "cell_codes.h"
#include "cell_codes_wide.h"

namespace crossbar_torch {
namespace {

constexpr int kRefineWindow = 3;  // a move is at most this many LSB (rule 24)

// inlined into each instruction-set variant below, so each compiles with that variant's
// instructions (the POPCNT instruction for the write counts, AVX-512 for the row updates)
#define XB_REFINE_INLINE inline __attribute__((always_inline))

// ---- g = (q - t) Hs, in rule 24's order --------------------------------------------------------
// Each element's sum runs over k in increasing order from 0.0, a product and a sum per step
// (-ffp-contract=off: no fused multiply-add). A GEMM's blocking keeps that order as long as, for
// every element, the k panels come in increasing order: the k panels are the outer loop and g is
// the running sum between them. Four filters by eight columns are carried in registers through
// a panel (each load of Hs serves four filters); the Hs panel (kKPanel x kJPanel) stays in cache
// while every filter of the group goes through it.
constexpr int64_t kKPanel = 256, kJPanel = 512;

template <int MR>
inline __attribute__((always_inline)) void product_panel(double* g, const double* d,
                                                         const double* hs, int64_t K,
                                                         int64_t k0, int64_t k1, int64_t j0,
                                                         int64_t j1) {
  int64_t j = j0;
  for (; j + 8 <= j1; j += 8) {
    double acc[MR][8];
    for (int r = 0; r < MR; ++r) {
      for (int c = 0; c < 8; ++c) acc[r][c] = g[r * K + j + c];
    }
    for (int64_t k = k0; k < k1; ++k) {
      const double* hk = hs + k * K + j;
      for (int r = 0; r < MR; ++r) {
        const double dk = d[r * K + k];
        for (int c = 0; c < 8; ++c) acc[r][c] = acc[r][c] + dk * hk[c];
      }
    }
    for (int r = 0; r < MR; ++r) {
      for (int c = 0; c < 8; ++c) g[r * K + j + c] = acc[r][c];
    }
  }
  for (; j < j1; ++j) {
    for (int r = 0; r < MR; ++r) {
      double a = g[r * K + j];
      for (int64_t k = k0; k < k1; ++k) a = a + d[r * K + k] * hs[k * K + j];
      g[r * K + j] = a;
    }
  }
}

// Filters [o0, o1) of one group through one (k, j) panel: four at a time, then one at a time.
inline __attribute__((always_inline)) void product_filters(double* g, const double* d,
                                                           const double* hs, int64_t K,
                                                           int64_t o0, int64_t o1, int64_t k0,
                                                           int64_t k1, int64_t j0, int64_t j1) {
  int64_t o = o0;
  for (; o + 4 <= o1; o += 4) product_panel<4>(g + o * K, d + o * K, hs, K, k0, k1, j0, j1);
  for (; o < o1; ++o) product_panel<1>(g + o * K, d + o * K, hs, K, k0, k1, j0, j1);
}

void product_filters_plain(double* g, const double* d, const double* hs, int64_t K, int64_t o0,
                           int64_t o1, int64_t k0, int64_t k1, int64_t j0, int64_t j1) {
  product_filters(g, d, hs, K, o0, o1, k0, k1, j0, j1);
}

#ifdef XB_X86_VECTOR
// Four filters by eight columns in eight registers through the whole k panel: a product and a
// sum per element and step, as product_panel computes them (_mm256_mul_pd then _mm256_add_pd:
// no fused multiply-add), each load of Hs serving four filters. The columns past the last
// multiple of 8 and the filters past the last multiple of 4 go through product_panel.
__attribute__((target("avx2"))) void product_filters_avx2(double* g, const double* d,
                                                          const double* hs, int64_t K,
                                                          int64_t o0, int64_t o1, int64_t k0,
                                                          int64_t k1, int64_t j0, int64_t j1) {
  int64_t o = o0;
  for (; o + 4 <= o1; o += 4) {
    double* g0 = g + o * K;
    const double* d0 = d + o * K;
    int64_t j = j0;
    for (; j + 8 <= j1; j += 8) {
      __m256d a0 = _mm256_loadu_pd(g0 + j), a1 = _mm256_loadu_pd(g0 + j + 4);
      __m256d b0 = _mm256_loadu_pd(g0 + K + j), b1 = _mm256_loadu_pd(g0 + K + j + 4);
      __m256d c0 = _mm256_loadu_pd(g0 + 2 * K + j), c1 = _mm256_loadu_pd(g0 + 2 * K + j + 4);
      __m256d e0 = _mm256_loadu_pd(g0 + 3 * K + j), e1 = _mm256_loadu_pd(g0 + 3 * K + j + 4);
      for (int64_t k = k0; k < k1; ++k) {
        const double* hk = hs + k * K + j;
        const __m256d h0 = _mm256_loadu_pd(hk), h1 = _mm256_loadu_pd(hk + 4);
        const __m256d da = _mm256_set1_pd(d0[k]), db = _mm256_set1_pd(d0[K + k]);
        const __m256d dc = _mm256_set1_pd(d0[2 * K + k]), de = _mm256_set1_pd(d0[3 * K + k]);
        a0 = _mm256_add_pd(a0, _mm256_mul_pd(da, h0));
        a1 = _mm256_add_pd(a1, _mm256_mul_pd(da, h1));
        b0 = _mm256_add_pd(b0, _mm256_mul_pd(db, h0));
        b1 = _mm256_add_pd(b1, _mm256_mul_pd(db, h1));
        c0 = _mm256_add_pd(c0, _mm256_mul_pd(dc, h0));
        c1 = _mm256_add_pd(c1, _mm256_mul_pd(dc, h1));
        e0 = _mm256_add_pd(e0, _mm256_mul_pd(de, h0));
        e1 = _mm256_add_pd(e1, _mm256_mul_pd(de, h1));
      }
      _mm256_storeu_pd(g0 + j, a0), _mm256_storeu_pd(g0 + j + 4, a1);
      _mm256_storeu_pd(g0 + K + j, b0), _mm256_storeu_pd(g0 + K + j + 4, b1);
      _mm256_storeu_pd(g0 + 2 * K + j, c0), _mm256_storeu_pd(g0 + 2 * K + j + 4, c1);
      _mm256_storeu_pd(g0 + 3 * K + j, e0), _mm256_storeu_pd(g0 + 3 * K + j + 4, e1);
    }
    if (j < j1) product_panel<4>(g0, d0, hs, K, k0, k1, j, j1);
  }
  for (; o < o1; ++o) product_panel<1>(g + o * K, d + o * K, hs, K, k0, k1, j0, j1);
}
#endif

#ifdef XB_X86_VECTOR
// Eight filters by sixteen columns in sixteen registers through the whole k panel (each load of
// Hs serves eight filters), the same product and sum per element and step as product_panel
// (_mm512_mul_pd then _mm512_add_pd). The panel's whole 16-column blocks come packed
// (pack_panel): read in place, its rows lie K doubles apart, and the loads of Hs stalled on
// the TLB and on L1 sets (a third of the kernel on a 3072-input layer). The filters past the
// last multiple of 8 go through product_filters_avx2, the columns past the last whole block
// through product_panel, both from Hs in place.
__attribute__((target("avx512f"))) void product_filters_avx512(
    double* g, const double* d, const double* hs, const double* packed, int64_t K, int64_t o0,
    int64_t o1, int64_t k0, int64_t k1, int64_t j0, int64_t j1) {
  constexpr int R = 8;
  const int64_t whole = j0 + (j1 - j0) / 16 * 16, rows = k1 - k0;
  int64_t o = o0;
  for (; o + R <= o1; o += R) {
    double* g0 = g + o * K;
    const double* d0 = d + o * K;
    for (int64_t j = j0; j < whole; j += 16) {
      const double* pb = packed + (j - j0) * rows;  // block (j - j0) / 16: rows x 16
      __m512d lo[R], hi[R];
      for (int r = 0; r < R; ++r) {
        lo[r] = _mm512_loadu_pd(g0 + r * K + j);
        hi[r] = _mm512_loadu_pd(g0 + r * K + j + 8);
      }
      for (int64_t k = k0; k < k1; ++k) {
        const double* hk = pb + (k - k0) * 16;
        const __m512d h0 = _mm512_load_pd(hk), h1 = _mm512_load_pd(hk + 8);
        for (int r = 0; r < R; ++r) {
          const __m512d dk = _mm512_set1_pd(d0[r * K + k]);
          lo[r] = _mm512_add_pd(lo[r], _mm512_mul_pd(dk, h0));
          hi[r] = _mm512_add_pd(hi[r], _mm512_mul_pd(dk, h1));
        }
      }
      for (int r = 0; r < R; ++r) {
        _mm512_storeu_pd(g0 + r * K + j, lo[r]);
        _mm512_storeu_pd(g0 + r * K + j + 8, hi[r]);
      }
    }
    if (whole < j1) product_panel<R>(g0, d0, hs, K, k0, k1, whole, j1);
  }
  if (o < o1) product_filters_avx2(g, d, hs, K, o, o1, k0, k1, j0, j1);
}
#endif

// The panel's whole 16-column blocks, each rows x 16 contiguous (block b at b * 16 * rows).
void pack_panel(const double* hs, int64_t K, int64_t k0, int64_t k1, int64_t j0, int64_t j1,
                double* packed) {
  const int64_t rows = k1 - k0;
  for (int64_t j = j0; j + 16 <= j1; j += 16) {
    double* pb = packed + (j - j0) * rows;
    for (int64_t k = k0; k < k1; ++k) std::copy(hs + k * K + j, hs + k * K + j + 16,
                                                 pb + (k - k0) * 16);
  }
}

using ProductFn = void (*)(double*, const double*, const double*, int64_t, int64_t, int64_t,
                           int64_t, int64_t, int64_t, int64_t);

ProductFn pick_product(VectorIsa isa) {
#ifdef XB_X86_VECTOR
  if (isa != VectorIsa::kScalar) return product_filters_avx2;
#endif
  return product_filters_plain;
}

// g = (q - t) Hs of every filter with its group's Hs (float64 (out, K)).
at::Tensor running_products(const at::Tensor& t, const at::Tensor& hs, const at::Tensor& q,
                            VectorIsa isa) {
  const ProductFn product = pick_product(isa);
  const bool wide = isa == VectorIsa::kAvx512;
  // the AVX-512 kernel's packed panel (64-byte aligned: its loads are aligned)
  std::vector<double> packed_store(wide ? size_t(kKPanel * kJPanel + 8) : 0);
  double* packed = wide ? packed_store.data() + (8 - (reinterpret_cast<uintptr_t>(
                                                     packed_store.data()) / 8) % 8) % 8
                        : nullptr;
  const int64_t out = t.size(0), K = t.size(1), groups = hs.size(0), per = out / groups;
  const at::Tensor d = q.to(at::kDouble) - t;  // exact conversion, then one rounded difference
  at::Tensor g = at::zeros({out, K}, t.options());
  const double* dp = d.const_data_ptr<double>();
  const double* hp = hs.const_data_ptr<double>();
  double* gp = g.mutable_data_ptr<double>();
  // the kernels take eight (AVX-512) or four filters at a time: chunks of whole such sets
  const int64_t unit = isa == VectorIsa::kAvx512 ? 8 : 4, units = (per + unit - 1) / unit;
  for (int64_t grp = 0; grp < groups; ++grp) {
    for (int64_t k0 = 0; k0 < K; k0 += kKPanel) {  // increasing k: each sum keeps its order
      const int64_t k1 = std::min<int64_t>(K, k0 + kKPanel);
      for (int64_t j0 = 0; j0 < K; j0 += kJPanel) {
        const int64_t j1 = std::min<int64_t>(K, j0 + kJPanel);
        const double* h = hp + grp * K * K;
        if (wide) pack_panel(h, K, k0, k1, j0, j1, packed);
        at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
          const int64_t o0 = grp * per + begin * unit;
          const int64_t o1 = std::min<int64_t>((grp + 1) * per, grp * per + end * unit);
#ifdef XB_X86_VECTOR
          if (wide) return product_filters_avx512(gp, dp, h, packed, K, o0, o1, k0, k1, j0, j1);
#endif
          product(gp, dp, h, K, o0, o1, k0, k1, j0, j1);
        });
      }
    }
  }
  return g;
}

// ---- the sweeps ------------------------------------------------------------------------------

// What one half-sweep of rule 24 reads and writes (feedback_refine_cpu's tensors).
struct SweepArgs {
  const double* hs;      // (groups, K, K)
  const double* diag;    // (groups, K): Hs's diagonals
  double* g;             // (out, K): the running products
  int32_t* q;            // (out, K), original order
  const int64_t* index;  // (out, K): sort index
  const int64_t* pred;   // (out,): -1 none
  const int64_t* succ;   // (out,): -1 none
  const double* a;       // (out,): rule 25's filter weights, or null
  const CellCodes* codes;
  int b;
  int64_t K, per_group;
  double write_penalty;
};

// g[j] = g[j] + dm * h[j] for every j (a product, then a sum: the reference's rounding).
inline void add_scaled_plain(double* g, const double* h, double dm, int64_t K) {
  for (int64_t j = 0; j < K; ++j) g[j] = g[j] + dm * h[j];
}

#ifdef XB_X86_VECTOR
__attribute__((target("avx512f"))) void add_scaled_avx512(double* g, const double* h, double dm,
                                                         int64_t K) {
  const __m512d m = _mm512_set1_pd(dm);
  int64_t j = 0;
  for (; j + 16 <= K; j += 16) {
    const __m512d x0 = _mm512_add_pd(_mm512_loadu_pd(g + j),
                                     _mm512_mul_pd(m, _mm512_loadu_pd(h + j)));
    const __m512d x1 = _mm512_add_pd(_mm512_loadu_pd(g + j + 8),
                                     _mm512_mul_pd(m, _mm512_loadu_pd(h + j + 8)));
    _mm512_storeu_pd(g + j, x0);
    _mm512_storeu_pd(g + j + 8, x1);
  }
  for (; j < K; ++j) g[j] = g[j] + dm * h[j];
}
#endif

// What filter o's sweep reads and writes: its group's Hs and diagonal, its running products,
// integers and sort index, and its two neighbours (-1: none).
struct SweepFilter {
  const double* h;
  const double* dg;
  double* row;
  int32_t* qo;
  const int64_t* io;
  int64_t nb[2];
};

inline SweepFilter sweep_filter(const SweepArgs& s, int64_t o) {
  const int64_t K = s.K, grp = o / s.per_group;
  return {s.hs + grp * K * K, s.diag + grp * K, s.g + o * K, s.q + o * K, s.index + o * K,
          {s.pred[o], s.succ[o]}};
}

// Filters mine[0 .. n) of one half, each through its sorted positions in order: rule 24's moves
// (the scalar and AVX2 paths; the AVX-512 one is sweep_avx512, below).
XB_REFINE_INLINE void sweep_filters(const SweepArgs& s, const int64_t* mine, int64_t n) {
  static const int kDeltas[2 * kRefineWindow] = {-1, 1, -2, 2, -3, 3};  // the tie order
  const CellCodes& codes = *s.codes;
  const int64_t K = s.K, qmax = codes.qmax;
  auto differing = [&](int64_t v, int64_t w) {
    return cells_differing(codes.code[size_t(v + qmax)] ^ codes.code[size_t(w + qmax)], codes,
                           s.b);
  };
  for (int64_t i = 0; i < n; ++i) {
    const int64_t o = mine[i];
    const auto [h, dg, row, qo, io, nb] = sweep_filter(s, o);
    for (int64_t p = 0; p < K; ++p) {
      const int64_t k = io[p];
      const int64_t c = qo[k];
      int64_t ref[2], own[2], owned = 0;
      for (int r = 0; r < 2; ++r) {
        if (nb[r] < 0) continue;
        ref[r] = s.q[nb[r] * K + s.index[nb[r] * K + p]];
        own[r] = differing(c, ref[r]);
        owned += own[r];
      }
      const double gk = row[k], hkk = dg[k];
      // Most weights, once the first sweep is done: no move can cost below 0, so the six
      // candidates need not be priced. With no cell differing from the neighbours (owned == 0)
      // every write term is >= 0; with hkk >= 2 |gk| every error term is >= 0 as rounded:
      // +-2 gk + hkk and +-4 gk + 4 hkk (exact products) are >= 0 before their one rounding,
      // fl(9 hkk) >= fl(6 |gk|) since 9 hkk >= 18 |gk| and rounding is monotone, and a
      // weight a[o] > 0 keeps the sign. (2 |gk| is exact; NaN or overflow fails the test.)
      if (owned == 0 && hkk >= 2.0 * std::fabs(gk)) continue;
      double best = 0.0;
      int move = 0;
      for (int delta : kDeltas) {
        const int64_t v = c + delta;
        if (v < -qmax || v > qmax) continue;
        int64_t dw = 0;
        for (int r = 0; r < 2; ++r) {
          if (nb[r] >= 0) dw += differing(v, ref[r]) - own[r];
        }
        double err = double(2 * delta) * gk + double(delta * delta) * hkk;
        if (s.a) err = s.a[o] * err;
        const double cost = err + s.write_penalty * double(dw);
        if (cost < best) best = cost, move = delta;
      }
      if (!move) continue;
      qo[k] = int32_t(c + move);
      add_scaled_plain(row, h + k * K, double(move), K);
    }
  }
}

#ifdef XB_X86_VECTOR
// ---- rule 24's moves, priced eight candidates at a time (AVX-512) ----------------------------
// A weight's candidates c + delta, delta = -3 .. 3, are the lanes 0 .. 6 of one window of the
// cell codes (lane i: delta = i - 3; lane 3 is c itself, whose counts are the `own` terms; lane
// 7 is never a candidate). Each lane's write count, error and cost are the scalar loop's
// operations on the same values (products and sums rounded one by one, in its order), and the
// least cost below 0 is picked among the lanes in the scalar loop's tie order: the same move.
// Priced one by one, the six candidates (a code look-up, a count and a branch apiece for each
// neighbour) were most of a sweep once the first had moved what it would.

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // cell_codes_wide.h says why
// The lane of the first set bit of `m` in the scalar loop's tie order (delta -1, 1, -2, 2, -3,
// 3: lanes 2, 4, 1, 5, 0, 6).
inline int first_in_tie_order(unsigned m) {
  static const int kOrder[6] = {2, 4, 1, 5, 0, 6};
  for (int lane : kOrder) {
    if (m >> lane & 1u) return lane;
  }
  return 3;  // none: no move
}

XB_WIDE_CODES_TARGET void sweep_avx512(const SweepArgs& s, const int64_t* mine, int64_t n) {
  const CellCodes& codes = *s.codes;
  const int64_t K = s.K, qmax = codes.qmax;
  const __m512i lsb = _mm512_set1_epi64(int64_t(codes.lsb));
  const __m512d two_delta = _mm512_setr_pd(-6, -4, -2, 0, 2, 4, 6, 8);
  const __m512d delta_sq = _mm512_setr_pd(9, 4, 1, 0, 1, 4, 9, 16);
  const __m512d lam = _mm512_set1_pd(s.write_penalty), zero = _mm512_setzero_pd();
  const __m512i lane3 = _mm512_set1_epi64(3);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t o = mine[i];
    const auto [h, dg, row, qo, io, nb] = sweep_filter(s, o);
    const __m512d aw = _mm512_set1_pd(s.a ? s.a[o] : 1.0);
    for (int64_t p = 0; p < K; ++p) {
      const int64_t k = io[p];
      const int64_t c = qo[k];
      const __m512i window = _mm512_loadu_si512(codes.codes_from(c - 3));
      __m512i count = _mm512_setzero_si512();
      for (int r = 0; r < 2; ++r) {
        if (nb[r] < 0) continue;
        const int64_t ref = s.q[nb[r] * K + s.index[nb[r] * K + p]];
        const __m512i rc = _mm512_set1_epi64(int64_t(codes.code[size_t(ref + qmax)]));
        count = _mm512_add_epi64(count, lanes_differing(
                                            _mm512_xor_si512(window, rc), lsb, s.b));
      }
      const __m512d dw = _mm512_cvtepi64_pd(
          _mm512_sub_epi64(count, _mm512_permutexvar_epi64(lane3, count)));
      __m512d err = _mm512_add_pd(_mm512_mul_pd(two_delta, _mm512_set1_pd(row[k])),
                                  _mm512_mul_pd(delta_sq, _mm512_set1_pd(dg[k])));
      if (s.a) err = _mm512_mul_pd(aw, err);
      const __m512d cost = _mm512_add_pd(err, _mm512_mul_pd(lam, dw));
      // lanes 0 .. 6 but 3, those whose value c + lane - 3 lies in [-qmax, qmax]
      const int64_t lo = std::max<int64_t>(0, 3 - qmax - c);
      const int64_t hi = std::min<int64_t>(6, qmax - c + 3);
      const unsigned in_range = hi < lo ? 0u : ((2u << hi) - 1u) & ~((1u << lo) - 1u);
      const __mmask8 below = _mm512_mask_cmp_pd_mask(__mmask8(in_range & 0x77u), cost, zero,
                                                     _CMP_LT_OQ);
      if (!below) continue;
      const double least = _mm512_mask_reduce_min_pd(below, cost);
      const __mmask8 ties = _mm512_mask_cmp_pd_mask(below, cost, _mm512_set1_pd(least),
                                                    _CMP_EQ_OQ);
      const int move = first_in_tie_order(ties) - 3;
      qo[k] = int32_t(c + move);
      add_scaled_avx512(row, h + k * K, double(move), K);
    }
  }
}
#pragma GCC diagnostic pop
#endif

using SweepFn = void (*)(const SweepArgs&, const int64_t*, int64_t);

void sweep_plain(const SweepArgs& s, const int64_t* mine, int64_t n) {
  sweep_filters(s, mine, n);
}

#ifdef XB_X86_VECTOR
// The write counts are popcounts: without the POPCNT instruction (x86-64's baseline has none)
// each is a libgcc call, 6% of a ViT-Base FFN layer's refinement. (The AVX2 path's sweeps need
// no AVX2: their row updates are the plain loop, which SSE2 vectorizes.)
__attribute__((target("popcnt"))) void sweep_avx2(const SweepArgs& s, const int64_t* mine,
                                                  int64_t n) {
  sweep_filters(s, mine, n);
}
#endif

SweepFn pick_sweep(VectorIsa isa) {
#ifdef XB_X86_VECTOR
  // (an AVX-512 CPU without wide_codes_supported's instructions takes the AVX2 path's sweeps)
  if (isa == VectorIsa::kAvx512 && wide_codes_supported()) return sweep_avx512;
  return pick_variant<SweepFn>(isa, sweep_plain, sweep_avx2, sweep_avx2);
#else
  return sweep_plain;
#endif
}

}  // namespace

// (q, the forms: filter o's d_o . g_o after the sweeps, the reprogramming's warning reads them)
std::tuple<at::Tensor, at::Tensor> feedback_refine_cpu(const at::Tensor& target_in,
                                                       const at::Tensor& hs_in,
                               const at::Tensor& q_in, const at::Tensor& pred,
                               const at::Tensor& sort_index_in, int64_t weight_bits,
                               int64_t bits_per_cell, int64_t encoding, double write_penalty,
                               int64_t sweeps, const std::optional<at::Tensor>& filter_weight) {
  TORCH_CHECK(target_in.device().is_cpu(),
              "crossbar_torch.feedback_refine: target must be a CPU tensor (the op runs on the "
              "host, as rule 21's targets are computed), got ", target_in.device());
  check_feedback_refine(target_in, hs_in, q_in, pred, sort_index_in, weight_bits, bits_per_cell,
                        encoding, write_penalty, sweeps, filter_weight);
  const at::Tensor t = target_in.contiguous(), hs = hs_in.contiguous(),
                   index = sort_index_in.contiguous();
  at::Tensor q = q_in.contiguous().clone();
  check_feedback_refine_values(t, hs, q, index, weight_bits);
  const int64_t out = t.size(0), K = t.size(1), groups = hs.size(0);
  const FeedbackChains ch = feedback_chains(pred, out, "feedback_refine");  // checked even idle
  // no sweep: no running products, no forms; no input: every form an empty sum
  if (sweeps == 0) return {q, at::empty({0}, t.options())};
  if (out == 0 || K == 0) return {q, at::zeros({out}, t.options())};
  const std::vector<int64_t> pr = [&] {
    const at::Tensor p = pred.contiguous();
    return std::vector<int64_t>(p.const_data_ptr<int64_t>(), p.const_data_ptr<int64_t>() + out);
  }();
  std::vector<int64_t> half[2];
  for (size_t d = 0; d < ch.waves.size(); ++d) {
    for (int64_t o : ch.waves[d]) half[d % 2].push_back(o);
  }
  const CellCodes codes = make_cell_codes(make_comp_format(int(weight_bits), int(bits_per_cell),
                                                          int(encoding), 0));
  // every format check_format accepts packs into one word (c * b <= 44)
  TORCH_CHECK(codes.usable, "crossbar_torch.feedback_refine: internal error: the cells of a "
              "weight do not pack into 64 bits");
  const double* hp = hs.const_data_ptr<double>();
  // rule 25: filter o's error counts a[o] times (absent: once, rule 24 exactly)
  const at::Tensor fw = filter_weight.has_value() && filter_weight->defined()
                            ? filter_weight->to(at::kCPU).contiguous() : at::Tensor();
  const VectorIsa isa = cpu_vector_isa();
  // g = (q - t) Hs, each element summed from 0 in increasing k, each product rounded on its own
  at::Tensor g = running_products(t, hs, q, isa);
  // each group's diagonal of Hs, contiguous: read once per weight and sweep, it would otherwise
  // be a cache miss each time (its entries are K + 1 doubles apart)
  std::vector<double> diag(size_t(groups * K));
  for (int64_t grp = 0; grp < groups; ++grp) {
    for (int64_t k = 0; k < K; ++k) diag[size_t(grp * K + k)] = hp[grp * K * K + k * K + k];
  }
  const SweepArgs a{hp, diag.data(), g.mutable_data_ptr<double>(),
                    q.mutable_data_ptr<int32_t>(), index.const_data_ptr<int64_t>(), pr.data(),
                    ch.succ.data(), fw.defined() ? fw.const_data_ptr<double>() : nullptr,
                    &codes, int(bits_per_cell), K, out / groups, write_penalty};
  const SweepFn sweep = pick_sweep(isa);
  for (int64_t s = 0; s < sweeps; ++s) {
    for (int parity = 0; parity < 2; ++parity) {
      const std::vector<int64_t>& mine = half[parity];
      at::parallel_for(0, int64_t(mine.size()), 1, [&](int64_t begin, int64_t end) {
        sweep(a, mine.data() + begin, end - begin);
      });
    }
  }
  // forms[o] = sum_k d[o, k] * g[o, k] with d = q - t as the sweeps left q, summed from 0 in
  // increasing k (each product rounded on its own): d^T Hs d up to the rounding of the running
  // g, from which the warning takes the layer's output error without a product with H
  at::Tensor forms = at::empty({out}, t.options());
  const double* tp = t.const_data_ptr<double>();
  const double* gp = g.const_data_ptr<double>();
  const int32_t* qp = q.const_data_ptr<int32_t>();
  double* fp = forms.mutable_data_ptr<double>();
  at::parallel_for(0, out, 16, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      double sum = 0.0;
      for (int64_t k = 0; k < K; ++k) {
        sum = sum + (double(qp[o * K + k]) - tp[o * K + k]) * gp[o * K + k];
      }
      fp[o] = sum;
    }
  });
  return {q, forms};
}

TORCH_LIBRARY_IMPL(crossbar_torch, CPU, m) { m.impl("feedback_refine", &feedback_refine_cpu); }

}  // namespace crossbar_torch
