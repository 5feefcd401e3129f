// Rule 13's lookup table: for every set of free low cells and every q' = q - d0, the assignments
// of minimal error in increasing x (see CompTable in program_row.h for why that is the search's
// result). Built by the same enumeration compensate_weight runs, with the same nearest_high and
// encode_high.
#include "comp_table.h"

#include <cstdlib>
#include <map>
#include <mutex>
#include <tuple>

namespace crossbar_torch {
namespace {

// Evaluations (one assignment x for one key) a table may take to build: about 10 ms, once.
constexpr int64_t kBuildBudget = int64_t(1) << 23;
constexpr int64_t kMaxCandWords = int64_t(1) << 23;  // 32 MiB of candidates at most

std::shared_ptr<const CompTableHolder> build(const CompFormat& f) {
  if (f.enc == kTwosComplement && f.hbits == 0) return nullptr;  // d(x) not linear
  const int planes = f.b;
  const uint32_t cmask = uint32_t((uint64_t(1) << f.c) - 1);
  const uint32_t low = low_cells_mask(f), high = cmask & ~low;
  int low_cell[kMaxCells];
  int64_t coef[kMaxCells];  // weight of one level in each low cell, in the order of low_cell
  int n_low = 0;
  int64_t d0_min = f.enc == kOffset ? -qmax_for(f.B) : 0, d0_max = d0_min;
  const int top = (1 << f.b) - 1;
  for (int i = 0; i < f.c; ++i) {
    if (!((low >> i) & 1u)) continue;
    coef[n_low] = (f.enc == kDifferential && i >= f.S ? -1 : 1) *
                  (int64_t(1) << (slice_of(i, f.S) * f.b));
    (coef[n_low] < 0 ? d0_min : d0_max) += coef[n_low] * top;
    low_cell[n_low++] = i;
  }
  // Every value rule 3 writes lies in [-2**(B-1), 2**(B-1)]; other q' are searched directly.
  const int64_t half = int64_t(1) << (f.B - 1);
  const int64_t qlo = -half - d0_max, span = 2 * half - d0_min + d0_max + 1;
  int64_t cost = span;  // span * (1 + 2**b) ** n_low: every free set, every x of it
  for (int k = 0; k < n_low; ++k) {
    cost *= 1 + (int64_t(1) << f.b);
    if (cost > kBuildBudget) return nullptr;
  }
  auto t = std::make_shared<CompTableHolder>();
  const int64_t n_sets = int64_t(1) << n_low;
  t->start.assign(size_t(n_sets * span + 1), 0);
  const int64_t unit = int64_t(1) << f.m;
  std::vector<int64_t> dfree, err;
  std::vector<uint32_t> low_bits;
  for (int64_t fs = 0; fs < n_sets; ++fs) {
    int free_cell[kMaxCells];
    int64_t free_coef[kMaxCells];
    int nfree = 0;
    for (int k = 0; k < n_low; ++k) {
      if ((fs >> k) & 1) {
        free_cell[nfree] = low_cell[k];
        free_coef[nfree++] = coef[k];
      }
    }
    // x read as a number, the first free cell least significant: the odometer's order
    const int64_t nx = int64_t(1) << (nfree * f.b);
    dfree.assign(size_t(nx), 0);
    err.assign(size_t(nx), 0);
    low_bits.assign(size_t(nx * planes), 0);
    for (int64_t x = 0; x < nx; ++x) {
      for (int k = 0; k < nfree; ++k) {
        const int64_t digit = (x >> (k * f.b)) & top;
        dfree[size_t(x)] += free_coef[k] * digit;
        for (int p = 0; p < planes; ++p) {
          low_bits[size_t(x * planes + p)] |= uint32_t((digit >> p) & 1) << free_cell[k];
        }
      }
    }
    for (int64_t kq = 0; kq < span; ++kq) {
      const int64_t qp = qlo + kq;
      int64_t best = -1;
      for (int64_t x = 0; x < nx; ++x) {
        const int64_t h = nearest_high(qp - dfree[size_t(x)], f);
        const int64_t val = h * unit + dfree[size_t(x)];
        const int64_t e = val > qp ? val - qp : qp - val;
        err[size_t(x)] = e;
        if (best < 0 || e < best) best = e;
      }
      for (int64_t x = 0; x < nx; ++x) {
        if (err[size_t(x)] != best) continue;
        uint8_t lv[kMaxCells] = {0};
        encode_high(nearest_high(qp - dfree[size_t(x)], f), f, lv);
        for (int p = 0; p < planes; ++p) {
          uint32_t bits = low_bits[size_t(x * planes + p)];
          for (int i = 0; i < f.c; ++i) {
            if ((high >> i) & 1u) bits |= uint32_t((lv[i] >> p) & 1) << i;
          }
          t->cand.push_back(bits);
        }
      }
      if (int64_t(t->cand.size()) > kMaxCandWords) return nullptr;
      t->start[size_t(fs * span + kq + 1)] = int32_t(t->cand.size() / size_t(planes));
    }
  }
  t->view.start = t->start.data();
  t->view.cand = t->cand.data();
  t->view.qlo = qlo;
  t->view.span = span;
  t->view.n_low = n_low;
  t->view.low_mask = low;
  t->view.high_mask = high;
  return t;
}

}  // namespace

std::shared_ptr<const CompTableHolder> comp_table_for(const CompFormat& f) {
  const char* env = std::getenv("CROSSBAR_TORCH_COMPENSATION_TABLE");
  if (env != nullptr && env[0] == '0' && env[1] == '\0') return nullptr;
  static std::mutex mu;
  // Formats with no table are remembered too (a null entry), so they are tried once.
  static std::map<std::tuple<int, int, int, int>, std::shared_ptr<const CompTableHolder>> cache;
  const auto key = std::make_tuple(f.B, f.b, f.enc, f.L);
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(key);
  if (it == cache.end()) it = cache.emplace(key, build(f)).first;
  return it->second;
}

}  // namespace crossbar_torch
