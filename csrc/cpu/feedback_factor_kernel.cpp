// feedback_factor / CPU (host only): rule 21's factor of each group's damped input moment,
// H + lambda I = U D U^T (U unit upper triangular, D diagonal), as float64 (G, K, K) with U's
// strict upper triangle above D on the diagonal. It is the Cholesky factor L L^T of the reversed
// matrix J (H + lambda I) J, read back reversed: U D^(1/2) = J L J.
//
// crossbar_torch/feedback.py computed it in torch ops: the moment to float64, its reversal
// (flip), linalg.cholesky (which copies its input into column-major order first), the result's
// reversal, a division pass: five passes over a 3072 x 3072 float64 matrix around LAPACK's
// factorisation, a fifth of its time. Here the reversed damped matrix is written once, straight
// into the column-major buffer LAPACK factors in place (the reversal of a row-major matrix is its
// flat buffer backwards, and a symmetric matrix is its own column-major copy), and U is read back
// from it once, divided as it goes: the same LAPACK call (dpotrf, 'U') on the same numbers, and
// the same divisions, so the same bits.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../common.h"

// LAPACK's Cholesky factorisation as torch's own linalg.cholesky calls it (libtorch_cpu exports
// it where torch is built with LAPACK; weak: null elsewhere, and then torch's ops run instead).
extern "C" void dpotrf_(char* uplo, int* n, double* a, int* lda, int* info)
    __attribute__((weak));

namespace crossbar_torch {
namespace {

// The torch ops crossbar_torch/feedback.py ran before (a build without LAPACK symbols).
at::Tensor factor_by_torch_ops(const at::Tensor& h) {
  at::Tensor f = at::linalg_cholesky(h.flip({-1, -2}), /*upper=*/true).mT().flip({-1, -2});
  at::Tensor d = f.diagonal(0, 1, 2).clone();
  f.div_(d.unsqueeze(1));
  f.diagonal(0, 1, 2).copy_(d * d);
  return f;
}

at::Tensor feedback_factor_cpu(const at::Tensor& moment_in, double damp) {
  const char* op = "feedback_factor";
  check_dtype(moment_in, at::kFloat, op, "moment");
  TORCH_CHECK(moment_in.device().is_cpu(), "crossbar_torch.feedback_factor: moment must be a "
              "CPU tensor, got ", moment_in.device());
  check_dim(moment_in, 3, op, "moment", "(groups, K, K)");
  const int64_t G = moment_in.size(0), K = moment_in.size(1);
  check_size(moment_in, 2, K, op, "moment", "K = moment.size(1)");
  TORCH_CHECK(std::isfinite(damp) && damp >= 0.0, "crossbar_torch.feedback_factor: damp must be "
              "a finite number >= 0, got ", damp);
  // LAPACK indexes the K x K buffer with 32-bit integers (checked before anything is copied)
  TORCH_CHECK(K == 0 || K <= int64_t(INT32_MAX) / K, "crossbar_torch.feedback_factor: K = ",
              K, " is too large for LAPACK (K * K must fit 32 bits)");
  const at::Tensor moment = moment_in.contiguous();
  TORCH_CHECK(moment.numel() == 0 || all_finite(moment),
              "crossbar_torch.feedback_factor: the input moment holds NaN or Inf");
  // rule 21's damping, by the torch ops damp_diagonal_ runs: an entry never seen made 1, then
  // damp times the group's mean entry added (the same reduction, so the same bits)
  at::Tensor diag = moment.diagonal(0, 1, 2).to(at::kDouble);
  diag.masked_fill_(diag.eq(0), 1.0);
  diag.add_(diag.mean(1, /*keepdim=*/true).mul(damp));
  if (K == 0 || G == 0) return at::empty({G, K, K}, moment.options().dtype(at::kDouble));
  if (!dpotrf_) {
    at::Tensor h = moment.to(at::kDouble);
    h.diagonal(0, 1, 2).copy_(diag);
    return factor_by_torch_ops(h);
  }
  at::Tensor out = at::empty({G, K, K}, moment.options().dtype(at::kDouble));
  const int64_t n2 = K * K;
  // LAPACK's buffer, aligned as torch's own (its results may depend on the alignment), not
  // cleared: what LAPACK reads is written below, and the rest is never read
  at::Tensor work = at::empty({n2}, moment.options().dtype(at::kDouble));
  const double* dg = diag.const_data_ptr<double>();
  for (int64_t g = 0; g < G; ++g) {
    const float* h = moment.const_data_ptr<float>() + g * n2;
    // J Hd J in column-major order is Hd's row-major buffer backwards (Hd is symmetric): entry
    // (i, j) of Hd at n2 - 1 - (i * K + j). LAPACK's 'U' reads position (a, b), a <= b, at
    // b * K + a: Hd's entry (K-1-b, K-1-a), of its upper triangle, written here row by row.
    double* w = work.mutable_data_ptr<double>();
    for (int64_t i = 0; i < K; ++i) {
      const float* row = h + i * K;
      double* dst = w + (n2 - 1 - i * K);  // dst[-j] is (i, j)
      dst[-i] = dg[g * K + i];
      for (int64_t j = i + 1; j < K; ++j) dst[-j] = double(row[j]);
    }
    char uplo = 'U';
    int n = int(K), lda = int(K), info = 0;
    dpotrf_(&uplo, &n, w, &lda, &info);
    TORCH_CHECK(info >= 0, "crossbar_torch.feedback_factor: LAPACK's dpotrf refused argument ",
                -info);
    TORCH_CHECK(info == 0, "crossbar_torch.feedback_factor: the damped input moment of group ",
                g, " is not positive-definite (the leading minor of order ", info, " is not); "
                "a larger feedback_damp makes it so");
    // U D^(1/2) = J R^T J with R LAPACK's upper factor: entry (i, j) is the buffer backwards,
    // w[n2 - 1 - (i * K + j)], for j >= i; each column divided by its diagonal d[j] (D = d^2)
    double* u = out.mutable_data_ptr<double>() + g * n2;
    std::vector<double> d(static_cast<size_t>(K));
    for (int64_t j = 0; j < K; ++j) d[size_t(j)] = w[n2 - 1 - (j * K + j)];
    for (int64_t i = 0; i < K; ++i) {
      const double* src = w + (n2 - 1 - i * K);  // src[-j] is (i, j)
      double* row = u + i * K;
      for (int64_t j = 0; j < i; ++j) row[j] = 0.0;
      row[i] = d[size_t(i)] * d[size_t(i)];
      for (int64_t j = i + 1; j < K; ++j) row[j] = src[-j] / d[size_t(j)];
    }
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(crossbar_torch, CPU, m) {
  m.impl("feedback_factor", &feedback_factor_cpu);
}

}  // namespace crossbar_torch
