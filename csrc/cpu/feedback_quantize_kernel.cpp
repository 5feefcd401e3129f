// feedback_quantize / CPU: rule 21, error-feedback programming targets. Filters (rows) are
// independent given U, so they run in parallel; each runs feedback_row (feedback_row.h), the
// arithmetic the CUDA kernel runs. With rule 23's write penalty a filter is charged against
// the cells its predecessor chose, so the chains run in parallel, each filter after its
// predecessor.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../common.h"
#include "../feedback_quantize_args.h"
#include "../feedback_row.h"

namespace crossbar_torch {
namespace {

// One filter's pointers for feedback_rows (those feedback_row takes).
struct FeedbackRowArgs {
  double* t;
  const bool* held;
  const uint8_t* lv;
  int32_t* out;
  const int64_t* pos;
  const uint8_t* ref;
  uint8_t* chosen;
};

constexpr int kRowsTogether = 8;

// Rule 23 for a weight without held cells, as write_aware_allowed's `!held` branch computes it
// (the same candidates in the same order, the same cost arithmetic and comparisons), with
// every value's cells packed b bits apiece in one word, built once per call: the cells that
// differ from the predecessor's are then an XOR and a count, not a loop over c cells per
// candidate (the branch was most of the mpnet_best reprogramming).
struct CellCodes {
  std::vector<uint64_t> code;  // value v -> its rule-3 cells, cell i at bits [i*b, (i+1)*b)
  int64_t qmax = 0;
  uint64_t lsb = 0;            // bit i*b of every cell
  bool usable = false;         // c * b <= 64
};

inline uint64_t pack_cells(const uint8_t* cells, const CompFormat& f) {
  uint64_t w = 0;
  for (int i = 0; i < f.c; ++i) w |= uint64_t(cells[i]) << (i * f.b);
  return w;
}

CellCodes make_cell_codes(const CompFormat& f) {
  CellCodes t;
  if (int64_t(f.c) * f.b > 64) return t;
  t.usable = true;
  t.qmax = qmax_for(f.B);
  for (int i = 0; i < f.c; ++i) t.lsb |= uint64_t(1) << (i * f.b);
  uint8_t cells[kMaxCells];
  t.code.resize(size_t(2 * t.qmax + 1));
  for (int64_t v = -t.qmax; v <= t.qmax; ++v) {
    encode_one(v, f.B, f.b, f.enc, f.S, cells);
    t.code[size_t(v + t.qmax)] = pack_cells(cells, f);
  }
  return t;
}

// Cells whose b-bit fields differ between two packed words.
inline int64_t cells_differing(uint64_t x, const CellCodes& t, int b) {
  uint64_t any = x;
  for (int s = 1; s < b; ++s) any |= x >> s;
  return __builtin_popcountll(any & t.lsb);
}

int64_t write_aware_free(double t, const uint8_t* ref, double lambda, const CompFormat& f,
                         const CellCodes& codes, uint8_t* cells) {
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
  for (int64_t v = lo; v <= hi; ++v) {
    const double e = t - double(v);
    const int64_t w = ref ? cells_differing(codes.code[size_t(v + qmax)] ^ rc, codes, f.b) : 0;
    const double cost = xb_mul(e, e) + xb_mul(lambda, double(w));
    if (!found || cost < best_cost || (cost == best_cost && feedback_better(v, best_v, t))) {
      found = true;
      best_cost = cost;
      best_v = v;
    }
  }
  encode_one(best_v, f.B, f.b, f.enc, f.S, cells);
  return best_v;
}

// feedback_row for n <= kRowsTogether filters of one group at once: column k is chosen in every
// filter, then row k of U is carried onto all of them while it is in cache. Each filter sees
// exactly feedback_row's operations in feedback_row's order (bit-identical results); U, which
// does not fit in cache on ViT-Base's layers (3072 x 3072 doubles), is read from memory once
// per column for the n filters instead of once per filter, which bound the kernel.
void feedback_rows(const FeedbackRowArgs* rows, int n, const double* u, int64_t K,
                   const CompFormat& f, double lambda, const CellCodes& codes) {
  double e[kRowsTogether];
  for (int64_t k = 0; k < K; ++k) {
    const double* uk = u + k * K;
    for (int r = 0; r < n; ++r) {
      const FeedbackRowArgs& a = rows[r];
      bool held = false;
      if (a.held) {
        for (int i = 0; i < f.c; ++i) held = held || a.held[k * f.c + i];
      }
      int64_t v;
      if (a.chosen && !held && codes.usable) {
        const int64_t p = a.pos[k];
        v = write_aware_free(a.t[k], a.ref ? a.ref + p * f.c : nullptr, lambda, f, codes,
                             a.chosen + p * f.c);
      } else {
        v = feedback_pick(a.t[k], k, a.held, a.lv, f, lambda, a.pos, a.ref, a.chosen);
      }
      a.out[k] = int32_t(v);
      e[r] = (a.t[k] - double(v)) / uk[k];
    }
    for (int r = 0; r < n; ++r) {
      double* t = rows[r].t;
      const double er = e[r];
      for (int64_t j = k + 1; j < K; ++j) t[j] = t[j] - xb_mul(er, uk[j]);
    }
  }
}

at::Tensor feedback_quantize_cpu(const at::Tensor& target_in, const at::Tensor& u_in,
                                 const at::Tensor& held_in, const at::Tensor& levels_in,
                                 int64_t weight_bits, int64_t bits_per_cell, int64_t encoding,
                                 int64_t stuck_slices, const at::Tensor& pred,
                                 const at::Tensor& sort_index, double write_penalty) {
  TORCH_CHECK(target_in.device().is_cpu(),
              "crossbar_torch.feedback_quantize: target must be a CPU tensor here, got ",
              target_in.device());
  const int64_t c = check_feedback_quantize(target_in, u_in, held_in, levels_in, weight_bits,
                                            bits_per_cell, encoding, stuck_slices, pred,
                                            sort_index, write_penalty);
  at::Tensor t = target_in.contiguous().clone();  // running targets, updated in place
  const at::Tensor u = u_in.contiguous(), held = held_in.contiguous(),
                   levels = levels_in.contiguous();
  check_feedback_quantize_values(t, u, levels, bits_per_cell);
  const int64_t out = t.size(0), K = t.size(1), groups = u.size(0);
  at::Tensor q = at::empty({out, K}, t.options().dtype(at::kInt));
  if (out == 0 || K == 0) return q;
  const CompFormat fmt = make_comp_format(int(weight_bits), int(bits_per_cell), int(encoding),
                                          int(stuck_slices));
  double* tp = t.mutable_data_ptr<double>();
  const double* up = u.const_data_ptr<double>();
  const bool* hp = held.numel() ? held.const_data_ptr<bool>() : nullptr;
  const uint8_t* lp = levels.numel() ? levels.const_data_ptr<uint8_t>() : nullptr;
  int32_t* qp = q.mutable_data_ptr<int32_t>();
  const int64_t per_group = out / groups;
  if (write_penalty > 0.0) {
    const CellCodes codes = make_cell_codes(fmt);
    const FeedbackChains ch = feedback_chains(pred, out);
    const at::Tensor pos = sorted_positions(sort_index.contiguous());
    const int64_t* pp = pos.const_data_ptr<int64_t>();
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
              feedback_row(tp + o * K, up + (o / per_group) * K * K,
                           hp ? hp + o * K * c : nullptr, lp ? lp + o * K * c : nullptr, K,
                           fmt, qp + o * K, write_penalty, pp + o * K,
                           prev[i] >= 0 ? cp + prev[i] * K * c : nullptr, cp + o * K * c);
              continue;
            }
            group = o / per_group;
            rows[n++] = {tp + o * K, hp ? hp + o * K * c : nullptr,
                         lp ? lp + o * K * c : nullptr, qp + o * K, pp + o * K,
                         prev[i] >= 0 ? cp + prev[i] * K * c : nullptr, cp + o * K * c};
          }
          if (group < 0) break;  // every chain of this set has ended
          feedback_rows(rows, n, up + group * K * K, K, fmt, write_penalty, codes);
          for (int64_t i = 0; i < c1 - c0; ++i) {
            if (cur[i] >= 0) prev[i] = cur[i], cur[i] = ch.succ[cur[i]];
          }
        }
      }
    });
    return q;
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
        rows[n++] = {tp + o * K, hp ? hp + o * K * c : nullptr, lp ? lp + o * K * c : nullptr,
                     qp + o * K, nullptr, nullptr, nullptr};
      }
      feedback_rows(rows, n, up + g * K * K, K, fmt, 0.0, codes);
    }
  });
  return q;
}

}  // namespace

TORCH_LIBRARY_IMPL(crossbar_torch, CPU, m) {
  m.impl("feedback_quantize", &feedback_quantize_cpu);
}

}  // namespace crossbar_torch
