// analog_matmul / CUDA: one thread per output (o, n) walks sections, planes and cells in the
// reference's order; the per-element arithmetic (quantize_input, input_digit, adc_read,
// analog_term in analog_row.h) is literally the CPU kernel's, every sum runs over the section's
// rows in sorted order and no multiply-add is fused, so the two devices agree bit for bit.
// pmax: per-block maxima in shared memory (when the c cells fit), then one atomicMax per cell
// and block on the bit patterns (every recorded value is >= 0, where the order of the bit
// patterns is that of the doubles).
#include <torch/library.h>

#include <tuple>

#include "../analog_matmul_args.h"
#include "../analog_row.h"
#include "../common.h"
#include "cuda_utils.cuh"

namespace crossbar_torch {
namespace {

constexpr int64_t kSharedMaxCells = 4096;  // 32 KB of shared memory

__global__ void quantize_kernel(const float* x, float* xq, int64_t n, AnalogFormat f,
                                unsigned long long* first_bad) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(blockDim.x) * gridDim.x) {
    const float v = x[i];
    if (!isfinite(v)) {
      atomicMin(first_bad, static_cast<unsigned long long>(i));
      continue;
    }
    xq[i] = quantize_input(v, f);
  }
}

struct AnalogParams {
  const float* xq;      // (N, C)
  const double* g;      // (out, c, K)
  const int64_t* idx;   // (out, K)
  const double* steps;  // (c,)
  const double* coef;   // (planes, c)
  double* acc;          // (N, out)
  unsigned long long* pmax;  // (c,) bit patterns of doubles >= 0
  int64_t N, C, out, c, K, per_group, rows, sections;
  double encoding_offset;
  bool shared_pmax;
  AnalogFormat f;
};

__global__ void analog_matmul_kernel(AnalogParams A) {
  extern __shared__ unsigned long long smax[];
  const AnalogFormat f = A.f;
  const int64_t c = A.c, K = A.K;
  if (A.shared_pmax) {
    for (int64_t i = threadIdx.x; i < c; i += blockDim.x) smax[i] = 0ull;
    __syncthreads();
  }
  unsigned long long* pm = A.shared_pmax ? smax : A.pmax;
  const int64_t total = A.N * A.out;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < total;
       t += int64_t(blockDim.x) * gridDim.x) {
    const int64_t o = t / A.N, n = t % A.N;  // neighbouring threads share the filter
    const float* xr = A.xq + n * A.C + (o / A.per_group) * K;
    const int64_t* io = A.idx + o * K;
    const double* go = A.g + o * c * K;
    double acc = 0.0;
    for (int64_t s = 0; s < A.sections; ++s) {
      const int64_t k0 = s * A.rows, k1 = min(K, k0 + A.rows);
      for (int p = 0; p < f.planes; ++p) {
        double dsum = 0.0;
        for (int64_t k = k0; k < k1; ++k) dsum = xb_add(dsum, input_digit(xr[io[k]], p, f));
        for (int64_t i = 0; i < c; ++i) {
          const double* gi = go + i * K;
          double P = 0.0;
          for (int64_t k = k0; k < k1; ++k) {
            P = xb_add(P, xb_mul(gi[k], input_digit(xr[io[k]], p, f)));
          }
          const double v = pmax_value(P, f);
          if (v > 0.0) atomicMax(pm + i, static_cast<unsigned long long>(__double_as_longlong(v)));
          acc = xb_add(acc, analog_term(P, dsum, A.steps[i], A.coef[p * c + i], f));
        }
      }
    }
    if (A.encoding_offset != 0.0) {
      double sum = 0.0;
      for (int64_t k = 0; k < K; ++k) sum = xb_add(sum, static_cast<double>(xr[k]));
      acc = xb_sub(acc, xb_mul(A.encoding_offset, sum));
    }
    A.acc[n * A.out + o] = acc;
  }
  if (A.shared_pmax) {
    __syncthreads();
    for (int64_t i = threadIdx.x; i < c; i += blockDim.x) {
      if (smax[i]) atomicMax(A.pmax + i, smax[i]);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> analog_matmul_cuda(
    const at::Tensor& x_in, const at::Tensor& g_in, const at::Tensor& sort_index_in,
    const at::Tensor& cell_weight_in, const at::Tensor& adc_steps_in, int64_t groups,
    int64_t rows, int64_t input_bits, int64_t input_bits_per_cycle, double input_scale,
    int64_t adc_bits, double g0, double encoding_offset, bool signed_weights,
    bool check_values) {
  check_cuda(x_in, "analog_matmul", "x");
  const AnalogLayout L = check_analog_matmul(
      x_in, g_in, sort_index_in, cell_weight_in, adc_steps_in, groups, rows, input_bits,
      input_bits_per_cycle, input_scale, adc_bits, g0, encoding_offset, signed_weights);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor sort_index = sort_index_in.contiguous();
  const at::Tensor cell_weight = cell_weight_in.contiguous();
  const at::Tensor adc_steps = adc_steps_in.contiguous();
  if (check_values) check_analog_matmul_values(g_in, sort_index, cell_weight, adc_steps, adc_bits);
  const AnalogFormat& f = L.fmt;
  const int64_t N = L.N, out = L.out, c = L.c, K = L.K;
  const auto f64 = x_in.options().dtype(at::kDouble);
  at::Tensor acc = at::zeros({N, out}, f64);
  at::Tensor pmax_t = at::zeros({c}, f64);

  const at::Tensor x = x_in.contiguous();
  const int64_t numel = x.numel();
  at::Tensor xq = at::empty_like(x);
  if (numel > 0) {
    at::Tensor first_bad = at::full({1}, numel, x.options().dtype(at::kLong));
    quantize_kernel<<<blocks_for(numel), kThreads, 0, current_stream()>>>(
        x.const_data_ptr<float>(), xq.mutable_data_ptr<float>(), numel, f,
        reinterpret_cast<unsigned long long*>(first_bad.mutable_data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t bad = first_bad.item<int64_t>();
    const int64_t C = x.size(1);
    TORCH_CHECK(bad == numel, "crossbar_torch.analog_matmul: x contains NaN or Inf (x[",
                bad / C, ", ", bad % C, "] = ", x.view(-1)[bad].item<float>(),
                "); inputs must be finite");
  }
  if (N == 0 || out == 0 || K == 0) return std::make_tuple(acc, pmax_t);

  const at::Tensor g = g_in.to(at::kDouble).contiguous();
  at::Tensor coef_host = at::empty({f.planes, c}, at::TensorOptions().dtype(at::kDouble));
  {
    const at::Tensor cw = cell_weight.to(at::kCPU);
    const double* cwp = cw.const_data_ptr<double>();
    double* cp = coef_host.mutable_data_ptr<double>();
    for (int p = 0; p < f.planes; ++p) {
      for (int64_t i = 0; i < c; ++i) cp[p * c + i] = plane_weight(p, f) * cwp[i];
    }
  }
  const at::Tensor coef = coef_host.to(x.device());

  AnalogParams A;
  A.xq = xq.const_data_ptr<float>();
  A.g = g.const_data_ptr<double>();
  A.idx = sort_index.const_data_ptr<int64_t>();
  A.steps = adc_steps.const_data_ptr<double>();
  A.coef = coef.const_data_ptr<double>();
  A.acc = acc.mutable_data_ptr<double>();
  A.pmax = reinterpret_cast<unsigned long long*>(pmax_t.mutable_data_ptr<double>());
  A.N = N;
  A.C = x.size(1);
  A.out = out;
  A.c = c;
  A.K = K;
  A.per_group = L.per_group;
  A.rows = L.rows;
  A.sections = L.sections;
  A.encoding_offset = encoding_offset;
  A.shared_pmax = c <= kSharedMaxCells;
  A.f = f;
  const size_t shmem = A.shared_pmax ? size_t(c) * sizeof(unsigned long long) : 0;
  analog_matmul_kernel<<<blocks_for(N * out), kThreads, shmem, current_stream()>>>(A);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return std::make_tuple(acc, pmax_t);
}

}  // namespace

TORCH_LIBRARY_IMPL(crossbar_torch, CUDA, m) { m.impl("analog_matmul", &analog_matmul_cuda); }

}  // namespace crossbar_torch
