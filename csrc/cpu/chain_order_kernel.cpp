// chain_order / CPU: the nearest-neighbour chain of filter placement's "chain" order
// (crossbar_torch/mapping.py). bits: int64 (out, W), each filter's cell bits packed into W
// words (any layout, the same for every row); start: the first filter. From it, repeatedly
// append the unvisited filter at the smallest Hamming distance from the last one appended,
// ties to the lowest filter number. Returns int64 (out,).
//
// Host only: placement is chosen once, at conversion, from the quantized weights on the host.
// The distances are computed row by row as the chain grows (XOR + popcount over the words,
// threads over the unvisited filters): out^2 W / 2 word operations and no (out, out) matrix;
// the float32 Gram matrix this replaces was ~90% of a value+chain conversion of ViT-Base.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <utility>
#include <vector>

#include "../common.h"

namespace crossbar_torch {

// The nearest of rows left[begin, end) to row a, as (distance, row). Compiled twice on x86-64
// (with and without the POPCNT instruction, chosen at load): without it popcount64 is a libgcc
// call, ~5x slower here, and the package's default flags cannot assume the instruction. Not
// under AddressSanitizer: ifunc resolvers run before it is initialised.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_ADDRESS__)
__attribute__((target_clones("popcnt", "default")))
#endif
std::pair<int64_t, int64_t> nearest_row(const uint64_t* bp, const uint64_t* a, int64_t W,
                                        const int64_t* left, int64_t begin, int64_t end) {
  std::pair<int64_t, int64_t> mine{std::numeric_limits<int64_t>::max(),
                                   std::numeric_limits<int64_t>::max()};
  for (int64_t i = begin; i < end; ++i) {
    const uint64_t* b = bp + left[i] * W;
    // in blocks of 16 words, stopping once the distance exceeds the best so far (the row can
    // no longer win, not even a tie): about a third less work on ViT-Base's layers
    int64_t d = 0;
    for (int64_t w0 = 0; w0 < W && d <= mine.first; w0 += 16) {
      const int64_t w1 = std::min<int64_t>(W, w0 + 16);
      for (int64_t w = w0; w < w1; ++w) d += __builtin_popcountll(a[w] ^ b[w]);
    }
    const std::pair<int64_t, int64_t> here{d, left[i]};
    if (here < mine) mine = here;
  }
  return mine;
}

namespace {

at::Tensor chain_order_cpu(const at::Tensor& bits_in, int64_t start) {
  check_dtype(bits_in, at::kLong, "chain_order", "bits");
  TORCH_CHECK(bits_in.device().is_cpu(),
              "crossbar_torch.chain_order: bits must be a CPU tensor, got ", bits_in.device());
  TORCH_CHECK(bits_in.dim() == 2, "crossbar_torch.chain_order: bits must have 2 dimensions "
              "(out, words), got shape ", bits_in.sizes());
  const int64_t out = bits_in.size(0), W = bits_in.size(1);
  at::Tensor order = at::empty({out}, bits_in.options());
  if (out == 0) return order;
  TORCH_CHECK(start >= 0 && start < out, "crossbar_torch.chain_order: start must be in [0, ",
              out, "), got ", start);
  const at::Tensor bits = bits_in.contiguous();
  const uint64_t* bp = reinterpret_cast<const uint64_t*>(bits.const_data_ptr<int64_t>());
  int64_t* op = order.mutable_data_ptr<int64_t>();
  // the unvisited filters, compacted by swapping the chosen one out (the tie-break compares
  // filter numbers, so their order in this list does not matter)
  std::vector<int64_t> left;
  left.reserve(out - 1);
  for (int64_t o = 0; o < out; ++o)
    if (o != start) left.push_back(o);
  op[0] = start;
  const int threads = at::get_num_threads();
  using Best = std::pair<int64_t, int64_t>;  // (distance, filter): the smaller pair wins
  const Best none{std::numeric_limits<int64_t>::max(), std::numeric_limits<int64_t>::max()};
  std::vector<Best> best(threads > 0 ? threads : 1);
  // enough words per chunk that a thread's share outweighs waking it
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(W, 1));
  int64_t cur = start;
  for (int64_t step = 1; step < out; ++step) {
    const uint64_t* a = bp + cur * W;
    const int64_t n = int64_t(left.size());
    std::fill(best.begin(), best.end(), none);
    at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
      const Best mine = nearest_row(bp, a, W, left.data(), begin, end);
      Best& slot = best[at::get_thread_num() % best.size()];
      if (mine < slot) slot = mine;
    });
    Best chosen = none;
    for (const Best& b : best)
      if (b < chosen) chosen = b;
    cur = chosen.second;
    op[step] = cur;
    for (int64_t i = 0; i < n; ++i) {  // swap it out of the unvisited list
      if (left[i] == cur) {
        left[i] = left.back();
        left.pop_back();
        break;
      }
    }
  }
  return order;
}

}  // namespace

TORCH_LIBRARY_IMPL(crossbar_torch, CPU, m) { m.impl("chain_order", &chain_order_cpu); }

}  // namespace crossbar_torch
