// AVX-512 pieces shared by the CPU kernels that move 16-bit data around oneDNN's brgemm:
// masks for partial vectors, float32 -> bfloat16 / float16 rounding, and a 16 x 16 transpose of
// 32-bit elements (VNNI packing of row-major operands, transposed epilogues).
//
// The extension is built for baseline x86-64, so every function here carries its own target
// attribute (VLMK_AVX512_FN) and may be called only where avx512::supported() says so; a caller
// compiled for the same target (or a superset) inlines them. Elsewhere (another compiler or
// architecture) VLMK_HAVE_AVX512_UTIL is 0 and callers take their portable loops.
#pragma once

#include <cstdint>
#include <cstdlib>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#include <immintrin.h>
#define VLMK_HAVE_AVX512_UTIL 1
#define VLMK_AVX512_FN \
  __attribute__((target("avx,avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq")))
// The same plus AVX512-BF16 (vcvtne2ps2bf16), for avx512::bf16_supported() CPUs.
#define VLMK_AVX512_BF16_FN \
  __attribute__((target("avx,avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#else
#define VLMK_HAVE_AVX512_UTIL 0
#endif

namespace vlmk {
namespace cpu {

// Forward outputs from this size up are written with non-temporal stores of whole lines where a
// kernel can: larger than a core's L2, they leave it before the next op reads them anyway, and a
// regular store first reads every line it writes (patch_embed: 6-8% faster at the ViT shapes, and a
// layer_norm after it no slower; concat_project llava bf16 forward: 3-14% in interleaved runs).
constexpr int64_t kStreamOutputBytes = int64_t{4} << 20;

// Makes this thread's non-temporal stores visible to other threads (call before a parallel
// region's task ends).
inline void stream_fence() {
#if defined(__x86_64__)
  __builtin_ia32_sfence();
#endif
}

namespace avx512 {

#if VLMK_HAVE_AVX512_UTIL

// Whether this CPU runs the functions below. VLMK_CPU_NO_AVX512=1 in the environment (read once)
// says no, so that tests can run the callers' portable loops on an AVX-512 machine.
inline bool supported() {
  static const bool value =
      std::getenv("VLMK_CPU_NO_AVX512") == nullptr && __builtin_cpu_supports("avx512f") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("f16c") &&
      __builtin_cpu_supports("fma");
  return value;
}

// Whether this CPU also has AVX512-BF16 (functions marked VLMK_AVX512_BF16_FN).
inline bool bf16_supported() {
  static const bool value = supported() && __builtin_cpu_supports("avx512bf16");
  return value;
}

// The first min(n, 16) lanes (none for n <= 0).
VLMK_AVX512_FN inline __mmask16 lanes(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xffff)
                 : static_cast<__mmask16>((1u << (n > 0 ? n : 0)) - 1u);
}

// float32 -> bfloat16 bits, round to nearest even (as c10::BFloat16); NaN stays a (quiet) NaN.
// Integer ops, so no AVX512-BF16 is needed.
VLMK_AVX512_FN inline __m256i bf16_bits(__m512 value) {
  const __m512i bits = _mm512_castps_si512(value);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
  const __mmask16 nan = _mm512_cmp_ps_mask(value, value, _CMP_UNORD_Q);
  rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_or_si512(bits, _mm512_set1_epi32(0x400000)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
}

// float32 -> float16 bits, round to nearest even.
VLMK_AVX512_FN inline __m256i half_bits(__m512 value) {
  return _mm512_cvtps_ph(value, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

// rows[r] = the 16 32-bit elements at `base` + r * stride_bytes under `mask`, for r < count;
// zero for the rest. Any alignment.
VLMK_AVX512_FN inline void load_block16(__m512i rows[16], const void* base, int64_t stride_bytes,
                                        int64_t count, __mmask16 mask) {
  const char* bytes = static_cast<const char*>(base);
#pragma GCC unroll 16
  for (int64_t r = 0; r < 16; ++r) {
    rows[r] = r < count ? _mm512_maskz_loadu_epi32(mask, bytes + r * stride_bytes)
                        : _mm512_setzero_si512();
  }
}

// rows[i] lane j <- rows[j] lane i, for 16 vectors of 16 32-bit elements. In place, stage by
// stage, so that ~20 vectors are live (an array per stage spilled to the stack).
VLMK_AVX512_FN inline void transpose16x16(__m512i rows[16]) {
  // 32-bit interleave of row pairs: per 128-bit lane k, (r0[4k], r1[4k], r0[4k+1], r1[4k+1]), ...
#pragma GCC unroll 8
  for (int i = 0; i < 16; i += 2) {
    const __m512i low = _mm512_unpacklo_epi32(rows[i], rows[i + 1]);
    const __m512i high = _mm512_unpackhi_epi32(rows[i], rows[i + 1]);
    rows[i] = low;
    rows[i + 1] = high;
  }
  // 64-bit interleave: rows[4g + c] lane k becomes column 4k + c of rows 4g .. 4g + 3.
#pragma GCC unroll 4
  for (int g = 0; g < 16; g += 4) {
    const __m512i c0 = _mm512_unpacklo_epi64(rows[g], rows[g + 2]);
    const __m512i c1 = _mm512_unpackhi_epi64(rows[g], rows[g + 2]);
    const __m512i c2 = _mm512_unpacklo_epi64(rows[g + 1], rows[g + 3]);
    const __m512i c3 = _mm512_unpackhi_epi64(rows[g + 1], rows[g + 3]);
    rows[g] = c0;
    rows[g + 1] = c1;
    rows[g + 2] = c2;
    rows[g + 3] = c3;
  }
  // A 4 x 4 transpose of 128-bit lanes per column residue c: column 4k + c takes lane k of
  // rows[c], rows[4 + c], rows[8 + c], rows[12 + c].
#pragma GCC unroll 4
  for (int c = 0; c < 4; ++c) {
    const __m512i low01 = _mm512_shuffle_i32x4(rows[c], rows[4 + c], 0x44);
    const __m512i high01 = _mm512_shuffle_i32x4(rows[c], rows[4 + c], 0xee);
    const __m512i low23 = _mm512_shuffle_i32x4(rows[8 + c], rows[12 + c], 0x44);
    const __m512i high23 = _mm512_shuffle_i32x4(rows[8 + c], rows[12 + c], 0xee);
    rows[c] = _mm512_shuffle_i32x4(low01, low23, 0x88);
    rows[4 + c] = _mm512_shuffle_i32x4(low01, low23, 0xdd);
    rows[8 + c] = _mm512_shuffle_i32x4(high01, high23, 0x88);
    rows[12 + c] = _mm512_shuffle_i32x4(high01, high23, 0xdd);
  }
}

#else

inline bool supported() { return false; }
inline bool bf16_supported() { return false; }

#endif

}  // namespace avx512
}  // namespace cpu
}  // namespace vlmk
