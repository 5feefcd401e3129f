// feedback_quantize / CPU: rule 21, error-feedback programming targets. Filters (rows) are
// independent given U, so they run in parallel; each sees feedback_row's arithmetic
// (feedback_row.h, what the CUDA kernel runs), bit for bit, run blocked (feedback_rows), in
// scalar, AVX2 or AVX-512 code (vector_isa.h). With rule 23's write penalty a filter is
// charged against the cells its predecessor chose, so the chains run in parallel, each filter
// after its predecessor.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <vector>

#include "vector_isa.h"
#ifdef XB_X86_VECTOR
#include <immintrin.h>
#endif

#include "../common.h"
#include "../feedback_quantize_args.h"
#include "../feedback_row.h"
#include "cell_codes.h"
#include "cell_codes_wide.h"
#include "slot_table.h"

namespace crossbar_torch {
namespace {

// One filter's pointers for feedback_rows (those feedback_row takes).
struct FeedbackRowArgs {
  double* t;
  const double* t0;  // the targets before any carry (rule 21's error is against them)
  const bool* held;  // unpacked held cells (K x c, original order), or null
  const uint8_t* lv;
  int32_t* out;
  const int64_t* pos;  // each weight's sorted position (rule 23, packed held cells)
  const uint8_t* ref;
  uint8_t* chosen;
  double lambda;  // rule 23's write penalty of this filter (rule 25: over its weight)
  const uint8_t* hpk = nullptr;  // packed held cells (the filter's rows, sorted order), or null
  const uint8_t* lpk = nullptr;
};

// filters (or chains) that go through U together: U's rows are read from memory once for all
// of them (3072 x 3072 doubles do not fit in cache)
constexpr int kRowsTogether = 32;

// The held cells a filter's walk reads: the unpacked tensors given (K x c flags and levels a
// filter, original order), or a layer's own packed buffers in sorted order (the op's uint8
// `held`), each weight's bytes read at its sorted position (a filter's rows stay in L1): its
// flags as a mask and its low levels straight from the bytes. Unpacking and reordering whole
// layers beforehand (packing.unpack_levels of scattered copies) wrote and read 2 x 1.2G cells
// of transient tensors per programming of the ViT-Base-sized model.
struct HeldCells {
  const bool* held = nullptr;  // unpacked, (out, K, c)
  const uint8_t* lv = nullptr;
  const uint8_t* hpk = nullptr;  // packed, sorted order: (out, K, hb) flags, (out, K, lb) levels
  const uint8_t* lpk = nullptr;
  const int64_t* pos = nullptr;  // (out, K): weight k's sorted position
  int64_t K = 0, c = 0, hb = 0, lb = 0;
  int s = 1;  // the levels' slot width

  bool any() const { return held != nullptr || hpk != nullptr; }

  // A packed weight's held flags as a mask (bit i: cell i), from its hb bytes, little end first.
  uint32_t mask_at(const uint8_t* w) const {
    uint64_t m = 0;
    for (int64_t i = 0; i < hb; ++i) m |= uint64_t(w[i]) << (8 * i);
    return uint32_t(c >= 32 ? m : m & ((uint64_t(1) << c) - 1));
  }
  // cell i's level in a packed weight's bytes: byte i / (8 / s), bit (i % (8 / s)) * s, by
  // shifts (log_per = log2(8 / s), log_s = log2(s))
  int log_per = 3, log_s = 0;
  uint8_t level_at(const uint8_t* w, int i) const {
    return uint8_t((w[i >> log_per] >> ((i & ((1 << log_per) - 1)) << log_s)) & ((1 << s) - 1));
  }

  // Filter o's held cells in its row arguments: the unpacked rows, or the packed rows and the
  // sorted positions they are read through (feedback_rows reads each weight's bytes).
  void set_row(int64_t o, FeedbackRowArgs& a) const {
    if (hpk) {
      a.hpk = hpk + o * K * hb;
      a.lpk = lpk + o * K * lb;
      a.pos = pos + o * K;
      return;
    }
    a.held = held ? held + o * K * c : nullptr;
    a.lv = lv ? lv + o * K * c : nullptr;
  }

  // Filter o's flags `h` and levels `l` unpacked in original order (null where nothing is
  // held), for feedback_row (a chain's filter on another group's U, rule 23). Packed, they go
  // to this thread's scratch, which holds them until the next call.
  void filter(int64_t o, const bool*& h, const uint8_t*& l) const {
    if (!hpk) {
      h = held ? held + o * K * c : nullptr;
      l = lv ? lv + o * K * c : nullptr;
      return;
    }
    thread_local std::vector<uint8_t> flags, levels;
    const size_t need = size_t(K * c + 8);
    if (flags.size() < need) flags.resize(need), levels.resize(need);
    uint8_t* hs = flags.data();
    uint8_t* ls = levels.data();
    const int64_t* po = pos + o * K;
    const uint8_t* hrow = hpk + o * K * hb;
    const uint8_t* lrow = lpk + o * K * lb;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t p = po[k];
      unpack_slots(hrow + p * hb, c, 1, hs + k * c);
      unpack_slots(lrow + p * lb, c, s, ls + k * c);
    }
    h = reinterpret_cast<const bool*>(hs);  // bytes 0 and 1
    l = ls;
  }
};

#ifdef XB_X86_VECTOR
// The least-cost value of the window [lo, hi] (at most kWideWindow values) of write_aware_free,
// every candidate priced at once: 32 lanes (v = lo + lane), each with write_aware_free's
// arithmetic on the same values (e = t - v, e * e + lambda * w, products and sum rounded one by
// one), the least cost among the window's lanes, and among lanes of equal cost the one
// feedback_better prefers (nearer t, even, smaller): write_aware_free's choice. Visited one at
// a time nearest first, the candidates (a count and two branches apiece) were a third of the
// rule-23 choice on mpnet_best's 768-input layers (penalties up to 5.4 LSB^2: windows of 20).
constexpr int64_t kWideWindow = 32;
// Windows of fewer values stay with the scalar search, which stops after a few of them
// (a small penalty: the nearest values win); from 9 values on the wide pricing is faster.
constexpr int64_t kWideFrom = 8;  // hi - lo
static_assert(kWideWindow <= CellCodes::kPadAfter, "the window's codes lie in the padded table");

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // cell_codes_wide.h says why
XB_WIDE_CODES_TARGET int64_t wide_window_best(double t, int64_t lo, int64_t hi, uint64_t rc,
                                              double lambda, const CellCodes& codes, int b) {
  const __m512i lsb = _mm512_set1_epi64(int64_t(codes.lsb)), ref = _mm512_set1_epi64(int64_t(rc));
  const __m512i iota = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
  const __m512d tv = _mm512_set1_pd(t), lam = _mm512_set1_pd(lambda);
  const __m512d inf = _mm512_set1_pd(__builtin_inf());
  const uint64_t* window = codes.codes_from(lo);
  const int64_t span = hi - lo + 1;
  __m512d cost[kWideWindow / 8];
  __m512d least = inf;
  for (int j = 0; j < kWideWindow / 8; ++j) {
    const __m512i v = _mm512_add_epi64(_mm512_set1_epi64(lo + 8 * j), iota);
    const __m512i w = lanes_differing(
        _mm512_xor_si512(_mm512_loadu_si512(window + 8 * j), ref), lsb, b);
    const __m512d e = _mm512_sub_pd(tv, _mm512_cvtepi64_pd(v));
    const __m512d c = _mm512_add_pd(_mm512_mul_pd(e, e), _mm512_mul_pd(lam, _mm512_cvtepi64_pd(w)));
    const int64_t in = std::min<int64_t>(8, std::max<int64_t>(0, span - 8 * j));  // lanes < in
    cost[j] = _mm512_mask_mov_pd(inf, __mmask8((1u << in) - 1u), c);
    least = _mm512_min_pd(least, cost[j]);
  }
  const double best = _mm512_reduce_min_pd(least);
  int64_t best_v = 0;
  bool found = false;
  for (int j = 0; j < kWideWindow / 8; ++j) {
    unsigned ties = _mm512_cmp_pd_mask(cost[j], _mm512_set1_pd(best), _CMP_EQ_OQ);
    for (; ties; ties &= ties - 1) {
      const int64_t v = lo + 8 * j + __builtin_ctz(ties);
      if (!found || feedback_better(v, best_v, t)) best_v = v, found = true;
    }
  }
  return best_v;
}
#pragma GCC diagnostic pop
#endif

// Rule 23 for a weight without held cells, as write_aware_allowed's `!held` branch computes it
// (the same candidates, cost arithmetic and comparisons; visited nearest first, below, or
// priced at once, wide_window_best, on the AVX-512 path), the writes counted on the packed
// codes (cell_codes.h). Inlined into feedback_rows' variants, so that the counts use the POPCNT
// instruction where they are built for it.
template <bool kWide>
inline __attribute__((always_inline)) int64_t write_aware_free(
    double t, const uint8_t* ref, double lambda, const CompFormat& f, const CellCodes& codes,
    uint8_t* cells) {
  const int64_t qmax = codes.qmax;
  const int64_t v0 = nearest_allowed(t, nullptr, 0u, f);
  const double e0 = t - double(v0);
  const double r = sqrt(xb_mul(e0, e0) + xb_mul(lambda, double(f.c)));
  int64_t lo = int64_t(floor(t - r)) - 1, hi = int64_t(ceil(t + r)) + 1;
  lo = lo < -qmax ? -qmax : lo;
  hi = hi > qmax ? qmax : hi;
  const uint64_t rc = ref ? pack_cells(ref, f) : 0;
  bool found = false;
  double best_cost = 0.0;
  int64_t best_v = 0;
#ifdef XB_X86_VECTOR
  // (without a reference every write term is 0: the nearest value wins at once below)
  if constexpr (kWide) {
    if (ref && hi - lo >= kWideFrom && hi - lo < kWideWindow) {
      best_v = wide_window_best(t, lo, hi, rc, lambda, codes, f.b);
      found = true;
    }
  }
#endif
  // The window's values in order of distance from t, each way: a value whose squared error
  // alone exceeds the best cost so far can neither win nor tie (its cost adds a non-negative
  // write term, and rounding is monotone), nor can any value beyond it. The least cost under
  // the tie-break order does not depend on the order of visiting, so this picks exactly what
  // the enumeration of the whole window (write_aware_allowed) picks, with a few candidates
  // instead of 2r + 3 (most weights: the predecessor's cells already give the nearest value).
  auto consider = [&](int64_t v) {
    const double e = t - double(v);
    const double e2 = xb_mul(e, e);
    if (found && e2 > best_cost) return false;
    const int64_t w = ref ? cells_differing(codes.code[size_t(v + qmax)] ^ rc, codes, f.b) : 0;
    const double cost = e2 + xb_mul(lambda, double(w));
    if (!found || cost < best_cost || (cost == best_cost && feedback_better(v, best_v, t))) {
      found = true;
      best_cost = cost;
      best_v = v;
    }
    return true;
  };
  if (!found) {
    const int64_t below = std::min<int64_t>(hi, int64_t(floor(t)));  // values <= t, downwards
    for (int64_t v = below; v >= lo && consider(v); --v) {}
    for (int64_t v = std::max<int64_t>(lo, below + 1); v <= hi && consider(v); ++v) {}
  }
  // its rule-3 cells, unpacked from the table (encode_one's, computed once per call)
  const uint64_t code = codes.code[size_t(best_v + qmax)], field = (uint64_t(1) << f.b) - 1;
  for (int i = 0; i < f.c; ++i) cells[i] = uint8_t((code >> (i * f.b)) & field);
  return best_v;
}

// Rule 21's carry, blocked without changing a single rounding. feedback_row subtracts, for
// each chosen column k, e_k * U[k][j] from every later column j, one rounded product and one
// rounded difference at a time; column j therefore sees the products of k = 0, 1, ... in that
// order. The kernel chooses kBlock columns at a time (carrying within the block as it goes,
// since the next choice reads the next column), then brings the block's kBlock carries to every
// later column at once, still in k order for each column: the same operations on every element
// in the same order (bit-identical), with each piece of the running targets held in registers
// over the block instead of read and written once per column (which bound the kernel on
// ViT-Base's 3072-input layers).
constexpr int kBlock = 32;
constexpr int64_t kTrailPiece = 64;  // columns: the block's piece of U, 16 KiB, stays in L1

// Columns [j0, j1) of the n filters take the carries e[r][0 .. nb-1] of the block's columns;
// the block's rows of U over those columns are packed at ub (row kk, column j at
// ub[kk * kTrailPiece + j - j0]; a tile of pack_trail_tiles, below).

inline void trail_column(double* t, const double* e, int nb, const double* ub, int64_t j) {
  double x = t[j];
  for (int kk = 0; kk < nb; ++kk) x = x - xb_mul(e[kk], ub[kk * kTrailPiece]);
  t[j] = x;
}

void trail_scalar(const FeedbackRowArgs* rows, int n, const double (*e)[kBlock], int nb,
                  const double* ub, int64_t j0, int64_t j1) {
  for (int r = 0; r < n; ++r) {
    for (int64_t j = j0; j < j1; ++j) trail_column(rows[r].t, e[r], nb, ub + (j - j0), j);
  }
}

#ifdef XB_X86_VECTOR
// 4-wide products and differences (no FMA: setup.py builds with -ffp-contract=off and the
// target enables no fused instruction), 16 columns of two filters in flight: each load of U
// serves both, and eight independent running sums hide the latency of the differences.
__attribute__((target("avx2"))) void trail_avx2(const FeedbackRowArgs* rows, int n,
                                                const double (*e)[kBlock], int nb,
                                                const double* ub, int64_t j0, int64_t j1) {
  int r = 0;
  for (; r + 2 <= n; r += 2) {
    double* t = rows[r].t;
    double* s = rows[r + 1].t;
    const double* ea = e[r];
    const double* eb = e[r + 1];
    int64_t j = j0;
    for (; j + 16 <= j1; j += 16) {
      __m256d a0 = _mm256_loadu_pd(t + j), a1 = _mm256_loadu_pd(t + j + 4);
      __m256d a2 = _mm256_loadu_pd(t + j + 8), a3 = _mm256_loadu_pd(t + j + 12);
      __m256d b0 = _mm256_loadu_pd(s + j), b1 = _mm256_loadu_pd(s + j + 4);
      __m256d b2 = _mm256_loadu_pd(s + j + 8), b3 = _mm256_loadu_pd(s + j + 12);
      const double* uj = ub + (j - j0);
      for (int kk = 0; kk < nb; ++kk) {
        const double* uk = uj + kk * kTrailPiece;
        const __m256d u0 = _mm256_loadu_pd(uk), u1 = _mm256_loadu_pd(uk + 4);
        const __m256d u2 = _mm256_loadu_pd(uk + 8), u3 = _mm256_loadu_pd(uk + 12);
        const __m256d ev = _mm256_set1_pd(ea[kk]);
        const __m256d fv = _mm256_set1_pd(eb[kk]);
        a0 = _mm256_sub_pd(a0, _mm256_mul_pd(ev, u0));
        b0 = _mm256_sub_pd(b0, _mm256_mul_pd(fv, u0));
        a1 = _mm256_sub_pd(a1, _mm256_mul_pd(ev, u1));
        b1 = _mm256_sub_pd(b1, _mm256_mul_pd(fv, u1));
        a2 = _mm256_sub_pd(a2, _mm256_mul_pd(ev, u2));
        b2 = _mm256_sub_pd(b2, _mm256_mul_pd(fv, u2));
        a3 = _mm256_sub_pd(a3, _mm256_mul_pd(ev, u3));
        b3 = _mm256_sub_pd(b3, _mm256_mul_pd(fv, u3));
      }
      _mm256_storeu_pd(t + j, a0);
      _mm256_storeu_pd(t + j + 4, a1);
      _mm256_storeu_pd(t + j + 8, a2);
      _mm256_storeu_pd(t + j + 12, a3);
      _mm256_storeu_pd(s + j, b0);
      _mm256_storeu_pd(s + j + 4, b1);
      _mm256_storeu_pd(s + j + 8, b2);
      _mm256_storeu_pd(s + j + 12, b3);
    }
    for (; j + 4 <= j1; j += 4) {
      __m256d a = _mm256_loadu_pd(t + j), b = _mm256_loadu_pd(s + j);
      for (int kk = 0; kk < nb; ++kk) {
        const __m256d u = _mm256_loadu_pd(ub + (j - j0) + kk * kTrailPiece);
        a = _mm256_sub_pd(a, _mm256_mul_pd(_mm256_set1_pd(ea[kk]), u));
        b = _mm256_sub_pd(b, _mm256_mul_pd(_mm256_set1_pd(eb[kk]), u));
      }
      _mm256_storeu_pd(t + j, a);
      _mm256_storeu_pd(s + j, b);
    }
    for (; j < j1; ++j) {
      trail_column(t, ea, nb, ub + (j - j0), j);
      trail_column(s, eb, nb, ub + (j - j0), j);
    }
  }
  for (; r < n; ++r) {  // an odd filter out: on its own
    double* t = rows[r].t;
    int64_t j = j0;
    for (; j + 4 <= j1; j += 4) {
      __m256d a = _mm256_loadu_pd(t + j);
      for (int kk = 0; kk < nb; ++kk) {
        a = _mm256_sub_pd(a, _mm256_mul_pd(_mm256_set1_pd(e[r][kk]),
                                           _mm256_loadu_pd(ub + (j - j0) + kk * kTrailPiece)));
      }
      _mm256_storeu_pd(t + j, a);
    }
    for (; j < j1; ++j) trail_column(t, e[r], nb, ub + (j - j0), j);
  }
}
#endif

#ifdef XB_X86_VECTOR
// F filters by W = 8 * V columns (V registers apiece), the products and differences of
// trail_column 8-wide (_mm512_mul_pd then _mm512_sub_pd): each load of U serves F filters.
template <int F, int V>
__attribute__((target("avx512f"), always_inline)) inline void trail_tile_avx512(
    double* const* t, const double* const* e, int nb, const double* ub, int64_t j0,
    int64_t j) {
  __m512d x[F][V];
  for (int r = 0; r < F; ++r) {
    for (int v = 0; v < V; ++v) x[r][v] = _mm512_loadu_pd(t[r] + j + 8 * v);
  }
  const double* uj = ub + (j - j0);
  for (int kk = 0; kk < nb; ++kk) {
    __m512d u[V];
    for (int v = 0; v < V; ++v) u[v] = _mm512_load_pd(uj + kk * kTrailPiece + 8 * v);
    for (int r = 0; r < F; ++r) {
      const __m512d ev = _mm512_set1_pd(e[r][kk]);
      for (int v = 0; v < V; ++v) x[r][v] = _mm512_sub_pd(x[r][v], _mm512_mul_pd(ev, u[v]));
    }
  }
  for (int r = 0; r < F; ++r) {
    for (int v = 0; v < V; ++v) _mm512_storeu_pd(t[r] + j + 8 * v, x[r][v]);
  }
}

// F filters through the piece's columns: 32 at a time, then 8, then one by one.
template <int F>
__attribute__((target("avx512f"), always_inline)) inline void trail_filters_avx512(
    double* const* t, const double* const* e, int nb, const double* ub, int64_t j0,
    int64_t j1) {
  int64_t j = j0;
  for (; j + 32 <= j1; j += 32) trail_tile_avx512<F, 4>(t, e, nb, ub, j0, j);
  for (; j + 8 <= j1; j += 8) trail_tile_avx512<F, 1>(t, e, nb, ub, j0, j);
  for (; j < j1; ++j) {
    for (int r = 0; r < F; ++r) trail_column(t[r], e[r], nb, ub + (j - j0), j);
  }
}

// Four filters by 32 columns in sixteen registers (each load of U serves four filters), then
// the filters left two and one at a time. The piece of U must be 64-byte aligned.
__attribute__((target("avx512f"))) void trail_avx512(const FeedbackRowArgs* rows, int n,
                                                     const double (*e)[kBlock], int nb,
                                                     const double* ub, int64_t j0,
                                                     int64_t j1) {
  int r = 0;
  for (; r < n; ) {
    const int f = n - r >= 4 ? 4 : n - r >= 2 ? 2 : 1;
    double* t[4];
    const double* er[4];
    for (int i = 0; i < f; ++i) t[i] = rows[r + i].t, er[i] = e[r + i];
    if (f == 4) trail_filters_avx512<4>(t, er, nb, ub, j0, j1);
    if (f == 2) trail_filters_avx512<2>(t, er, nb, ub, j0, j1);
    if (f == 1) trail_filters_avx512<1>(t, er, nb, ub, j0, j1);
    r += f;
  }
}
#endif

// U's part right of each block, in the order the trail reads it: for block b (columns
// [k0, k1) = [b * kBlock, ...)), its rows over the later columns, piece by piece, each piece a
// kBlock x kTrailPiece tile (row kk, column j at tile[kk * kTrailPiece + j - j0]), 64-byte
// aligned. Packed once per call: in place, U's rows lie K doubles apart, and with K a multiple
// of 256 (ViT-Base's 768 and 3072 inputs) a block's 32 rows map to one or two L1 sets of 8 ways
// and evict each other; copied for every set of filters instead (as until stop 35), the copies
// took two thirds of the trail's own time on a 3072-input layer. The tiles take about half of
// U's memory again; beyond kTrailTilesBytes (K over about 16,000), or with
// CROSSBAR_TORCH_TRAIL_TILES=0 (read on every call: the tests compare both), each set of
// filters copies a block's tile as it goes instead (the same operations on the same values).
struct TrailTiles {
  std::vector<double> store;
  const double* base = nullptr;   // group g's tiles start at base + g * per_group; null: none
  std::vector<int64_t> offset;    // block b's first tile, from its group's start
  int64_t per_group = 0;
  static constexpr int64_t kTile = kBlock * kTrailPiece;
};

constexpr int64_t kTrailTilesBytes = int64_t(1) << 30;

TrailTiles pack_trail_tiles(const double* u, int64_t groups, int64_t K) {
  TrailTiles tt;
  const int64_t blocks = (K + kBlock - 1) / kBlock;
  tt.offset.resize(size_t(blocks));
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t k1 = std::min<int64_t>(K, (b + 1) * kBlock);
    tt.offset[size_t(b)] = tt.per_group;
    tt.per_group += (K - k1 + kTrailPiece - 1) / kTrailPiece * TrailTiles::kTile;
  }
  const char* env = std::getenv("CROSSBAR_TORCH_TRAIL_TILES");
  if ((env != nullptr && env[0] == '0' && env[1] == '\0') ||
      groups * tt.per_group * int64_t(sizeof(double)) > kTrailTilesBytes) {
    return tt;  // no tiles: feedback_rows copies them as it goes
  }
  tt.store.resize(size_t(groups * tt.per_group + 8));
  double* base = tt.store.data();
  base += (8 - (reinterpret_cast<uintptr_t>(base) / sizeof(double)) % 8) % 8;
  tt.base = base;
  at::parallel_for(0, groups * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t gb = begin; gb < end; ++gb) {
      const int64_t g = gb / blocks, b = gb % blocks, k0 = b * kBlock;
      const int64_t k1 = std::min<int64_t>(K, k0 + kBlock);
      double* tile = base + g * tt.per_group + tt.offset[size_t(b)];
      for (int64_t j0 = k1; j0 < K; j0 += kTrailPiece, tile += TrailTiles::kTile) {
        const int64_t j1 = std::min<int64_t>(K, j0 + kTrailPiece);
        for (int64_t kk = 0; kk < k1 - k0; ++kk) {
          const double* src = u + g * K * K + (k0 + kk) * K;
          std::copy(src + j0, src + j1, tile + kk * kTrailPiece);
        }
      }
    }
  });
  return tt;
}

// group g's tiles, or null where none were packed
inline const double* tt_group(const TrailTiles& tt, int64_t g) {
  return tt.base ? tt.base + g * tt.per_group : nullptr;
}

// Rule 21 alone (no write penalty), a weight with held cells: nearest_allowed, whose setup
// (the held mask, the low cells' decoded value d) does not depend on the running target, so it
// is done for a whole filter ahead of its sequential walk, reading the filter's cells in order
// (interleaved over kRowsTogether filters, those reads missed the cache, and the setup took
// most of the walk's time on ViT-Base's layers stuck at p = 0). Returns d where every low cell
// is held (one assignment: the weight takes nearest_held_low(t, d)), kFreeWeight where no cell
// is held (rounding), kSeveralLow where some low cell is free (nearest_allowed's odometer).
constexpr int64_t kFreeWeight = INT64_MIN, kSeveralLow = INT64_MAX;

// Bit i: cell i held. Eight flags (bytes 0 or 1) at a time: the product with 0x0102...80 puts
// byte i's bit at bit 56 + i, which no other byte's reaches. A weight of 8 < c < 16 cells
// (ViT-Base's 14) reads its last eight flags again, overlapping, and keeps the new ones.
inline uint32_t held_mask(const bool* h, const CompFormat& f) {
  constexpr uint64_t kGather = 0x0102040810204080ull;
  uint32_t mask = 0;
  int i = 0;
  for (; i + 8 <= f.c; i += 8) {
    uint64_t x;
    std::memcpy(&x, h + i, 8);
    mask |= uint32_t((x * kGather) >> 56) << i;
  }
  if (i < f.c && f.c >= 8) {  // flags c - 8 .. c - 1: the last c - i of them are new
    uint64_t x;
    std::memcpy(&x, h + f.c - 8, 8);
    mask |= (uint32_t((x * kGather) >> 56) >> (8 - (f.c - i))) << i;
  } else {
    for (; i < f.c; ++i) mask |= uint32_t(h[i]) << i;
  }
  return mask;
}

// decode_one of a weight's cells with its low cells at their levels and the others 0 (what
// decoded_low_cells decodes), by table: the low cells' levels, b bits each in cell order, index
// the decoded values (ViT-Base's format: 2 low cells of 1 bit, 4 values), where decoding the
// c cells took a third of a 768-input layer's time. No table (n = 0) beyond kLowTableBits.
struct LowDecode {
  static constexpr int kLowTableBits = 12;
  int n = 0;               // low cells
  int cell[kMaxCells];     // their positions
  std::vector<int64_t> value;
};

LowDecode make_low_decode(const CompFormat& f) {
  LowDecode ld;
  int n = 0;
  for (int i = 0; i < f.c; ++i) {
    if ((f.low >> i) & 1u) ld.cell[n++] = i;
  }
  if (n == 0 || n * f.b > LowDecode::kLowTableBits) return ld;
  ld.n = n;
  ld.value.resize(size_t(1) << (n * f.b));
  const uint32_t field = (1u << f.b) - 1;
  for (uint32_t idx = 0; idx < ld.value.size(); ++idx) {
    uint8_t cur[kMaxCells] = {0};
    for (int j = 0; j < n; ++j) cur[ld.cell[j]] = uint8_t((idx >> (j * f.b)) & field);
    ld.value[idx] = decode_one(cur, f.B, f.b, f.enc, f.S);
  }
  return ld;
}

inline int64_t decoded_low_cells(const bool* h, const uint8_t* lv, const CompFormat& f,
                                 const LowDecode& ld) {
  const uint32_t mask = held_mask(h, f);
  if (!mask) return kFreeWeight;
  if (f.low & ~mask) return kSeveralLow;
  if (ld.n) {  // levels are checked to fit b bits (check_levels)
    uint32_t idx = 0;
    for (int j = 0; j < ld.n; ++j) idx |= uint32_t(lv[ld.cell[j]]) << (j * f.b);
    return ld.value[idx];
  }
  uint8_t cur[kMaxCells];  // as held_low_cells starts them: every low cell held
  for (int i = 0; i < f.c; ++i) cur[i] = (f.low >> i) & 1u ? lv[i] : 0;
  return decode_one(cur, f.B, f.b, f.enc, f.S);
}

// decoded_low_cells of a packed weight: its flags' bytes `h`, its levels' bytes `lv` (the same
// answers, read without unpacking the weight's c cells)
inline int64_t decoded_low_packed(const uint8_t* h, const uint8_t* lv, const HeldCells& hc,
                                  const CompFormat& f, const LowDecode& ld) {
  const uint32_t mask = hc.mask_at(h);
  if (!mask) return kFreeWeight;
  if (f.low & ~mask) return kSeveralLow;
  if (ld.n) {
    uint32_t idx = 0;
    for (int j = 0; j < ld.n; ++j) idx |= uint32_t(hc.level_at(lv, ld.cell[j])) << (j * f.b);
    return ld.value[idx];
  }
  uint8_t cur[kMaxCells];  // as held_low_cells starts them: every low cell held
  for (int i = 0; i < f.c; ++i) cur[i] = (f.low >> i) & 1u ? hc.level_at(lv, i) : 0;
  return decode_one(cur, f.B, f.b, f.enc, f.S);
}

// nearest_with_low(t, d, f, s).value() for a fresh s (nearest_allowed where every low cell is
// held and they decode to d), its comparisons without branches: the two high parts around
// (t - d) / 2**m, clamped to those that keep the value in [-qmax, qmax] when there are any,
// else to the high slices' range, and feedback_better between them (the running targets'
// comparisons went either way and mispredicted, a quarter of a 768-input layer's time).
inline int64_t nearest_held_low(double t, int64_t d, const CompFormat& f) {
  const int64_t unit = int64_t(1) << f.m;
  int64_t lo, hi;
  in_range_highs(d, f, lo, hi);
  const int64_t a = lo > f.hmin ? lo : f.hmin, z = hi < f.hmax ? hi : f.hmax;
  const bool in = a <= z;
  const int64_t p = in ? a : f.hmin, q = in ? z : f.hmax;
  const int64_t h0 = int64_t(floor((t - double(d)) * f.inv_unit));
  const int64_t h1 = h0 < p ? p : (h0 > q ? q : h0);
  const int64_t h2 = h0 + 1 < p ? p : (h0 + 1 > q ? q : h0 + 1);
  const int64_t v1 = h1 * unit + d, v2 = h2 * unit + d;
  const double d1 = fabs(double(v1) - t), d2 = fabs(double(v2) - t);
  const bool e1 = (v1 & 1) == 0, e2 = (v2 & 1) == 0;
  // feedback_better(v2, v1, t): nearer; ties to the even value, then the smaller
  const bool second = (d2 < d1) | ((d2 == d1) & ((e2 & !e1) | ((e2 == e1) & (v2 < v1))));
  return second ? v2 : v1;
}

// feedback_row for n <= kRowsTogether filters of one group at once: column k is chosen in every
// filter; the carries go as above. Each filter sees exactly feedback_row's operations on each
// element in feedback_row's order (bit-identical results). U, which does not fit in cache on
// ViT-Base's layers (3072 x 3072 doubles), is read from memory once per block for the n
// filters (from group `group`'s tiles, pack_trail_tiles). Inlined into each
// instruction-set variant below (the POPCNT instruction for rule 23's write counts; the
// trail's width).
template <VectorIsa I>
inline __attribute__((always_inline)) void feedback_rows_impl(
    const FeedbackRowArgs* rows, int n, const double* u, const TrailTiles& tt,
    int64_t group, int64_t K, const CompFormat& f, const CellCodes& codes,
    const LowDecode& ld, const HeldCells& hc) {
  const double* tiles = tt_group(tt, group);  // null: none packed, copied as it goes below
  double e[kRowsTogether][kBlock];
  alignas(64) double own[TrailTiles::kTile];  // a block's tile, where none were packed
  // rule 21 alone with held cells: every weight's setup, filter by filter (decoded_low_cells;
  // packed, each weight's bytes at its sorted position, a filter's rows in L1)
  thread_local std::vector<int64_t> low;
  const bool packed = rows[0].hpk != nullptr;  // the same for every filter of a call
  const bool ahead = (rows[0].held || packed) && !rows[0].chosen;
  if (ahead) {
    low.resize(size_t(n * K));
    for (int r = 0; r < n; ++r) {
      int64_t* lr = low.data() + r * K;
      if (packed) {
        const int64_t* po = rows[r].pos;
        for (int64_t k = 0; k < K; ++k) {
          lr[k] = decoded_low_packed(rows[r].hpk + po[k] * hc.hb, rows[r].lpk + po[k] * hc.lb,
                                     hc, f, ld);
        }
        continue;
      }
      const bool* h = rows[r].held;
      const uint8_t* lv = rows[r].lv;
      for (int64_t k = 0; k < K; ++k) {
        lr[k] = decoded_low_cells(h + k * f.c, lv + k * f.c, f, ld);
      }
    }
  }
  // a packed weight's cells for the general pick: its flags as a mask, its levels unpacked
  uint8_t lk[kMaxCells];
  auto weight_mask = [&](const FeedbackRowArgs& a, int64_t k) -> uint32_t {
    if (!packed) return a.held ? held_mask(a.held + k * f.c, f) : 0u;
    const int64_t p = a.pos[k];
    unpack_slots(a.lpk + p * hc.lb, f.c, hc.s, lk);
    return hc.mask_at(a.hpk + p * hc.hb);
  };
  auto pick = [&](const FeedbackRowArgs& a, int64_t k) -> int64_t {
    if (!packed) return feedback_pick(a.t[k], k, a.held, a.lv, f, a.lambda, a.pos, a.ref,
                                      a.chosen);
    const uint32_t mask = weight_mask(a, k);
    return feedback_pick_weight(a.t[k], mask, lk, f, a.lambda, a.chosen ? a.pos[k] : 0, a.ref,
                                a.chosen);
  };
  for (int64_t k0 = 0; k0 < K; k0 += kBlock) {
    const int64_t k1 = std::min<int64_t>(K, k0 + kBlock);
    for (int64_t k = k0; k < k1; ++k) {
      const double* uk = u + k * K;
      for (int r = 0; r < n; ++r) {
        const FeedbackRowArgs& a = rows[r];
        // not set up ahead (rule 23, or nothing held): the general pick, below
        const int64_t d = ahead ? low[size_t(r * K + k)] : kSeveralLow;
        int64_t v;
        if (d == kFreeWeight) {
          v = nearest_allowed(a.t[k], nullptr, 0u, f);
        } else if (d != kSeveralLow) {
          v = nearest_held_low(a.t[k], d, f);
        } else if (a.chosen) {  // rule 23
          if (k + 1 < K) {
            // the next weight's cells in the predecessor's choice, and where its own go: a
            // sorted position far from this one, long out of cache (a third of the rule-23
            // choice waited on the first)
            if (a.ref) __builtin_prefetch(a.ref + a.pos[k + 1] * f.c);
            __builtin_prefetch(a.chosen + a.pos[k + 1] * f.c, 1);
          }
          const uint32_t mask = (a.held || packed) ? weight_mask(a, k) : 0u;
          if (codes.usable && !mask) {
            const int64_t p = a.pos[k];
            v = write_aware_free<I == VectorIsa::kAvx512>(
                a.t[k], a.ref ? a.ref + p * f.c : nullptr, a.lambda, f, codes, a.chosen + p * f.c);
          } else if (packed) {  // lk holds its levels (weight_mask)
            v = feedback_pick_weight(a.t[k], mask, lk, f, a.lambda, a.pos[k], a.ref, a.chosen);
          } else {
            v = feedback_pick(a.t[k], k, a.held, a.lv, f, a.lambda, a.pos, a.ref, a.chosen);
          }
        } else {
          v = pick(a, k);
        }
        a.out[k] = int32_t(v);
        const double er = double(v) - a.t0[k];
        e[r][k - k0] = er;
        for (int64_t j = k + 1; j < k1; ++j) a.t[j] = a.t[j] - xb_mul(er, uk[j]);
      }
    }
    const int nb = int(k1 - k0);
    const double* tile = tiles ? tiles + tt.offset[size_t(k0 / kBlock)] : own;
    for (int64_t j0 = k1; j0 < K; j0 += kTrailPiece, tile += tiles ? TrailTiles::kTile : 0) {
      const int64_t j1 = std::min<int64_t>(K, j0 + kTrailPiece);
      if (!tiles) {
        for (int kk = 0; kk < nb; ++kk) {
          std::copy(u + (k0 + kk) * K + j0, u + (k0 + kk) * K + j1, own + kk * kTrailPiece);
        }
      }
#ifdef XB_X86_VECTOR
      if constexpr (I == VectorIsa::kAvx512) {
        trail_avx512(rows, n, e, nb, tile, j0, j1);
        continue;
      } else if constexpr (I == VectorIsa::kAvx2) {
        trail_avx2(rows, n, e, nb, tile, j0, j1);
        continue;
      }
#endif
      trail_scalar(rows, n, e, nb, tile, j0, j1);
    }
  }
}

using RowsFn = void (*)(const FeedbackRowArgs*, int, const double*, const TrailTiles&, int64_t,
                        int64_t, const CompFormat&, const CellCodes&, const LowDecode&,
                        const HeldCells&);

void feedback_rows_plain(const FeedbackRowArgs* rows, int n, const double* u,
                         const TrailTiles& tt, int64_t group, int64_t K,
                         const CompFormat& f, const CellCodes& codes, const LowDecode& ld,
                         const HeldCells& hc) {
  feedback_rows_impl<VectorIsa::kScalar>(rows, n, u, tt, group, K, f, codes, ld, hc);
}

#ifdef XB_X86_VECTOR
__attribute__((target("popcnt"))) void feedback_rows_avx2(
    const FeedbackRowArgs* rows, int n, const double* u, const TrailTiles& tt,
    int64_t group, int64_t K, const CompFormat& f, const CellCodes& codes,
    const LowDecode& ld, const HeldCells& hc) {
  feedback_rows_impl<VectorIsa::kAvx2>(rows, n, u, tt, group, K, f, codes, ld, hc);
}

XB_WIDE_CODES_TARGET void feedback_rows_avx512(
    const FeedbackRowArgs* rows, int n, const double* u, const TrailTiles& tt,
    int64_t group, int64_t K, const CompFormat& f, const CellCodes& codes,
    const LowDecode& ld, const HeldCells& hc) {
  feedback_rows_impl<VectorIsa::kAvx512>(rows, n, u, tt, group, K, f, codes, ld, hc);
}
#endif

RowsFn pick_rows(VectorIsa isa) {
#ifdef XB_X86_VECTOR
  // (an AVX-512 CPU without wide_codes_supported's instructions takes the AVX2 path)
  if (isa == VectorIsa::kAvx512 && !wide_codes_supported()) isa = VectorIsa::kAvx2;
  return pick_variant<RowsFn>(isa, feedback_rows_plain, feedback_rows_avx2, feedback_rows_avx512);
#else
  return feedback_rows_plain;
#endif
}

// (q, the running targets: each weight's at its choice, rule 21's warning reads them)
std::tuple<at::Tensor, at::Tensor> feedback_quantize_cpu(
    const at::Tensor& target_in, const at::Tensor& u_in, const at::Tensor& held_in,
    const at::Tensor& levels_in, int64_t weight_bits, int64_t bits_per_cell, int64_t encoding,
    int64_t stuck_slices, const at::Tensor& pred, const at::Tensor& sort_index,
    double write_penalty, const std::optional<at::Tensor>& filter_weight) {
  TORCH_CHECK(target_in.device().is_cpu(),
              "crossbar_torch.feedback_quantize: target must be a CPU tensor here, got ",
              target_in.device());
  const int64_t c = check_feedback_quantize(target_in, u_in, held_in, levels_in, weight_bits,
                                            bits_per_cell, encoding, stuck_slices, pred,
                                            sort_index, write_penalty, filter_weight);
  const at::Tensor t0 = target_in.contiguous();  // the targets (rule 21's errors)
  at::Tensor t = t0.clone();  // running targets, updated in place
  const at::Tensor u = u_in.contiguous(), held = held_in.contiguous(),
                   levels = levels_in.contiguous();
  const bool packed = held_packed(held) && held.numel();  // a layer's buffers, sorted order
  check_feedback_quantize_values(t, u, levels, bits_per_cell, packed);
  const int64_t out = t.size(0), K = t.size(1), groups = u.size(0);
  at::Tensor q = at::empty({out, K}, t.options().dtype(at::kInt));
  if (out == 0 || K == 0) return {q, t};
  const CompFormat fmt = make_comp_format(int(weight_bits), int(bits_per_cell), int(encoding),
                                          int(stuck_slices));
  double* tp = t.mutable_data_ptr<double>();
  const double* t0p = t0.const_data_ptr<double>();
  const double* up = u.const_data_ptr<double>();
  // weight k's sorted position: rule 23's cells, and packed held cells, are in sorted order
  at::Tensor pos;
  if (write_penalty > 0.0 || packed) pos = sorted_positions(sort_index.contiguous());
  const int64_t* pp = pos.defined() ? pos.const_data_ptr<int64_t>() : nullptr;
  HeldCells hc;
  if (packed) {
    hc.hpk = held.const_data_ptr<uint8_t>();
    hc.lpk = levels.const_data_ptr<uint8_t>();
    hc.pos = pp;
    hc.hb = held.size(2);
    hc.lb = levels.size(2);
    hc.s = checked_slot_bits(bits_per_cell, "feedback_quantize");
    while ((1 << hc.log_s) < hc.s) ++hc.log_s;
    hc.log_per = 3 - hc.log_s;
  } else if (held.numel()) {
    hc.held = held.const_data_ptr<bool>();
    hc.lv = levels.const_data_ptr<uint8_t>();
  }
  hc.K = K;
  hc.c = c;
  int32_t* qp = q.mutable_data_ptr<int32_t>();
  const int64_t per_group = out / groups;
  const RowsFn feedback_rows = pick_rows(cpu_vector_isa());
  const TrailTiles tt = pack_trail_tiles(up, groups, K);
  const LowDecode ld = hc.any() ? make_low_decode(fmt) : LowDecode();  // rule 21's held weights
  if (write_penalty > 0.0) {
    // rule 25: filter o pays write_penalty / a[o] per write (a[o] = 1: rule 23 exactly)
    const std::vector<double> lam = filter_penalties(write_penalty, filter_weight, out);
    const CellCodes codes = make_cell_codes(fmt);
    const FeedbackChains ch = feedback_chains(pred, out);
    // the cells each filter chose, in sorted order: its successor's reference
    at::Tensor chosen = at::empty({out, K, c}, t.options().dtype(at::kByte));
    uint8_t* cp = chosen.mutable_data_ptr<uint8_t>();
    // Chains run side by side, each filter after its predecessor: up to kRowsTogether chains
    // advance in step (their filters at one depth go through feedback_rows together, when
    // they share a group's U).
    const int64_t heads = int64_t(ch.heads.size());
    at::parallel_for(0, heads, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c0 = begin; c0 < end; c0 += kRowsTogether) {
        const int64_t c1 = std::min<int64_t>(end, c0 + kRowsTogether);
        int64_t cur[kRowsTogether], prev[kRowsTogether];
        for (int64_t i = c0; i < c1; ++i) cur[i - c0] = ch.heads[i], prev[i - c0] = -1;
        for (;;) {
          FeedbackRowArgs rows[kRowsTogether];
          int n = 0;
          int64_t group = -1;
          for (int64_t i = 0; i < c1 - c0; ++i) {
            const int64_t o = cur[i];
            if (o < 0) continue;
            if (group >= 0 && o / per_group != group) {  // another group's U: on its own
              const bool* h;
              const uint8_t* l;
              hc.filter(o, h, l);
              feedback_row(tp + o * K, t0p + o * K, up + (o / per_group) * K * K, h, l, K,
                           fmt, qp + o * K, lam[size_t(o)], pp + o * K,
                           prev[i] >= 0 ? cp + prev[i] * K * c : nullptr, cp + o * K * c);
              continue;
            }
            group = o / per_group;
            rows[n] = {tp + o * K, t0p + o * K, nullptr, nullptr, qp + o * K, pp + o * K,
                       prev[i] >= 0 ? cp + prev[i] * K * c : nullptr, cp + o * K * c,
                       lam[size_t(o)]};
            hc.set_row(o, rows[n++]);
          }
          if (group < 0) break;  // every chain of this set has ended
          feedback_rows(rows, n, up + group * K * K, tt, group, K, fmt, codes, ld, hc);
          for (int64_t i = 0; i < c1 - c0; ++i) {
            if (cur[i] >= 0) prev[i] = cur[i], cur[i] = ch.succ[cur[i]];
          }
        }
      }
    });
    return {q, t};
  }
  const CellCodes codes;  // rule 21 alone: not used
  // blocks of kRowsTogether filters within one group (they share U)
  const int64_t blocks_per_group = (per_group + kRowsTogether - 1) / kRowsTogether;
  at::parallel_for(0, groups * blocks_per_group, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t g = b / blocks_per_group;
      const int64_t o0 = g * per_group + (b % blocks_per_group) * kRowsTogether;
      const int64_t o1 = std::min<int64_t>((g + 1) * per_group, o0 + kRowsTogether);
      FeedbackRowArgs rows[kRowsTogether];
      int n = 0;
      for (int64_t o = o0; o < o1; ++o) {
        rows[n] = {tp + o * K, t0p + o * K, nullptr, nullptr, qp + o * K, nullptr, nullptr,
                   nullptr, 0.0};
        hc.set_row(o, rows[n++]);
      }
      feedback_rows(rows, n, up + g * K * K, tt, g, K, fmt, codes, ld, hc);
    }
  });
  return {q, t};
}

}  // namespace

TORCH_LIBRARY_IMPL(crossbar_torch, CPU, m) {
  m.impl("feedback_quantize", &feedback_quantize_cpu);
}

}  // namespace crossbar_torch
