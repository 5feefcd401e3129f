// program_layer / CPU: program every tile of one layer onto the pool of crossbars, count the
// transitions on packed 64-bit words (XOR + popcount), update state / written / cell_writes in
// place. Semantics: reference.program_layer.
//
// Every physical row r of every crossbar evolves independently of the other rows (row r of tile
// (s, j) is sorted position k' = s*rows + r), so rows are split across threads with
// at::parallel_for; each thread walks the tiles in schedule order over its own block of rows
// (rows inner, so consecutive rows read consecutive cells), keeps per-row partial stats, and the
// partials are summed at the end. The targets of a tile row are packed 16 cells at a time
// (SSE2 movemask); the effective cells start as a copy of the targets and only cells that kept
// another level are patched. Only O(planes) words per row are live at a time: no unpacked
// copy of the state or of a tile is ever made.
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

namespace crossbar_torch {
namespace {

// x86-64 without -mpopcnt turns __builtin_popcountll into a libgcc call; the row kernel is
// instantiated a second time with the POPCNT instruction enabled and chosen at run time.
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__)) && \
    !defined(__POPCNT__)
#define XB_ALWAYS_INLINE __attribute__((always_inline))
inline bool cpu_has_popcnt() { return __builtin_cpu_supports("popcnt"); }
template <class Fn>
__attribute__((target("popcnt"), noinline)) void run_with_popcnt(const Fn& fn, int64_t b,
                                                                 int64_t e) {
  fn(b, e);
}
#else
#define XB_ALWAYS_INLINE
inline bool cpu_has_popcnt() { return false; }
template <class Fn>
void run_with_popcnt(const Fn& fn, int64_t b, int64_t e) { fn(b, e); }
#endif

// Packs one tile row's target levels into planes x words bit planes (target[p * words + w]):
// column f*c + i holds cells src[f * Kc + i], f < nf, i < c. Uncovered bits are zero.
// SSE2 path: 16 cells at a time, bit p of each byte moved to the sign bit, then movemask.
inline void pack_tile_row(const uint8_t* src, int64_t Kc, int64_t nf, int64_t c, int planes,
                          int64_t words, const uint8_t* cend, uint64_t* target) {
  const int64_t nw = (nf * c + 63) / 64;
  for (int p = 0; p < planes; ++p) {
    for (int64_t w = 0; w < nw; ++w) target[p * words + w] = 0;
  }
  auto put = [&](int p, int64_t col, uint64_t m, int64_t n) {  // n <= 16 bits at col
    const int64_t w = col >> 6, b = col & 63;
    target[p * words + w] |= m << b;
    if (b + n > 64) target[p * words + w + 1] |= m >> (64 - b);
  };
  for (int64_t f = 0; f < nf; ++f) {
    const uint8_t* cell = src + f * Kc;
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

std::tuple<at::Tensor, at::Tensor> program_layer_cpu(
    const at::Tensor& cells_in, at::Tensor& state, at::Tensor& written, const at::Tensor& stuck_in,
    at::Tensor& cell_writes, int64_t tile_offset, int64_t rows, int64_t cols,
    int64_t bits_per_cell, int64_t slices, bool stuck_initial, bool count_cells) {
  TORCH_CHECK(cells_in.device().is_cpu(),
              "crossbar_torch.program_layer: cells must be a CPU tensor here, got ",
              cells_in.device());
  const ProgramArgs a = check_program_layer(cells_in, state, written, stuck_in, cell_writes,
                                            tile_offset, rows, cols, bits_per_cell, slices,
                                            count_cells, /*check_levels=*/false);
  const at::Tensor cells = cells_in.contiguous();
  // Small layers run on one thread: waking the pool costs more than it saves (and much more
  // on an oversubscribed machine).
  const int64_t ncells = cells.numel();
  const bool small = ncells < (int64_t(1) << 21);
  // One pass over the cells before anything is mutated: the largest level (validation) and
  // the effective cells' starting point, a copy of the targets (cells that keep another level
  // are patched below).
  at::Tensor eff = at::empty_like(cells);
  {
    const uint8_t* cp = cells.const_data_ptr<uint8_t>();
    uint8_t* ep = eff.mutable_data_ptr<uint8_t>();
    const uint8_t max_level = at::parallel_reduce(
        0, ncells, small ? std::max<int64_t>(ncells, 1) : (int64_t(1) << 20), uint8_t(0),
        [&](int64_t b, int64_t e, uint8_t acc) {
          std::memcpy(ep + b, cp + b, size_t(e - b));
          for (int64_t i = b; i < e; ++i) acc = std::max(acc, cp[i]);
          return acc;
        },
        [](uint8_t x, uint8_t y) { return std::max(x, y); });
    check_levels_fit(max_level, bits_per_cell);
  }
  const at::Tensor stuck = stuck_in.contiguous();
  const int64_t out = a.out, K = a.K, c = a.c, pool = a.pool, words = a.words;
  const int planes = int(a.planes);
  const int64_t nsl = a.nsl;
  const int64_t nstat = kNumStats + slices;
  const int64_t F = cols / c;
  const int64_t n_sections = K ? (K + rows - 1) / rows : 0;
  const int64_t n_blocks = out ? (out + F - 1) / F : 0;

  // Column -> slice masks: column col (< F*c) holds slice (col % c) % slices.
  std::vector<uint64_t> slice_mask(size_t(nsl * words), 0);
  for (int64_t col = 0; col < F * c; ++col) {
    slice_mask[size_t(((col % c) % slices) * words + col / 64)] |= uint64_t(1) << (col % 64);
  }
  // Column -> offset of its cell within a tile row of `cells` / `eff` (avoids a division per
  // patched cell).
  std::vector<int64_t> col_offset(size_t(F * c));
  for (int64_t col = 0; col < F * c; ++col) col_offset[size_t(col)] = (col / c) * K * c + col % c;
  // Per-row partial stats (writes, sets, resets, pulses, rows_programmed, per slice).
  const int64_t rstride = kNumStats + nsl;
  std::vector<int64_t> row_stats(size_t(rows * rstride), 0);

  const uint8_t* cp = cells.const_data_ptr<uint8_t>();
  const uint8_t* cend = cp + cells.numel();
  uint8_t* ep = eff.mutable_data_ptr<uint8_t>();
  uint64_t* stp = reinterpret_cast<uint64_t*>(state.mutable_data_ptr<int64_t>());
  uint64_t* wrp = reinterpret_cast<uint64_t*>(written.mutable_data_ptr<int64_t>());
  const uint64_t* skp = reinterpret_cast<const uint64_t*>(stuck.const_data_ptr<int64_t>());
  int32_t* cwp = count_cells ? cell_writes.mutable_data_ptr<int32_t>() : nullptr;
  const int64_t Kc = K * c;

  if (n_sections > 0 && n_blocks > 0) {
    const int64_t grain = small
                              ? rows
                              : std::max<int64_t>(1, rows / (4 * at::get_num_threads()));
    auto rows_kernel = [&](int64_t r_begin, int64_t r_end) XB_ALWAYS_INLINE {
      // Packed target levels of one tile row: planes x words (a few words per thread).
      std::vector<uint64_t> target(size_t(planes * words));
      uint64_t old[kMaxPlanes], tw[kMaxPlanes], fresh[kMaxPlanes];
      for (int64_t s = 0; s < n_sections; ++s) {
        const int64_t k0 = s * rows;
        const int64_t nr = std::min(K, k0 + rows) - k0;  // rows this section covers
        for (int64_t j = 0; j < n_blocks; ++j) {
          const int64_t o0 = j * F;
          const int64_t nf = std::min(out, o0 + F) - o0;  // filters in this tile
          const int64_t ncol = nf * c;
          const int64_t nw = (ncol + 63) / 64;
          const int64_t x = (tile_offset + s * n_blocks + j) % pool;
          for (int64_t r = r_begin; r < std::min(r_end, nr); ++r) {
            const int64_t kp = k0 + r;
            int64_t* rs = row_stats.data() + r * rstride;
            const int64_t xr = x * rows + r;
            uint64_t* st_row = stp + xr * planes * words;
            uint64_t* wr_row = wrp + xr * words;
            const uint64_t* sk_row = skp + xr * words;
            int32_t* cw_row = count_cells ? cwp + xr * cols : nullptr;
            // Column f*c + i of the tile row is cell i of filter o0 + f at sorted position kp.
            const uint8_t* src = cp + o0 * Kc + kp * c;
            uint8_t* dst = ep + o0 * Kc + kp * c;
            pack_tile_row(src, Kc, nf, c, planes, words, cend, target.data());
            bool any = false;
            for (int64_t w = 0; w < nw; ++w) {
              const uint64_t covered = low_mask(std::min<int64_t>(64, ncol - w * 64));
              for (int p = 0; p < planes; ++p) {
                old[p] = st_row[p * words + w];
                tw[p] = target[p * words + w];
              }
              uint64_t allowed = covered & ~sk_row[w];
              if (stuck_initial) {
                allowed |= covered & ~wr_row[w];
                wr_row[w] |= covered;
              }
              const WordStats ws = transition_word(old, tw, allowed, planes, fresh);
              uint64_t kept = 0;  // covered cells that hold something else than their target
              for (int p = 0; p < planes; ++p) {
                st_row[p * words + w] = fresh[p];
                kept |= fresh[p] ^ tw[p];
              }
              kept &= covered;
              if (ws.changed) {
                any = true;
                rs[0] += popcount64(ws.changed);
                rs[1] += popcount64(ws.gt);
                rs[2] += popcount64(ws.lt);
                rs[3] += ws.pulses;
                for (int64_t sl = 0; sl < nsl; ++sl) {
                  rs[kNumStats + sl] += popcount64(ws.changed & slice_mask[sl * words + w]);
                }
                if (count_cells) {
                  for (uint64_t m = ws.changed; m; m &= m - 1) {
                    int32_t& cw = cw_row[w * 64 + ctz64(m)];
                    cw = static_cast<int32_t>(static_cast<uint32_t>(cw) + 1u);
                  }
                }
              }
              // Effective cells: patch the ones that kept a level other than the target.
              for (uint64_t m = kept; m; m &= m - 1) {
                const int bit = ctz64(m);
                const int64_t col = w * 64 + bit;
                uint64_t v = 0;
                for (int p = 0; p < planes; ++p) v |= ((fresh[p] >> bit) & 1) << p;
                dst[col_offset[size_t(col)]] = static_cast<uint8_t>(v);
              }
            }
            if (any) rs[4] += 1;
          }
        }
      }
    };
    static const bool has_popcnt = cpu_has_popcnt();
    at::parallel_for(0, rows, grain, [&](int64_t r_begin, int64_t r_end) {
      if (has_popcnt) {
        run_with_popcnt(rows_kernel, r_begin, r_end);
      } else {
        rows_kernel(r_begin, r_end);
      }
    });
  }

  clear_padding_bits(state, written, cols);
  at::Tensor stats = at::zeros({nstat}, cells.options().dtype(at::kLong));
  int64_t* sp = stats.mutable_data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t k = 0; k < rstride; ++k) sp[k] += row_stats[size_t(r * rstride + k)];
  }
  return std::make_tuple(eff, stats);
}

}  // namespace

TORCH_LIBRARY_IMPL(crossbar_torch, CPU, m) { m.impl("program_layer", &program_layer_cpu); }

}  // namespace crossbar_torch
