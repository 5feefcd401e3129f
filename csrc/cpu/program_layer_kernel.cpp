// program_layer / CPU: program every tile of one layer onto the pool of crossbars, count the
// transitions on packed 64-bit words (XOR + popcount), update state / written / cell_writes in
// place. Semantics: reference.program_layer.
//
// Every physical row r of every crossbar evolves independently of the other rows (row r of tile
// (s, j) is sorted position k' = s*rows + r), so rows are split across threads with
// at::parallel_for; each thread walks the tiles in schedule order over its own block of rows
// (rows inner, so consecutive rows read consecutive cells), keeps per-row partial stats, and the
// partials are summed at the end. Only O(planes) words per row are live at a time: no unpacked
// copy of the state or of a tile is ever made.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "../common.h"

namespace crossbar_torch {
namespace {

std::tuple<at::Tensor, at::Tensor> program_layer_cpu(
    const at::Tensor& cells_in, at::Tensor& state, at::Tensor& written, const at::Tensor& stuck_in,
    at::Tensor& cell_writes, int64_t tile_offset, int64_t rows, int64_t cols,
    int64_t bits_per_cell, int64_t slices, bool stuck_initial, bool count_cells) {
  TORCH_CHECK(cells_in.device().is_cpu(),
              "crossbar_torch.program_layer: cells must be a CPU tensor here, got ",
              cells_in.device());
  const ProgramArgs a = check_program_layer(cells_in, state, written, stuck_in, cell_writes,
                                            tile_offset, rows, cols, bits_per_cell, slices,
                                            count_cells);
  const at::Tensor cells = cells_in.contiguous();
  const at::Tensor stuck = stuck_in.contiguous();
  const int64_t out = a.out, K = a.K, c = a.c, pool = a.pool, words = a.words;
  const int planes = int(a.planes);
  const int64_t nsl = a.nsl;
  const int64_t nstat = kNumStats + slices;
  const int64_t F = cols / c;
  const int64_t n_sections = K ? (K + rows - 1) / rows : 0;
  const int64_t n_blocks = out ? (out + F - 1) / F : 0;

  at::Tensor eff = at::empty_like(cells);
  // Column -> slice masks: column col (< F*c) holds slice (col % c) % slices.
  std::vector<uint64_t> slice_mask(size_t(nsl * words), 0);
  for (int64_t col = 0; col < F * c; ++col) {
    slice_mask[size_t(((col % c) % slices) * words + col / 64)] |= uint64_t(1) << (col % 64);
  }
  // Per-row partial stats (writes, sets, resets, pulses, rows_programmed, per slice).
  std::vector<int64_t> row_stats(size_t(rows * (kNumStats + nsl)), 0);

  const uint8_t* cp = cells.const_data_ptr<uint8_t>();
  uint8_t* ep = eff.mutable_data_ptr<uint8_t>();
  uint64_t* stp = reinterpret_cast<uint64_t*>(state.mutable_data_ptr<int64_t>());
  uint64_t* wrp = reinterpret_cast<uint64_t*>(written.mutable_data_ptr<int64_t>());
  const uint64_t* skp = reinterpret_cast<const uint64_t*>(stuck.const_data_ptr<int64_t>());
  int32_t* cwp = count_cells ? cell_writes.mutable_data_ptr<int32_t>() : nullptr;
  const int64_t Kc = K * c;

  if (n_sections > 0 && n_blocks > 0) {
    const int64_t grain = std::max<int64_t>(1, rows / (4 * at::get_num_threads()));
    at::parallel_for(0, rows, grain, [&](int64_t r_begin, int64_t r_end) {
      uint64_t target[kMaxPlanes], fresh[kMaxPlanes];
      for (int64_t s = 0; s < n_sections; ++s) {
        const int64_t k0 = s * rows;
        const int64_t nr = std::min(K, k0 + rows) - k0;  // rows this section covers
        for (int64_t j = 0; j < n_blocks; ++j) {
          const int64_t o0 = j * F;
          const int64_t ncol = (std::min(out, o0 + F) - o0) * c;
          const int64_t nw = (ncol + 63) / 64;
          const int64_t x = (tile_offset + s * n_blocks + j) % pool;
          for (int64_t r = r_begin; r < std::min(r_end, nr); ++r) {
            const int64_t kp = k0 + r;
            int64_t* rs = row_stats.data() + r * (kNumStats + nsl);
            const int64_t xr = x * rows + r;
            uint64_t* st_row = stp + xr * planes * words;
            uint64_t* wr_row = wrp + xr * words;
            const uint64_t* sk_row = skp + xr * words;
            int32_t* cw_row = count_cells ? cwp + xr * cols : nullptr;
            // Walk the tile row's columns: column f*c + i is cell i of filter o0 + f.
            int64_t f = 0, i = 0;
            const uint8_t* src = cp + o0 * Kc + kp * c;
            uint8_t* dst = ep + o0 * Kc + kp * c;
            bool any = false;
            for (int64_t w = 0; w < nw; ++w) {
              const int64_t nb = std::min<int64_t>(64, ncol - w * 64);
              const uint64_t covered = low_mask(nb);
              // Pack the target levels of this word, plane by plane.
              for (int p = 0; p < planes; ++p) target[p] = 0;
              {
                int64_t ff = f, ii = i;
                for (int64_t bit = 0; bit < nb; ++bit) {
                  const uint64_t v = src[ff * Kc + ii];
                  for (int p = 0; p < planes; ++p) target[p] |= ((v >> p) & 1) << bit;
                  if (++ii == c) { ii = 0; ++ff; }
                }
              }
              uint64_t old[kMaxPlanes];
              for (int p = 0; p < planes; ++p) old[p] = st_row[p * words + w];
              uint64_t allowed = covered & ~sk_row[w];
              if (stuck_initial) {
                allowed |= covered & ~wr_row[w];
                wr_row[w] |= covered;
              }
              const WordStats ws = transition_word(old, target, allowed, planes, fresh);
              for (int p = 0; p < planes; ++p) st_row[p * words + w] = fresh[p];
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
              // Effective cells: what the cells hold now.
              for (int64_t bit = 0; bit < nb; ++bit) {
                uint64_t v = 0;
                for (int p = 0; p < planes; ++p) v |= ((fresh[p] >> bit) & 1) << p;
                dst[f * Kc + i] = static_cast<uint8_t>(v);
                if (++i == c) { i = 0; ++f; }
              }
            }
            if (any) rs[4] += 1;
          }
        }
      }
    });
  }

  clear_padding_bits(state, written, cols);
  at::Tensor stats = at::zeros({nstat}, cells.options().dtype(at::kLong));
  int64_t* sp = stats.mutable_data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t k = 0; k < kNumStats + nsl; ++k) sp[k] += row_stats[size_t(r * (kNumStats + nsl) + k)];
  }
  return std::make_tuple(eff, stats);
}

}  // namespace

TORCH_LIBRARY_IMPL(crossbar_torch, CPU, m) { m.impl("program_layer", &program_layer_cpu); }

}  // namespace crossbar_torch
