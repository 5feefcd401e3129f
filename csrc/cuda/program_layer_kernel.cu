// program_layer / CUDA: one thread per physical crossbar row walks the layer's tiles in order
// (rows evolve independently, and a weight, with its compensation, lies in one row). The
// per-row arithmetic (program_tile_row in program_row.h) is literally the one the CPU kernel
// runs. Greedy order (rule 12): the tiles are packed once on the device, then each step scores
// the candidates, takes the first minimum and closes its gap in the candidate list (one block,
// select_kernel) and programs that tile: the whole schedule stays on the device.
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "../common.h"
#include "../program_layer_args.h"
#include "../program_row.h"
#include "cuda_utils.cuh"

namespace crossbar_torch {
namespace {

struct ProgramParams {
  TileRowArgs proto;
  uint64_t* state;
  uint64_t* written;
  const uint64_t* stuck;
  int32_t* cell_writes;
  const int64_t* slot_filter;
  const uint64_t* covered;
  uint64_t* scratch;        // (rows, 2 * planes * words + words)
  const uint64_t* packed;   // (tiles, rows, planes, words) plain targets, or null: pack here
  int64_t* row_stats;       // (rows, rstride)
  const int64_t* order;     // tile at each position (device)
  int64_t pos_begin, pos_end;
  int64_t rows, cols, words, pool, tile_offset, n_blocks, K, F, rstride;
  int planes;
};

__device__ void bind_row(const ProgramParams& P, TileRowArgs& a, int64_t x, int64_t r, int64_t s,
                         int64_t j) {
  const int64_t xr = x * P.rows + r;
  a.slot_filter = P.slot_filter + j * P.F;
  a.kp = s * P.rows + r;
  a.state = P.state + xr * P.planes * P.words;
  a.written = P.written + xr * P.words;
  a.stuck = P.stuck + xr * P.words;
  a.cell_writes = P.cell_writes ? P.cell_writes + xr * P.cols : nullptr;
  a.covered = P.covered + j * P.words;
}

__global__ void program_tiles_kernel(ProgramParams P) {
  const int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= P.rows) return;
  TileRowArgs a = P.proto;
  const int64_t row_words = int64_t(P.planes) * P.words;
  uint64_t* scratch = P.scratch + r * (2 * row_words + P.words);
  a.target = scratch + row_words;
  a.allowed = scratch + 2 * row_words;
  for (int64_t pos = P.pos_begin; pos < P.pos_end; ++pos) {
    const int64_t t = P.order[pos];
    const int64_t s = t / P.n_blocks, j = t % P.n_blocks;
    const int64_t nr = min(P.K, (s + 1) * P.rows) - s * P.rows;
    if (r >= nr) continue;
    bind_row(P, a, (P.tile_offset + pos) % P.pool, r, s, j);
    if (P.packed) {
      a.plain = const_cast<uint64_t*>(P.packed) + (t * P.rows + r) * row_words;
    } else {
      a.plain = scratch;
      pack_row_targets(a, P.F, a.plain);
    }
    program_tile_row(a, P.row_stats + r * P.rstride);
  }
}

// Plain targets of every (tile, row): one thread each.
__global__ void pack_tiles_kernel(ProgramParams P, int64_t tiles, uint64_t* packed) {
  const int64_t row_words = int64_t(P.planes) * P.words;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < tiles * P.rows;
       i += int64_t(blockDim.x) * gridDim.x) {
    const int64_t t = i / P.rows, r = i % P.rows;
    const int64_t s = t / P.n_blocks, j = t % P.n_blocks;
    if (r >= min(P.K, (s + 1) * P.rows) - s * P.rows) continue;
    TileRowArgs a = P.proto;
    a.slot_filter = P.slot_filter + j * P.F;
    a.kp = s * P.rows + r;
    pack_row_targets(a, P.F, packed + i * row_words);
  }
}

// One greedy step (rule 12), all on the device: score the first n tiles of `remaining` (count
// entries, in section-major order) against crossbar x, take the first minimum (ties to the
// earlier entry), record it at order[step] and close its gap in `remaining`. One block, so the
// reduction and the shift need no second launch; no step waits for the host.
constexpr int kSelectThreads = 1024;  // a power of two (the tree reduction halves it)

__global__ void select_kernel(ProgramParams P, int64_t* remaining, int64_t count, int64_t n,
                              int64_t x, int64_t* order, int64_t step) {
  __shared__ int64_t best_d[kSelectThreads];
  __shared__ int64_t best_i[kSelectThreads];
  const int tid = threadIdx.x;
  const int64_t row_words = int64_t(P.planes) * P.words;
  int64_t my_d = 0x7fffffffffffffffLL, my_i = 0x7fffffffffffffffLL;
  for (int64_t i = tid; i < n; i += blockDim.x) {
    const int64_t t = remaining[i], s = t / P.n_blocks, j = t % P.n_blocks;
    const int64_t nr = min(P.K, (s + 1) * P.rows) - s * P.rows;
    int64_t d = 0;
    for (int64_t r = 0; r < nr; ++r) {
      d += tile_row_distance(P.state + (x * P.rows + r) * row_words,
                             P.packed + (t * P.rows + r) * row_words, P.covered + j * P.words,
                             P.proto.nw, P.words, P.planes);
    }
    if (d < my_d) {  // i grows within a thread: the first minimum stays
      my_d = d;
      my_i = i;
    }
  }
  best_d[tid] = my_d;
  best_i[tid] = my_i;
  __syncthreads();
  for (int stride = kSelectThreads / 2; stride > 0; stride >>= 1) {
    if (tid < stride) {
      const int64_t od = best_d[tid + stride], oi = best_i[tid + stride];
      if (od < best_d[tid] || (od == best_d[tid] && oi < best_i[tid])) {
        best_d[tid] = od;
        best_i[tid] = oi;
      }
    }
    __syncthreads();
  }
  const int64_t best = best_i[0];
  if (tid == 0) order[step] = remaining[best];
  __syncthreads();  // read before the shift below overwrites remaining[best]
  for (int64_t base = best + 1; base < count; base += kSelectThreads) {
    const int64_t i = base + tid;
    const int64_t v = i < count ? remaining[i] : 0;
    __syncthreads();  // every read of this chunk before any write into it
    if (i < count) remaining[i - 1] = v;
    __syncthreads();
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> program_layer_cuda(
    const at::Tensor& cells_in, const at::Tensor& filter_index, const at::Tensor& order_in,
    const at::Tensor& pinned_in, at::Tensor& state, at::Tensor& written,
    const at::Tensor& stuck_in, at::Tensor& cell_writes, int64_t tile_offset, int64_t rows,
    int64_t cols, int64_t weight_bits, int64_t bits_per_cell, int64_t encoding,
    bool stuck_initial, bool count_cells, int64_t compensate_slices, int64_t window) {
  check_cuda(cells_in, "program_layer", "cells");
  const ProgramLayout L = check_program_layer(
      cells_in, filter_index, order_in, pinned_in, state, written, stuck_in, cell_writes,
      tile_offset, rows, cols, weight_bits, bits_per_cell, encoding, count_cells,
      compensate_slices, window);
  tile_offset %= L.pool;  // crossbar (tile_offset + pos) % pool, without overflowing int64
  const c10::cuda::CUDAGuard guard(cells_in.device());
  const at::Tensor cells = cells_in.contiguous();
  if (cells.numel() > 0 && bits_per_cell < 8) {
    check_levels_fit(cells.max().item<int64_t>(), bits_per_cell);
  }
  const at::Tensor stuck = stuck_in.contiguous();
  const at::Tensor pinned = pinned_in.numel() ? pinned_in.contiguous() : pinned_in;
  const auto dev = cells.device();
  const auto i64 = cells.options().dtype(at::kLong);
  const at::Tensor slot_filter = L.slot_filter.to(dev);
  const at::Tensor covered = L.covered.to(dev);
  const at::Tensor slice_mask = L.slice_mask.to(dev);
  const int64_t rstride = kNumStats + L.nsl;
  const int64_t row_words = L.planes * L.words;
  at::Tensor eff = cells.clone();
  at::Tensor row_stats = at::zeros({rows, rstride}, i64);
  at::Tensor scratch = at::zeros({rows, 2 * row_words + L.words}, i64);

  ProgramParams P;
  TileRowArgs& a = P.proto;
  a.cells = cells.const_data_ptr<uint8_t>();
  a.pinned = pinned.numel() ? pinned.const_data_ptr<uint8_t>() : nullptr;
  a.eff = eff.mutable_data_ptr<uint8_t>();
  a.K = L.K;
  a.c = L.c;
  a.words = L.words;
  a.nw = L.nw;
  a.nsl = L.nsl;
  a.planes = int(L.planes);
  a.stuck_initial = stuck_initial;
  a.comp_slices = int(compensate_slices);
  a.fmt = make_comp_format(int(weight_bits), int(bits_per_cell), int(encoding),
                           int(compensate_slices));
  a.slice_mask = reinterpret_cast<const uint64_t*>(slice_mask.const_data_ptr<int64_t>());
  P.state = reinterpret_cast<uint64_t*>(state.mutable_data_ptr<int64_t>());
  P.written = reinterpret_cast<uint64_t*>(written.mutable_data_ptr<int64_t>());
  P.stuck = reinterpret_cast<const uint64_t*>(stuck.const_data_ptr<int64_t>());
  P.cell_writes = count_cells ? cell_writes.mutable_data_ptr<int32_t>() : nullptr;
  P.slot_filter = slot_filter.const_data_ptr<int64_t>();
  P.covered = reinterpret_cast<const uint64_t*>(covered.const_data_ptr<int64_t>());
  P.scratch = reinterpret_cast<uint64_t*>(scratch.mutable_data_ptr<int64_t>());
  P.packed = nullptr;
  P.row_stats = row_stats.mutable_data_ptr<int64_t>();
  P.order = nullptr;
  P.rows = rows;
  P.cols = cols;
  P.words = L.words;
  P.pool = L.pool;
  P.tile_offset = tile_offset;
  P.n_blocks = L.n_blocks;
  P.K = L.K;
  P.F = L.F;
  P.rstride = rstride;
  P.planes = int(L.planes);
  const unsigned int row_blocks = static_cast<unsigned int>((rows + kThreads - 1) / kThreads);

  at::Tensor order;
  if (L.tiles > 0 && (L.order.defined() || window == 0)) {
    order = L.order.defined() ? L.order : at::arange(L.tiles, at::kLong);
    const at::Tensor order_dev = order.to(dev);
    P.order = order_dev.const_data_ptr<int64_t>();
    P.pos_begin = 0;
    P.pos_end = L.tiles;
    program_tiles_kernel<<<row_blocks, kThreads, 0, current_stream()>>>(P);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else if (L.tiles > 0) {
    at::Tensor packed = at::zeros({L.tiles * rows * row_words}, i64);
    pack_tiles_kernel<<<blocks_for(L.tiles * rows), kThreads, 0, current_stream()>>>(
        P, L.tiles, reinterpret_cast<uint64_t*>(packed.mutable_data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    P.packed = reinterpret_cast<const uint64_t*>(packed.const_data_ptr<int64_t>());
    // the schedule stays on the device: no copy and no synchronisation per tile
    at::Tensor remaining = at::arange(L.tiles, i64);
    order = at::empty({L.tiles}, i64);
    int64_t* od = order.mutable_data_ptr<int64_t>();
    P.order = od;
    for (int64_t step = 0; step < L.tiles; ++step) {
      const int64_t x = (tile_offset + step) % L.pool;
      const int64_t count = L.tiles - step;
      select_kernel<<<1, kSelectThreads, 0, current_stream()>>>(
          P, remaining.mutable_data_ptr<int64_t>(), count, std::min<int64_t>(window, count), x,
          od, step);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      P.pos_begin = step;
      P.pos_end = step + 1;
      program_tiles_kernel<<<row_blocks, kThreads, 0, current_stream()>>>(P);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  } else {
    order = at::empty({0}, at::kLong);
  }
  clear_padding_bits(state, written, cols);
  at::Tensor stats = row_stats.sum(0);
  return std::make_tuple(eff, stats, order.to(dev));
}

}  // namespace

TORCH_LIBRARY_IMPL(crossbar_torch, CUDA, m) { m.impl("program_layer", &program_layer_cuda); }

}  // namespace crossbar_torch
