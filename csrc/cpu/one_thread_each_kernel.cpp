// one_thread_each / CPU (host only): independent products, each computed by one thread from end
// to end, the threads of ATen's pool sharing them (crossbar_torch/threads.py). What it is for:
// results whose rounding must not move with the thread count (rule 21's input moments, the
// crossbar layers' products while they are measured), computed with every thread busy. Until
// stop 38 a Python thread pool ran them; the pool's own OpenMP worker then spun, after each of
// the model's other operations, on a core those threads needed (calibrating the ViT-Base-sized
// model took a seventh longer than with the worker asleep). Here the products run on that
// worker: the same products, one thread each, so the same bits.
//
// `linear`: out[i] = at::linear(a[i], b[i], bias) (what torch.nn.functional.linear computes);
// otherwise out[i] = at::matmul(a[i], b[i]). `stacked` (linear, 2-D a[i] with one b): the row
// blocks of one input, their products written into the row blocks of one output, returned
// alone (at::addmm_out / at::mm_out: the products at::linear computes for 2-D inputs, the same
// bits, without a concatenation after them). Jobs are taken in order by whichever thread is
// free (the largest first balance best). No autograd: the results are plain tensors.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <vector>

// MKL's thread count for the calling thread alone (0: the process's; the C interface, which
// mkl.h names mkl_set_num_threads_local: that symbol is the Fortran one), where torch is built
// with MKL (libtorch_cpu exports it; weak: null elsewhere, and then the products run one after
// the other, below; crossbar_torch/threads.py keeps its thread pool for such a build).
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

namespace crossbar_torch {
namespace {

// Within ATen's parallel region MKL still splits a product for the process's thread count
// (along its sums, on tall and narrow shapes: other bits than on one thread) and runs the
// parts on the calling thread; on this thread it is told to use one for as long as this lives.
struct OneBlasThread {
  int before = 0;
  OneBlasThread() {
    if (MKL_Set_Num_Threads_Local) before = MKL_Set_Num_Threads_Local(1);
  }
  ~OneBlasThread() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(before);
  }
};

std::vector<at::Tensor> one_thread_each_cpu(at::TensorList a, at::TensorList b,
                                            const std::optional<at::Tensor>& bias,
                                            bool linear, bool stacked) {
  const int64_t n = int64_t(a.size());
  TORCH_CHECK(int64_t(b.size()) == n, "crossbar_torch.one_thread_each: a and b must hold as "
              "many tensors, got ", n, " and ", b.size());
  TORCH_CHECK(!bias.has_value() || linear,
              "crossbar_torch.one_thread_each: a bias goes with linear=True only");
  auto check = [](const at::Tensor& t, const char* name, int64_t i) {
    TORCH_CHECK(t.device().is_cpu(), "crossbar_torch.one_thread_each: ", name, "[", i,
                "] must be a CPU tensor, got ", t.device());
    TORCH_CHECK(at::isFloatingType(t.scalar_type()), "crossbar_torch.one_thread_each: ", name,
                "[", i, "] must be floating, got ", t.scalar_type());
  };
  for (int64_t i = 0; i < n; ++i) {
    check(a[size_t(i)], "a", i);
    check(b[size_t(i)], "b", i);
  }
  if (bias.has_value()) check(*bias, "bias", 0);
  std::vector<at::Tensor> out(static_cast<size_t>(n));
  at::Tensor whole;  // stacked: the one output
  std::vector<int64_t> first_row(static_cast<size_t>(n) + 1, 0);
  if (stacked) {
    TORCH_CHECK(linear, "crossbar_torch.one_thread_each: stacked goes with linear=True only");
    TORCH_CHECK(n >= 1, "crossbar_torch.one_thread_each: stacked needs at least one product");
    for (int64_t i = 0; i < n; ++i) {
      const at::Tensor& x = a[size_t(i)];
      TORCH_CHECK(x.dim() == 2 && x.size(1) == a[0].size(1) &&
                  x.scalar_type() == a[0].scalar_type() && b[size_t(i)].is_same(b[0]),
                  "crossbar_torch.one_thread_each: stacked products are 2-D row blocks of one "
                  "input with one weight; a[", i, "] has shape ", x.sizes());
      first_row[size_t(i) + 1] = first_row[size_t(i)] + x.size(0);
    }
    TORCH_CHECK(b[0].dim() == 2 && b[0].size(1) == a[0].size(1),
                "crossbar_torch.one_thread_each: the weight ", b[0].sizes(), " does not take ",
                a[0].size(1), " inputs");
    whole = at::empty({first_row[size_t(n)], b[0].size(0)}, a[0].options());
  }
  auto product = [&](int64_t i) {
    const at::Tensor& x = a[size_t(i)];
    const at::Tensor& y = b[size_t(i)];
    if (stacked) {  // at::linear of a 2-D input: addmm with a bias, mm without
      at::Tensor rows = whole.narrow(0, first_row[size_t(i)], x.size(0));
      if (bias.has_value()) {
        at::addmm_out(rows, *bias, x, y.t());
      } else {
        at::mm_out(rows, x, y.t());
      }
      return;
    }
    out[size_t(i)] = linear ? at::linear(x, y, bias) : at::matmul(x, y);
  };
  if (!MKL_Set_Num_Threads_Local) {
    // no MKL to tell (another BLAS): every product here, torch on one thread meanwhile, which
    // is exact but not parallel (crossbar_torch/threads.py uses its thread pool there instead)
    struct OneThread {
      int before = at::get_num_threads();
      OneThread() { at::set_num_threads(1); }
      ~OneThread() { at::set_num_threads(before); }
    } one;
    at::AutoDispatchBelowADInplaceOrView no_autograd;
    for (int64_t i = 0; i < n; ++i) product(i);
    return stacked ? std::vector<at::Tensor>{whole} : out;
  }
  std::atomic<int64_t> next{0};
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  // one range per thread; in it, jobs are claimed one at a time. Within ATen's parallel region
  // each product runs on its thread alone: ATen's nested parallel loops run inline, and MKL is
  // told one thread (OneBlasThread).
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView no_autograd;  // a worker thread's own dispatch state
    const OneBlasThread blas;
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t i = next++; i < n; i = next++) product(i);
    }
  });
  return stacked ? std::vector<at::Tensor>{whole} : out;
}

}  // namespace

TORCH_LIBRARY_IMPL(crossbar_torch, CPU, m) {
  m.impl("one_thread_each", &one_thread_each_cpu);
}

}  // namespace crossbar_torch
