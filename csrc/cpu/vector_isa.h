// Which vector instructions the rule-21/24 kernels (feedback_quantize_kernel.cpp,
// feedback_refine_kernel.cpp) run with: the widest the CPU has, or a narrower one named by
// CROSSBAR_TORCH_CPU_VECTOR ("scalar", "avx2", "avx512"; read on every call, so tests can run
// every path in one process). Every path computes each element with the same products and sums
// in the same order (no fused multiply-add: setup.py builds with -ffp-contract=off), so the
// choice changes the time, never a result.
#pragma once

#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#define XB_X86_VECTOR 1
#endif

namespace crossbar_torch {

enum class VectorIsa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

inline VectorIsa cpu_vector_isa() {
#ifdef XB_X86_VECTOR
  static const VectorIsa widest = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("popcnt")) {
      return VectorIsa::kAvx512;
    }
    return __builtin_cpu_supports("avx2") ? VectorIsa::kAvx2 : VectorIsa::kScalar;
  }();
  VectorIsa cap = VectorIsa::kAvx512;
  if (const char* env = std::getenv("CROSSBAR_TORCH_CPU_VECTOR")) {
    if (std::strcmp(env, "scalar") == 0) cap = VectorIsa::kScalar;
    if (std::strcmp(env, "avx2") == 0) cap = VectorIsa::kAvx2;
  }
  return cap < widest ? cap : widest;
#else
  return VectorIsa::kScalar;
#endif
}

// A kernel's variant for `isa`, among its scalar, AVX2 and AVX-512 ones.
template <class Fn>
Fn pick_variant(VectorIsa isa, Fn scalar, Fn avx2, Fn avx512) {
  return isa == VectorIsa::kAvx512 ? avx512 : isa == VectorIsa::kAvx2 ? avx2 : scalar;
}

}  // namespace crossbar_torch
