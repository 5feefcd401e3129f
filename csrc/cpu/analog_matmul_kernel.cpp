// analog_matmul / CPU: the crossbar layer's output through the DAC and the ADC (rules 17, 18),
// acc[n, o] = sum over sections s, planes p (passes and cycles), cells i of
//   sign_p * 2**(d*j_p) * w_i * (ADC_i(P[n, o, s, p, i]) - g0 * sum of the section's digits),
// less encoding_offset * sum_k xq[n, group cols]; and pmax[i], the largest P (|P| for
// signed_weights) of cell i. Reference: crossbar_torch/ops/analog_reference.py.
//
// Layout of the work: the inputs are quantized once (one pass, which also checks that x is
// finite). A task takes one group, a block of NB input rows and a chunk of that group's filters.
// It first spreads the block's digit planes over the group's K input columns, as a K x J matrix
// D (J = the block's (row, plane) pairs whose plane has a nonzero digit: a plane of zeros adds
// exactly nothing, e.g. the negative pass after a ReLU); filter o then reads row
// sort_index[o, k'] of D for its sorted position k' (no gather copy), and the partial sums of
// one section are a small matrix product (c cells x rows) . (rows x J), register-blocked over
// 4 cells x 8 columns (an AVX2 copy of the loop is chosen at run time; no fused multiply-add,
// so both copies round alike). Each P is a sum over the section's rows in sorted order; the
// converted sums are then added to acc in the reference's order (sections, planes, cells).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cfenv>
#include <cmath>
#include <cstring>
#include <mutex>
#include <tuple>
#include <vector>

#include "../analog_matmul_args.h"
#include "../analog_row.h"
#include "../common.h"

namespace crossbar_torch {
namespace {

#if defined(__GNUC__) || defined(__clang__)
#define AM_INLINE inline __attribute__((always_inline))
#else
#define AM_INLINE inline
#endif

#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__)) && \
    !defined(__AVX2__)
#define AM_AVX2_CLONE 1
#endif

constexpr int64_t kJB = 8;  // columns of D per register block
constexpr int kCI = 4;      // cells per register block

// P[ci * Jp + jb + jj] = sum over k < nk, in order, of g[ci * K + k] * rowp[k][jb + jj], for
// ci < CI, jj < kJB.
#if defined(__GNUC__) || defined(__clang__)
typedef double v4d __attribute__((vector_size(32)));

template <int CI>
AM_INLINE void partial_sums(const double* const* rowp, int64_t nk, int64_t jb, const double* g,
                            int64_t K, double* P, int64_t Jp) {
  v4d a[CI][2];
  for (int ci = 0; ci < CI; ++ci) {
    a[ci][0] = v4d{0.0, 0.0, 0.0, 0.0};
    a[ci][1] = v4d{0.0, 0.0, 0.0, 0.0};
  }
  for (int64_t k = 0; k < nk; ++k) {
    const double* r = rowp[k] + jb;
    v4d x0, x1;
    std::memcpy(&x0, r, sizeof(v4d));
    std::memcpy(&x1, r + 4, sizeof(v4d));
    for (int ci = 0; ci < CI; ++ci) {
      const double gk = g[ci * K + k];
      const v4d gv = {gk, gk, gk, gk};
      a[ci][0] += gv * x0;
      a[ci][1] += gv * x1;
    }
  }
  for (int ci = 0; ci < CI; ++ci) {
    std::memcpy(P + ci * Jp + jb, &a[ci][0], sizeof(v4d));
    std::memcpy(P + ci * Jp + jb + 4, &a[ci][1], sizeof(v4d));
  }
}
#else
template <int CI>
AM_INLINE void partial_sums(const double* const* rowp, int64_t nk, int64_t jb, const double* g,
                            int64_t K, double* P, int64_t Jp) {
  double a[CI][kJB] = {};
  for (int64_t k = 0; k < nk; ++k) {
    const double* r = rowp[k] + jb;
    for (int ci = 0; ci < CI; ++ci) {
      const double gk = g[ci * K + k];
      for (int64_t jj = 0; jj < kJB; ++jj) a[ci][jj] += gk * r[jj];
    }
  }
  for (int ci = 0; ci < CI; ++ci) {
    for (int64_t jj = 0; jj < kJB; ++jj) P[ci * Jp + jb + jj] = a[ci][jj];
  }
}
#endif

struct Ctx {
  const float* xq;      // (N, C) quantized inputs (x itself for input_bits 0)
  const double* g;      // (out, c, K)
  const int64_t* idx;   // (out, K)
  const double* steps;  // (c,)
  const double* coef;   // (planes, c): sign * 2**(d*j) * w_i
  double* acc;          // (N, out)
  int64_t N, C, out, c, K, per_group, rows, sections;
  int64_t nb_rows, n_blocks, o_chunk, o_chunks, jmax;
  double encoding_offset;
  AnalogFormat f;
};

struct Scratch {
  std::vector<double> xd, P, dsum, accbuf, xsum, pmax;
  std::vector<const double*> rowp;
  std::vector<int> jrow, jplane;
  std::vector<int64_t> jstart;

  explicit Scratch(const Ctx& X)
      : xd(size_t(X.K * X.jmax)), P(size_t(X.c * X.jmax)), dsum(size_t(X.jmax)),
        accbuf(size_t(X.nb_rows)), xsum(size_t(X.nb_rows)), pmax(size_t(X.c), 0.0),
        rowp(size_t(std::min(X.rows, X.K))), jrow(size_t(X.jmax)), jplane(size_t(X.jmax)),
        jstart(size_t(X.nb_rows + 1)) {}
};

AM_INLINE void run_task(const Ctx& X, int64_t task, Scratch& S) {
  const AnalogFormat& f = X.f;
  const int64_t oc = task % X.o_chunks;
  const int64_t rest = task / X.o_chunks;
  const int64_t nb = rest % X.n_blocks, gi = rest / X.n_blocks;
  const int64_t n0 = nb * X.nb_rows, n1 = std::min(X.N, n0 + X.nb_rows), nn = n1 - n0;
  const int64_t o0 = gi * X.per_group + oc * X.o_chunk;
  const int64_t o1 = std::min(gi * X.per_group + X.per_group, o0 + X.o_chunk);
  const int64_t K = X.K, C = X.C, c = X.c;
  const float* xg = X.xq + n0 * C + gi * K;  // row nl of the block: xg + nl * C

  // The block's planes with a nonzero digit, row by row, planes in order.
  int64_t J = 0;
  for (int64_t nl = 0; nl < nn; ++nl) {
    int64_t pos = 0, neg = 0;
    const float* xr = xg + nl * C;
    for (int64_t k = 0; k < K; ++k) plane_bits(xr[k], f, pos, neg);
    S.jstart[size_t(nl)] = J;
    for (int p = 0; p < f.planes; ++p) {
      if (!plane_active(p, pos, neg, f)) continue;
      S.jrow[size_t(J)] = int(nl);
      S.jplane[size_t(J)] = p;
      ++J;
    }
  }
  S.jstart[size_t(nn)] = J;
  const int64_t Jp = (J + kJB - 1) / kJB * kJB;
  // D: row k (the group's input column k) holds the digits of the active planes.
  double* xd = S.xd.data();
  for (int64_t k = 0; k < K; ++k) {
    double* row = xd + k * Jp;
    for (int64_t j = 0; j < J; ++j) {
      row[j] = input_digit(xg[S.jrow[size_t(j)] * C + k], S.jplane[size_t(j)], f);
    }
    for (int64_t j = J; j < Jp; ++j) row[j] = 0.0;
  }
  const bool offset = X.encoding_offset != 0.0;
  if (offset) {
    for (int64_t nl = 0; nl < nn; ++nl) {
      double s = 0.0;
      const float* xr = xg + nl * C;
      for (int64_t k = 0; k < K; ++k) s += static_cast<double>(xr[k]);
      S.xsum[size_t(nl)] = s;
    }
  }
  double* P = S.P.data();
  double* dsum = S.dsum.data();
  double* accbuf = S.accbuf.data();
  double* pmax = S.pmax.data();
  for (int64_t o = o0; o < o1; ++o) {
    std::fill(accbuf, accbuf + nn, 0.0);
    const int64_t* io = X.idx + o * K;
    const double* go = X.g + o * c * K;
    for (int64_t s = 0; s < X.sections && J > 0; ++s) {
      const int64_t k0 = s * X.rows, nk = std::min(K, k0 + X.rows) - k0;
      for (int64_t k = 0; k < nk; ++k) S.rowp[size_t(k)] = xd + io[k0 + k] * Jp;
      const double* const* rowp = S.rowp.data();
      // sum of the section's digits per column, rows in order
      for (int64_t j = 0; j < Jp; ++j) dsum[j] = 0.0;
      for (int64_t k = 0; k < nk; ++k) {
        const double* r = rowp[k];
        for (int64_t j = 0; j < Jp; ++j) dsum[j] += r[j];
      }
      for (int64_t jb = 0; jb < Jp; jb += kJB) {
        for (int64_t i0 = 0; i0 < c; i0 += kCI) {
          const double* gi0 = go + i0 * K + k0;
          double* Pi = P + i0 * Jp;
          switch (std::min<int64_t>(kCI, c - i0)) {
            case 4: partial_sums<4>(rowp, nk, jb, gi0, K, Pi, Jp); break;
            case 3: partial_sums<3>(rowp, nk, jb, gi0, K, Pi, Jp); break;
            case 2: partial_sums<2>(rowp, nk, jb, gi0, K, Pi, Jp); break;
            default: partial_sums<1>(rowp, nk, jb, gi0, K, Pi, Jp); break;
          }
        }
      }
      // the ADC and the shift and add, in the reference's order: planes, then cells
      for (int64_t nl = 0; nl < nn; ++nl) {
        double a = accbuf[nl];
        for (int64_t j = S.jstart[size_t(nl)]; j < S.jstart[size_t(nl + 1)]; ++j) {
          const double* cp = X.coef + int64_t(S.jplane[size_t(j)]) * c;
          const double d = dsum[j];
          for (int64_t i = 0; i < c; ++i) {
            const double Pv = P[i * Jp + j];
            const double pm = pmax_value(Pv, f);
            if (pm > pmax[i]) pmax[i] = pm;
            a = xb_add(a, analog_term(Pv, d, X.steps[i], cp[i], f));
          }
        }
        accbuf[nl] = a;
      }
    }
    for (int64_t nl = 0; nl < nn; ++nl) {
      const double a = accbuf[nl];
      X.acc[(n0 + nl) * X.out + o] =
          offset ? xb_sub(a, xb_mul(X.encoding_offset, S.xsum[size_t(nl)])) : a;
    }
  }
}

void run_tasks_plain(const Ctx& X, int64_t b, int64_t e, Scratch& S) {
  for (int64_t t = b; t < e; ++t) run_task(X, t, S);
}

#if defined(AM_AVX2_CLONE)
__attribute__((target("avx2"))) void run_tasks_avx2(const Ctx& X, int64_t b, int64_t e,
                                                    Scratch& S) {
  for (int64_t t = b; t < e; ++t) run_task(X, t, S);
}
inline bool cpu_has_avx2() { return __builtin_cpu_supports("avx2"); }
#else
void run_tasks_avx2(const Ctx& X, int64_t b, int64_t e, Scratch& S) { run_tasks_plain(X, b, e, S); }
inline bool cpu_has_avx2() { return false; }
#endif

std::tuple<at::Tensor, at::Tensor> analog_matmul_cpu(
    const at::Tensor& x_in, const at::Tensor& g_in, const at::Tensor& sort_index_in,
    const at::Tensor& cell_weight_in, const at::Tensor& adc_steps_in, int64_t groups,
    int64_t rows, int64_t input_bits, int64_t input_bits_per_cycle, double input_scale,
    int64_t adc_bits, double g0, double encoding_offset, bool signed_weights,
    bool check_values) {
  TORCH_CHECK(x_in.device().is_cpu(),
              "crossbar_torch.analog_matmul: x must be a CPU tensor here, got ", x_in.device());
  const AnalogLayout L = check_analog_matmul(
      x_in, g_in, sort_index_in, cell_weight_in, adc_steps_in, groups, rows, input_bits,
      input_bits_per_cycle, input_scale, adc_bits, g0, encoding_offset, signed_weights);
  const at::Tensor sort_index = sort_index_in.contiguous();
  const at::Tensor cell_weight = cell_weight_in.contiguous();
  const at::Tensor adc_steps = adc_steps_in.contiguous();
  if (check_values) check_analog_matmul_values(g_in, sort_index, cell_weight, adc_steps, adc_bits);
  TORCH_CHECK(std::fegetround() == FE_TONEAREST,
              "crossbar_torch.analog_matmul: the floating-point rounding mode must be "
              "round-to-nearest");
  const AnalogFormat& f = L.fmt;
  const int64_t N = L.N, out = L.out, c = L.c, K = L.K;
  const auto f64 = x_in.options().dtype(at::kDouble);
  at::Tensor acc = at::zeros({N, out}, f64);
  at::Tensor pmax_t = at::zeros({c}, f64);

  // Rule 17 once per input: xq in float32 (x itself for input_bits 0), x checked finite.
  const at::Tensor x = x_in.contiguous();
  const int64_t C = x.size(1), numel = x.numel();
  at::Tensor xq = input_bits == 0 ? x : at::empty_like(x);
  {
    const float* xp = x.const_data_ptr<float>();
    float* qp = input_bits == 0 ? nullptr : xq.mutable_data_ptr<float>();
    std::atomic<int64_t> first_bad{numel};
    at::parallel_for(0, numel, int64_t(1) << 16, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const float v = xp[i];
        if (!std::isfinite(v)) {
          int64_t cur = first_bad.load();
          while (i < cur && !first_bad.compare_exchange_weak(cur, i)) {}
          return;
        }
        if (qp) qp[i] = quantize_input(v, f);
      }
    });
    const int64_t bad = first_bad.load();
    TORCH_CHECK(bad == numel, "crossbar_torch.analog_matmul: x contains NaN or Inf (x[", bad / C,
                ", ", bad % C, "] = ", xp[bad], "); inputs must be finite");
  }
  if (N == 0 || out == 0 || K == 0) return std::make_tuple(acc, pmax_t);

  const at::Tensor g = g_in.to(at::kDouble).contiguous();
  at::Tensor coef = at::empty({f.planes, c}, f64);
  {
    const double* cw = cell_weight.const_data_ptr<double>();
    double* cp = coef.mutable_data_ptr<double>();
    for (int p = 0; p < f.planes; ++p) {
      for (int64_t i = 0; i < c; ++i) cp[p * c + i] = plane_weight(p, f) * cw[i];
    }
  }
  Ctx X;
  X.xq = xq.const_data_ptr<float>();
  X.g = g.const_data_ptr<double>();
  X.idx = sort_index.const_data_ptr<int64_t>();
  X.steps = adc_steps.const_data_ptr<double>();
  X.coef = coef.const_data_ptr<double>();
  X.acc = acc.mutable_data_ptr<double>();
  X.N = N;
  X.C = C;
  X.out = out;
  X.c = c;
  X.K = K;
  X.per_group = L.per_group;
  X.rows = L.rows;
  X.sections = L.sections;
  X.encoding_offset = encoding_offset;
  X.f = f;
  // Blocks of about 128 (row, plane) columns, fewer when K is large (D stays within 4 MB per
  // thread unless one input row needs more); enough tasks for every thread, splitting each
  // group's filters when there are few input rows.
  const int64_t target_j = std::min<int64_t>(128, std::max<int64_t>(kJB, (int64_t(1) << 19) / K));
  X.nb_rows = std::max<int64_t>(1, std::min<int64_t>(N, target_j / f.planes));
  X.n_blocks = (N + X.nb_rows - 1) / X.nb_rows;
  X.jmax = (X.nb_rows * f.planes + kJB - 1) / kJB * kJB;
  const int64_t threads = at::get_num_threads();
  const double work = double(N) * double(out) * double(c + 1) * double(K) * f.planes;
  const bool small = work < double(int64_t(1) << 22);
  const int64_t blocks = groups * X.n_blocks;
  int64_t want = small ? 1 : (4 * threads + blocks - 1) / blocks;
  want = std::max<int64_t>(1, std::min<int64_t>(want, L.per_group));
  X.o_chunk = (L.per_group + want - 1) / want;
  X.o_chunks = (L.per_group + X.o_chunk - 1) / X.o_chunk;
  const int64_t tasks = blocks * X.o_chunks;

  static const bool has_avx2 = cpu_has_avx2();
  std::mutex merge;
  double* pm = pmax_t.mutable_data_ptr<double>();
  at::parallel_for(0, tasks, small ? tasks : 1, [&](int64_t b, int64_t e) {
    Scratch S(X);
    if (has_avx2) {
      run_tasks_avx2(X, b, e, S);
    } else {
      run_tasks_plain(X, b, e, S);
    }
    std::lock_guard<std::mutex> lock(merge);
    for (int64_t i = 0; i < c; ++i) pm[i] = std::max(pm[i], S.pmax[size_t(i)]);
  });
  return std::make_tuple(acc, pmax_t);
}

}  // namespace

TORCH_LIBRARY_IMPL(crossbar_torch, CPU, m) { m.impl("analog_matmul", &analog_matmul_cpu); }

}  // namespace crossbar_torch
