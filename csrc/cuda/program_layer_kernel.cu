// program_layer / CUDA: one warp per physical crossbar row walks the layer's tiles in schedule
// order (rows evolve independently); lane l handles the row's 64-column words l, l+32, ...
// The per-word arithmetic (transition_word in common.h) is the one the CPU kernel runs.
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "../common.h"
#include "cuda_utils.cuh"

namespace crossbar_torch {
namespace {

constexpr int kWarpsPerBlock = 4;
constexpr int kLocalSlices = 32;  // per-slice counters kept in registers / local memory

struct ProgramParams {
  const uint8_t* cells;
  uint8_t* eff;
  uint64_t* state;
  uint64_t* written;
  const uint64_t* stuck;
  int32_t* cell_writes;
  const uint64_t* slice_mask;  // (nsl, words)
  unsigned long long* stats;   // (kNumStats + slices,)
  int64_t out, K, c, F, rows, cols, words, pool, tile_offset, n_sections, n_blocks, nsl;
  int planes;
  bool stuck_initial, count_cells;
};

__global__ void program_layer_kernel(ProgramParams P) {
  const int lane = threadIdx.x & 31;
  const int64_t r = int64_t(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (r >= P.rows) return;  // whole warp leaves together
  const int64_t Kc = P.K * P.c;
  const int planes = P.planes;
  unsigned long long acc[kNumStats] = {0, 0, 0, 0, 0};
  unsigned long long slc[kLocalSlices];
  for (int i = 0; i < kLocalSlices; ++i) slc[i] = 0;
  uint64_t old[kMaxPlanes], target[kMaxPlanes], fresh[kMaxPlanes];

  for (int64_t s = 0; s < P.n_sections; ++s) {
    const int64_t k0 = s * P.rows;
    const int64_t nr = min(P.K, k0 + P.rows) - k0;
    if (r >= nr) continue;  // uniform across the warp
    const int64_t kp = k0 + r;
    for (int64_t j = 0; j < P.n_blocks; ++j) {
      const int64_t o0 = j * P.F;
      const int64_t ncol = (min(P.out, o0 + P.F) - o0) * P.c;
      const int64_t nw = (ncol + 63) / 64;
      const int64_t x = (P.tile_offset + s * P.n_blocks + j) % P.pool;
      const int64_t xr = x * P.rows + r;
      uint64_t* st_row = P.state + xr * planes * P.words;
      const uint8_t* src = P.cells + o0 * Kc + kp * P.c;
      uint8_t* dst = P.eff + o0 * Kc + kp * P.c;
      bool any = false;
      for (int64_t w0 = 0; w0 < nw; w0 += 32) {
        const int64_t w = w0 + lane;
        bool changed_here = false;
        if (w < nw) {
          const int64_t nb = min(int64_t(64), ncol - w * 64);
          const uint64_t covered = low_mask(nb);
          for (int p = 0; p < planes; ++p) target[p] = 0;
          for (int64_t bit = 0; bit < nb; ++bit) {
            const int64_t col = w * 64 + bit;
            const uint64_t v = src[(col / P.c) * Kc + col % P.c];
            for (int p = 0; p < planes; ++p) target[p] |= ((v >> p) & 1) << bit;
          }
          for (int p = 0; p < planes; ++p) old[p] = st_row[p * P.words + w];
          uint64_t allowed = covered & ~P.stuck[xr * P.words + w];
          if (P.stuck_initial) {
            const uint64_t wr = P.written[xr * P.words + w];
            allowed |= covered & ~wr;
            P.written[xr * P.words + w] = wr | covered;
          }
          const WordStats ws = transition_word(old, target, allowed, planes, fresh);
          for (int p = 0; p < planes; ++p) st_row[p * P.words + w] = fresh[p];
          if (ws.changed) {
            changed_here = true;
            acc[0] += popcount64(ws.changed);
            acc[1] += popcount64(ws.gt);
            acc[2] += popcount64(ws.lt);
            acc[3] += ws.pulses;
            for (int64_t sl = 0; sl < P.nsl; ++sl) {
              const int cnt = popcount64(ws.changed & P.slice_mask[sl * P.words + w]);
              if (cnt == 0) continue;
              if (sl < kLocalSlices) {
                slc[sl] += cnt;
              } else {
                atomicAdd(P.stats + kNumStats + sl, (unsigned long long)cnt);
              }
            }
            if (P.count_cells) {
              int32_t* cw_row = P.cell_writes + xr * P.cols;
              for (uint64_t m = ws.changed; m; m &= m - 1) {
                int32_t& cw = cw_row[w * 64 + ctz64(m)];
                cw = static_cast<int32_t>(static_cast<uint32_t>(cw) + 1u);
              }
            }
          }
          for (int64_t bit = 0; bit < nb; ++bit) {
            const int64_t col = w * 64 + bit;
            uint64_t v = 0;
            for (int p = 0; p < planes; ++p) v |= ((fresh[p] >> bit) & 1) << p;
            dst[(col / P.c) * Kc + col % P.c] = static_cast<uint8_t>(v);
          }
        }
        any |= __any_sync(0xffffffffu, changed_here) != 0;
      }
      if (any && lane == 0) acc[4] += 1;
    }
  }
  for (int i = 0; i < kNumStats; ++i) {
    if (acc[i]) atomicAdd(P.stats + i, acc[i]);
  }
  for (int64_t sl = 0; sl < min(P.nsl, int64_t(kLocalSlices)); ++sl) {
    if (slc[sl]) atomicAdd(P.stats + kNumStats + sl, slc[sl]);
  }
}

std::tuple<at::Tensor, at::Tensor> program_layer_cuda(
    const at::Tensor& cells_in, at::Tensor& state, at::Tensor& written, const at::Tensor& stuck_in,
    at::Tensor& cell_writes, int64_t tile_offset, int64_t rows, int64_t cols,
    int64_t bits_per_cell, int64_t slices, bool stuck_initial, bool count_cells) {
  check_cuda(cells_in, "program_layer", "cells");
  const ProgramArgs a = check_program_layer(cells_in, state, written, stuck_in, cell_writes,
                                            tile_offset, rows, cols, bits_per_cell, slices,
                                            count_cells);
  const c10::cuda::CUDAGuard guard(cells_in.device());
  const at::Tensor cells = cells_in.contiguous();
  const at::Tensor stuck = stuck_in.contiguous();
  const int64_t F = cols / a.c;
  at::Tensor eff = at::empty_like(cells);
  at::Tensor stats = at::zeros({kNumStats + slices}, cells.options().dtype(at::kLong));

  // Column -> slice masks (column col < F*c holds slice (col % c) % slices), built on the host.
  at::Tensor slice_mask_cpu = at::zeros({std::max<int64_t>(a.nsl, 1), a.words}, at::kLong);
  uint64_t* sm = reinterpret_cast<uint64_t*>(slice_mask_cpu.mutable_data_ptr<int64_t>());
  for (int64_t col = 0; col < F * a.c; ++col) {
    sm[((col % a.c) % slices) * a.words + col / 64] |= uint64_t(1) << (col % 64);
  }
  const at::Tensor slice_mask = slice_mask_cpu.to(cells.device());

  ProgramParams P;
  P.cells = cells.const_data_ptr<uint8_t>();
  P.eff = eff.mutable_data_ptr<uint8_t>();
  P.state = reinterpret_cast<uint64_t*>(state.mutable_data_ptr<int64_t>());
  P.written = reinterpret_cast<uint64_t*>(written.mutable_data_ptr<int64_t>());
  P.stuck = reinterpret_cast<const uint64_t*>(stuck.const_data_ptr<int64_t>());
  P.cell_writes = count_cells ? cell_writes.mutable_data_ptr<int32_t>() : nullptr;
  P.slice_mask = reinterpret_cast<const uint64_t*>(slice_mask.const_data_ptr<int64_t>());
  P.stats = reinterpret_cast<unsigned long long*>(stats.mutable_data_ptr<int64_t>());
  P.out = a.out;
  P.K = a.K;
  P.c = a.c;
  P.F = F;
  P.rows = rows;
  P.cols = cols;
  P.words = a.words;
  P.pool = a.pool;
  P.tile_offset = tile_offset;
  P.n_sections = a.K ? (a.K + rows - 1) / rows : 0;
  P.n_blocks = a.out ? (a.out + F - 1) / F : 0;
  P.nsl = a.nsl;
  P.planes = int(a.planes);
  P.stuck_initial = stuck_initial;
  P.count_cells = count_cells;

  if (P.n_sections > 0 && P.n_blocks > 0) {
    const unsigned int blocks =
        static_cast<unsigned int>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock);
    program_layer_kernel<<<blocks, 32 * kWarpsPerBlock, 0, current_stream()>>>(P);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  clear_padding_bits(state, written, cols);
  return std::make_tuple(eff, stats);
}

}  // namespace

TORCH_LIBRARY_IMPL(crossbar_torch, CUDA, m) { m.impl("program_layer", &program_layer_cuda); }

}  // namespace crossbar_torch
