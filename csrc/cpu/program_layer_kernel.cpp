// program_layer / CPU: program every tile of one layer onto the pool of crossbars, count the
// transitions on packed 64-bit words (XOR + popcount), update state / written / cell_writes in
// place. Semantics: docs/semantics.md rules 5 to 13; reference: reference.program_layer.
//
// Tile order: replayed when given; otherwise section-major (window 0) or chosen greedily
// (rule 12) while programming.
//
// Replay: every physical row r of every crossbar evolves independently of the other rows (row r
// of tile (s, j) is sorted position k' = s*rows + r, and a weight lies in one row), so rows are
// split across threads with at::parallel_for; each thread walks the tiles in order over its own
// block of rows, keeps per-row partial stats, and the partials are summed at the end. The
// targets of a tile row are packed 16 cells at a time (SSE2 movemask); the effective cells
// start as a copy of the targets and only cells that end on another level are patched.
//
// Greedy: each step needs the distance of every candidate tile to the crossbar's current
// state, so steps run one after the other: all tiles are packed once, candidates are scored in
// parallel, and the chosen tile is programmed row by row.
#include <ATen/Parallel.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <tuple>
#include <vector>

#include "../common.h"
#include "../program_layer_args.h"
#include "../program_row.h"
#include "comp_table.h"

namespace crossbar_torch {
namespace {

// x86-64 without -mpopcnt turns __builtin_popcountll into a libgcc call; the row kernel is
// instantiated a second time with the POPCNT instruction enabled and chosen at run time.
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__)) && \
    !defined(__POPCNT__)
#define XB_ALWAYS_INLINE __attribute__((always_inline))
inline bool cpu_has_popcnt() { return __builtin_cpu_supports("popcnt"); }
template <class Fn>
__attribute__((target("popcnt"), noinline, flatten)) void run_with_popcnt(const Fn& fn, int64_t b,
                                                                 int64_t e) {
  fn(b, e);
}
#else
#define XB_ALWAYS_INLINE
inline bool cpu_has_popcnt() { return false; }
template <class Fn>
void run_with_popcnt(const Fn& fn, int64_t b, int64_t e) { fn(b, e); }
#endif

// Packs one tile row's plain target levels into planes x words bit planes (out[p * words + w]):
// slot f of the block holds filter slot_filter[f] (-1: nothing), its cell i in column f*c + i.
// SSE2 path: 16 cells at a time, bit p of each byte moved to the sign bit, then movemask.
inline void pack_tile_row(const uint8_t* cp, const int64_t* slot_filter, int64_t F, int64_t K,
                          int64_t kp, int64_t c, int planes, int64_t words, int64_t nw,
                          const uint8_t* cend, uint64_t* target) {
  for (int p = 0; p < planes; ++p) {
    for (int64_t w = 0; w < nw; ++w) target[p * words + w] = 0;
  }
  auto put = [&](int p, int64_t col, uint64_t m, int64_t n) {  // n <= 16 bits at col
    const int64_t w = col >> 6, b = col & 63;
    target[p * words + w] |= m << b;
    if (b + n > 64) target[p * words + w + 1] |= m >> (64 - b);
  };
  for (int64_t f = 0; f < F; ++f) {
    const int64_t o = slot_filter[f];
    if (o < 0) continue;
    const uint8_t* cell = cp + (o * K + kp) * c;
    for (int64_t i0 = 0; i0 < c; i0 += 16) {
      const int64_t n = std::min<int64_t>(16, c - i0);
      const uint64_t nmask = (uint64_t(1) << n) - 1;
      const int64_t col = f * c + i0;
#if defined(__SSE2__)
      __m128i v;
      if (cell + i0 + 16 <= cend) {
        v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(cell + i0));
      } else {
        alignas(16) uint8_t buf[16] = {0};
        std::memcpy(buf, cell + i0, size_t(n));
        v = _mm_load_si128(reinterpret_cast<const __m128i*>(buf));
      }
      for (int p = 0; p < planes; ++p) {
        // 16-bit lanes shifted left by 7 - p: bit p of every byte lands in that byte's bit 7.
        const __m128i sh = _mm_sll_epi16(v, _mm_cvtsi32_si128(7 - p));
        const uint64_t m = uint64_t(uint32_t(_mm_movemask_epi8(sh))) & nmask;
        if (m) put(p, col, m, n);
      }
#else
      for (int p = 0; p < planes; ++p) {
        uint64_t m = 0;
        for (int64_t i = 0; i < n; ++i) m |= uint64_t((cell[i0 + i] >> p) & 1) << i;
        if (m) put(p, col, m, n);
      }
      (void)cend;
#endif
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> program_layer_cpu(
    const at::Tensor& cells_in, const at::Tensor& filter_index, const at::Tensor& order_in,
    const at::Tensor& pinned_in, at::Tensor& state, at::Tensor& written,
    const at::Tensor& stuck_in, at::Tensor& cell_writes, int64_t tile_offset, int64_t rows,
    int64_t cols, int64_t weight_bits, int64_t bits_per_cell, int64_t encoding,
    bool stuck_initial, bool count_cells, int64_t compensate_slices, int64_t window) {
  TORCH_CHECK(cells_in.device().is_cpu(),
              "crossbar_torch.program_layer: cells must be a CPU tensor here, got ",
              cells_in.device());
  const ProgramLayout L = check_program_layer(
      cells_in, filter_index, order_in, pinned_in, state, written, stuck_in, cell_writes,
      tile_offset, rows, cols, weight_bits, bits_per_cell, encoding, count_cells,
      compensate_slices, window);
  tile_offset %= L.pool;  // crossbar (tile_offset + pos) % pool, without overflowing int64
  const at::Tensor cells = cells_in.contiguous();
  // Small layers run on one thread: waking the pool costs more than it saves (and much more
  // on an oversubscribed machine).
  const int64_t ncells = cells.numel();
  const bool small = ncells < (int64_t(1) << 21);
  // One pass over the cells before anything is mutated: the largest level of the targets and
  // of the pinned levels other than 255 (validation), and the effective cells' starting
  // point, a copy of the targets (cells that end on another level are patched while
  // programming).
  at::Tensor eff = at::empty_like(cells);
  const at::Tensor pinned = pinned_in.numel() ? pinned_in.contiguous() : pinned_in;
  {
    const uint8_t* cp = cells.const_data_ptr<uint8_t>();
    const uint8_t* pp = pinned.numel() ? pinned.const_data_ptr<uint8_t>() : nullptr;
    uint8_t* ep = eff.mutable_data_ptr<uint8_t>();
    // (target max, pinned max): 16 bits each, reduced as one integer pair
    const uint32_t maxes = at::parallel_reduce(
        0, ncells, small ? std::max<int64_t>(ncells, 1) : (int64_t(1) << 20), uint32_t(0),
        [&](int64_t b, int64_t e, uint32_t acc) {
          std::memcpy(ep + b, cp + b, size_t(e - b));
          uint8_t mc = uint8_t(acc & 0xFF), mp = uint8_t(acc >> 16);
          for (int64_t i = b; i < e; ++i) mc = std::max(mc, cp[i]);
          if (pp) {  // level + 1, wrapping: 255 (not pinned) counts as 0 (vectorizes)
            for (int64_t i = b; i < e; ++i) mp = std::max(mp, uint8_t(pp[i] + 1));
          }
          return uint32_t(mc) | (uint32_t(mp) << 16);
        },
        [](uint32_t x, uint32_t y) {
          return uint32_t(std::max(x & 0xFF, y & 0xFF)) | (std::max(x >> 16, y >> 16) << 16);
        });
    check_levels_fit(int64_t(maxes & 0xFF), bits_per_cell);
    check_pinned_fit(int64_t(maxes >> 16) - 1, bits_per_cell);
  }
  const at::Tensor stuck = stuck_in.contiguous();
  const int64_t K = L.K, c = L.c, pool = L.pool, words = L.words, F = L.F, nb = L.n_blocks;
  const int planes = int(L.planes);
  const int64_t nstat = kNumStats + L.S;
  const int64_t rstride = kNumStats + L.nsl;
  std::vector<int64_t> row_stats(size_t(rows * rstride), 0);
  at::Tensor order = L.order.defined() ? L.order : at::empty({L.tiles}, at::kLong);
  int64_t* od = order.mutable_data_ptr<int64_t>();

  const uint8_t* cp = cells.const_data_ptr<uint8_t>();
  const uint8_t* cend = cp + cells.numel();
  uint8_t* ep = eff.mutable_data_ptr<uint8_t>();
  uint64_t* stp = reinterpret_cast<uint64_t*>(state.mutable_data_ptr<int64_t>());
  uint64_t* wrp = reinterpret_cast<uint64_t*>(written.mutable_data_ptr<int64_t>());
  const uint64_t* skp = reinterpret_cast<const uint64_t*>(stuck.const_data_ptr<int64_t>());
  int32_t* cwp = count_cells ? cell_writes.mutable_data_ptr<int32_t>() : nullptr;
  const int64_t* slot_filter = L.slot_filter.const_data_ptr<int64_t>();
  const uint64_t* covered = reinterpret_cast<const uint64_t*>(L.covered.const_data_ptr<int64_t>());
  const uint64_t* slice_mask =
      reinterpret_cast<const uint64_t*>(L.slice_mask.const_data_ptr<int64_t>());

  TileRowArgs proto;
  proto.cells = cp;
  proto.pinned = pinned.numel() ? pinned.const_data_ptr<uint8_t>() : nullptr;
  proto.eff = ep;
  proto.K = K;
  proto.c = c;
  proto.words = words;
  proto.nw = L.nw;
  proto.nsl = L.nsl;
  proto.planes = planes;
  proto.stuck_initial = stuck_initial;
  proto.comp_slices = int(compensate_slices);
  proto.fmt = make_comp_format(int(weight_bits), int(bits_per_cell), int(encoding),
                               int(compensate_slices));
  // rule 13 by table where the format has one (kept alive for the whole call)
  const std::shared_ptr<const CompTableHolder> table =
      compensate_slices > 0 ? comp_table_for(proto.fmt) : nullptr;
  proto.table = table ? &table->view : nullptr;
  proto.slice_mask = slice_mask;
  // Points `a` at tile row r of tile t (block j) on crossbar x.
  auto bind = [&](TileRowArgs& a, int64_t x, int64_t r, int64_t s, int64_t j) {
    const int64_t xr = x * rows + r;
    a.slot_filter = slot_filter + j * F;
    a.kp = s * rows + r;
    a.state = stp + xr * planes * words;
    a.written = wrp + xr * words;
    a.stuck = skp + xr * words;
    a.cell_writes = count_cells ? cwp + xr * cols : nullptr;
    a.covered = covered + j * words;
  };
  auto rows_of = [&](int64_t s) { return std::min(K, (s + 1) * rows) - s * rows; };
  static const bool has_popcnt = cpu_has_popcnt();

  if (L.tiles > 0 && (L.order.defined() || window == 0)) {
    if (!L.order.defined()) {
      for (int64_t t = 0; t < L.tiles; ++t) od[t] = t;  // section-major
    }
    const int64_t grain = small ? rows : std::max<int64_t>(1, rows / (4 * at::get_num_threads()));
    auto rows_kernel = [&](int64_t r_begin, int64_t r_end) XB_ALWAYS_INLINE {
      std::vector<uint64_t> scratch(size_t(2 * planes * words + words));
      TileRowArgs a = proto;
      a.plain = scratch.data();
      a.target = a.plain + planes * words;
      a.allowed = a.target + planes * words;
      for (int64_t pos = 0; pos < L.tiles; ++pos) {
        const int64_t t = od[pos], s = t / nb, j = t % nb;
        const int64_t x = (tile_offset + pos) % pool;
        const int64_t nr = rows_of(s);
        for (int64_t r = r_begin; r < std::min(r_end, nr); ++r) {
          bind(a, x, r, s, j);
          pack_tile_row(cp, a.slot_filter, F, K, a.kp, c, planes, words, L.nw, cend, a.plain);
          program_tile_row(a, row_stats.data() + r * rstride);
        }
      }
    };
    at::parallel_for(0, rows, grain, [&](int64_t r_begin, int64_t r_end) {
      if (has_popcnt) {
        run_with_popcnt(rows_kernel, r_begin, r_end);
      } else {
        rows_kernel(r_begin, r_end);
      }
    });
  } else if (L.tiles > 0) {
    // Greedy (rule 12). Every tile row's plain targets, packed once: (tile, row, plane, word).
    const int64_t row_words = planes * words;
    const int64_t tile_words = rows * row_words;
    std::vector<uint64_t> packed(size_t(L.tiles * tile_words), 0);
    at::parallel_for(0, L.tiles, small ? L.tiles : 1, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const int64_t s = t / nb, j = t % nb;
        for (int64_t r = 0; r < rows_of(s); ++r) {
          pack_tile_row(cp, slot_filter + j * F, F, K, s * rows + r, c, planes, words, L.nw,
                        cend, packed.data() + t * tile_words + r * row_words);
        }
      }
    });
    std::vector<int64_t> remaining(size_t(L.tiles));
    for (int64_t t = 0; t < L.tiles; ++t) remaining[size_t(t)] = t;
    std::vector<int64_t> dist;
    std::vector<uint64_t> scratch(size_t(planes * words + words));
    TileRowArgs a = proto;
    a.target = scratch.data();
    a.allowed = a.target + planes * words;
    auto score = [&](int64_t x, int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const int64_t t = remaining[size_t(i)], s = t / nb, j = t % nb;
        int64_t d = 0;
        for (int64_t r = 0; r < rows_of(s); ++r) {
          d += tile_row_distance(stp + (x * rows + r) * row_words,
                                 packed.data() + t * tile_words + r * row_words,
                                 covered + j * words, L.nw, words, planes);
        }
        dist[size_t(i)] = d;
      }
    };
    for (int64_t step = 0; step < L.tiles; ++step) {
      const int64_t x = (tile_offset + step) % pool;
      const int64_t n = std::min<int64_t>(window, int64_t(remaining.size()));
      dist.assign(size_t(n), 0);
      const int64_t work = n * rows * L.nw * planes;
      if (work < (int64_t(1) << 16)) {
        score(x, 0, n);
      } else {
        at::parallel_for(0, n, std::max<int64_t>(1, n / (4 * at::get_num_threads())),
                         [&](int64_t b, int64_t e) { score(x, b, e); });
      }
      int64_t best = 0;  // the first minimum: ties go to the earliest tile in section-major order
      for (int64_t i = 1; i < n; ++i) {
        if (dist[size_t(i)] < dist[size_t(best)]) best = i;
      }
      const int64_t t = remaining[size_t(best)], s = t / nb, j = t % nb;
      remaining.erase(remaining.begin() + best);
      od[step] = t;
      for (int64_t r = 0; r < rows_of(s); ++r) {
        bind(a, x, r, s, j);
        a.plain = packed.data() + t * tile_words + r * row_words;
        program_tile_row(a, row_stats.data() + r * rstride);
      }
    }
  }

  clear_padding_bits(state, written, cols);
  at::Tensor stats = at::zeros({nstat}, cells.options().dtype(at::kLong));
  int64_t* sp = stats.mutable_data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t k = 0; k < rstride; ++k) sp[k] += row_stats[size_t(r * rstride + k)];
  }
  return std::make_tuple(eff, stats, order);
}

}  // namespace

TORCH_LIBRARY_IMPL(crossbar_torch, CPU, m) { m.impl("program_layer", &program_layer_cpu); }

}  // namespace crossbar_torch
