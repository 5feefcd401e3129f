// The cell codes of cell_codes.h counted eight values at a time (AVX-512): rule 23's choice of a
// weight without held cells (feedback_quantize_kernel.cpp) and rule 24's moves
// (feedback_refine_kernel.cpp) price a window of candidate values in a few vector steps, each
// lane with the scalar loop's operations on the same values, so the choices do not change.
#pragma once

#include "vector_isa.h"

#ifdef XB_X86_VECTOR
#include <immintrin.h>

#include "cell_codes.h"

namespace crossbar_torch {

// The instructions the wide paths use beyond AVX-512F: byte shuffles (BW) for the counts, and
// quadword-to-double conversions (DQ). A CPU with AVX-512F alone (a first Xeon Phi) keeps the
// AVX2 paths' scalar pricing.
#define XB_WIDE_CODES_TARGET __attribute__((target("avx512f,avx512bw,avx512dq,popcnt")))

inline bool wide_codes_supported() {
  static const bool ok = __builtin_cpu_supports("avx512f") &&
                         __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("popcnt");
  return ok;
}

// (GCC 12's AVX-512 headers build some of these intrinsics on an undefined vector and warn of it
// where they are inlined: the lanes they leave undefined are never read.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// Cells whose b-bit fields differ, per 64-bit lane of x (two codes XORed): cells_differing's
// count. The bits of each byte by a nibble table, then the bytes of each lane summed (AVX-512's
// own count, VPOPCNTQ, is on fewer CPUs than the rest of what these paths use).
XB_WIDE_CODES_TARGET inline __attribute__((always_inline)) __m512i lanes_differing(
    __m512i x, __m512i lsb, int b) {
  __m512i any = x;
  for (int sh = 1; sh < b; ++sh) {
    any = _mm512_or_si512(any, _mm512_srl_epi64(x, _mm_cvtsi32_si128(sh)));
  }
  any = _mm512_and_si512(any, lsb);
  const __m512i nib = _mm512_set1_epi8(0x0f);
  const __m512i table = _mm512_broadcast_i32x4(
      _mm_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4));
  const __m512i lo = _mm512_shuffle_epi8(table, _mm512_and_si512(any, nib));
  const __m512i hi = _mm512_shuffle_epi8(table, _mm512_and_si512(_mm512_srli_epi64(any, 4), nib));
  return _mm512_sad_epu8(_mm512_add_epi8(lo, hi), _mm512_setzero_si512());
}

#pragma GCC diagnostic pop

}  // namespace crossbar_torch

#endif
