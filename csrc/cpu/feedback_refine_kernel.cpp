// feedback_refine / CPU: rule 24, refinement sweeps of coordinate descent on
// J = sum_o (q_o - t_o)^T Hs (q_o - t_o) + write_penalty * (cells differing from the predecessor).
// Within one half of a sweep (the filters of even, then odd, chain depth) a filter's write
// terms involve only filters of the other half, which do not move meanwhile: the filters of a
// half run in parallel, each through its sorted positions in order, bit for bit what the
// reference (feedback_reference.feedback_refine) computes.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "../common.h"
#include "../feedback_quantize_args.h"
#include "../feedback_refine_args.h"
#include "../program_row.h"
#include "cell_codes.h"

namespace crossbar_torch {
namespace {

constexpr int kRefineWindow = 3;  // a move is at most this many LSB (rule 24)

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

#if defined(__x86_64__) && defined(__GNUC__)
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

using ProductFn = void (*)(double*, const double*, const double*, int64_t, int64_t, int64_t,
                           int64_t, int64_t, int64_t, int64_t);

ProductFn pick_product() {
#if defined(__x86_64__) && defined(__GNUC__)
  if (__builtin_cpu_supports("avx2")) return product_filters_avx2;
#endif
  return product_filters_plain;
}

// g = (q - t) Hs of every filter with its group's Hs (float64 (out, K)).
at::Tensor running_products(const at::Tensor& t, const at::Tensor& hs, const at::Tensor& q) {
  static const ProductFn product = pick_product();
  const int64_t out = t.size(0), K = t.size(1), groups = hs.size(0), per = out / groups;
  const at::Tensor d = q.to(at::kDouble) - t;  // exact conversion, then one rounded difference
  at::Tensor g = at::zeros({out, K}, t.options());
  const double* dp = d.const_data_ptr<double>();
  const double* hp = hs.const_data_ptr<double>();
  double* gp = g.mutable_data_ptr<double>();
  const int64_t quads = (per + 3) / 4;
  for (int64_t grp = 0; grp < groups; ++grp) {
    for (int64_t k0 = 0; k0 < K; k0 += kKPanel) {  // increasing k: each sum keeps its order
      const int64_t k1 = std::min<int64_t>(K, k0 + kKPanel);
      for (int64_t j0 = 0; j0 < K; j0 += kJPanel) {
        const int64_t j1 = std::min<int64_t>(K, j0 + kJPanel);
        at::parallel_for(0, quads, 1, [&](int64_t begin, int64_t end) {
          const int64_t o0 = grp * per + begin * 4;
          const int64_t o1 = std::min<int64_t>((grp + 1) * per, grp * per + end * 4);
          product(gp, dp, hp + grp * K * K, K, o0, o1, k0, k1, j0, j1);
        });
      }
    }
  }
  return g;
}

}  // namespace

at::Tensor feedback_refine_cpu(const at::Tensor& target_in, const at::Tensor& hs_in,
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
  if (out == 0 || K == 0 || sweeps == 0) return q;
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
  const int b = int(bits_per_cell);
  auto differing = [&](int64_t v, int64_t w) {
    return cells_differing(codes.code[size_t(v + codes.qmax)] ^ codes.code[size_t(w + codes.qmax)],
                           codes, b);
  };
  const double* tp = t.const_data_ptr<double>();
  const double* hp = hs.const_data_ptr<double>();
  const int64_t* ip = index.const_data_ptr<int64_t>();
  int32_t* qp = q.mutable_data_ptr<int32_t>();
  const int64_t per_group = out / groups;
  // rule 25: filter o's error counts a[o] times (absent: once, rule 24 exactly)
  const at::Tensor fw = filter_weight.has_value() && filter_weight->defined()
                            ? filter_weight->to(at::kCPU).contiguous() : at::Tensor();
  const double* ap = fw.defined() ? fw.const_data_ptr<double>() : nullptr;
  // g = (q - t) Hs, each element summed from 0 in increasing k, each product rounded on its own
  at::Tensor g = running_products(t, hs, q);
  double* gp = g.mutable_data_ptr<double>();
  // each group's diagonal of Hs, contiguous: read once per weight and sweep, it would otherwise
  // be a cache miss each time (its entries are K + 1 doubles apart)
  std::vector<double> diag(size_t(groups * K));
  for (int64_t grp = 0; grp < groups; ++grp) {
    for (int64_t k = 0; k < K; ++k) diag[size_t(grp * K + k)] = hp[grp * K * K + k * K + k];
  }
  static const int kDeltas[2 * kRefineWindow] = {-1, 1, -2, 2, -3, 3};  // the tie order
  const int64_t qmax = codes.qmax;
  for (int64_t s = 0; s < sweeps; ++s) {
    for (int parity = 0; parity < 2; ++parity) {
      const std::vector<int64_t>& mine = half[parity];
      at::parallel_for(0, int64_t(mine.size()), 1, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const int64_t o = mine[size_t(i)];
          const double* h = hp + (o / per_group) * K * K;
          const double* dg = diag.data() + (o / per_group) * K;
          double* row = gp + o * K;
          int32_t* qo = qp + o * K;
          const int64_t* io = ip + o * K;
          const int64_t nb[2] = {pr[size_t(o)], ch.succ[size_t(o)]};
          for (int64_t p = 0; p < K; ++p) {
            const int64_t k = io[p];
            const int64_t c = qo[k];
            int64_t ref[2], own[2];
            for (int r = 0; r < 2; ++r) {
              if (nb[r] < 0) continue;
              ref[r] = qp[nb[r] * K + ip[nb[r] * K + p]];
              own[r] = differing(c, ref[r]);
            }
            const double gk = row[k], hkk = dg[k];
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
              if (ap) err = ap[o] * err;
              const double cost = err + write_penalty * double(dw);
              if (cost < best) best = cost, move = delta;
            }
            if (!move) continue;
            qo[k] = int32_t(c + move);
            const double dm = double(move);
            const double* hk = h + k * K;
            for (int64_t j = 0; j < K; ++j) row[j] = row[j] + dm * hk[j];
          }
        }
      });
    }
  }
  return q;
}

TORCH_LIBRARY_IMPL(crossbar_torch, CPU, m) { m.impl("feedback_refine", &feedback_refine_cpu); }

}  // namespace crossbar_torch
