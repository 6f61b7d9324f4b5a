// The shared core of the flash-style CPU attention kernels (cpu/image_text_attention.cpp and
// cpu/perceiver_attention.cpp): float32 vectors from/to float32 or bfloat16 memory, the GEMM tile
// kernel (oneDNN's brgemm through at::native::cpublas: AMX tiles for bfloat16 where the CPU has
// them, AVX-512 for float32), the packing of its B operands, the online-softmax tile step of the
// forward, and the dK/dV/dQ tile step of the backward. Each op file keeps only what is particular
// to it: which rows and which key tiles a task visits, and where the results go.
//
// Include it right after the op's own declaration header and before anything else: it includes
// everything the kernels take from the standard library and ATen first, so their inline functions
// are compiled for the baseline ISA (they may be shared with other translation units), then opens
// the AVX-512 section in which only at::vec (in its own inline namespace at::vec::AVX512) and the
// kernels are compiled. The including file closes the section at its end:
//   #if VLMK_ATTENTION_AVX512
//   #pragma GCC diagnostic pop
//   #pragma GCC pop_options
//   #endif
// Everything here has internal linkage (an unnamed namespace): each kernel file gets its own copy,
// compiled inside its own AVX-512 section.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/native/Math.h>
#include <ATen/native/cpu/zmath.h>
#include <ATen/native/quantized/AffineQuantizerBase.h>
#include <c10/util/BFloat16-math.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <c10/util/Load.h>
#include <c10/util/copysign.h>
#include <c10/util/irange.h>
#include <c10/util/qint32.h>
#include <c10/util/qint8.h>
#include <c10/util/quint8.h>

#include <algorithm>
#include <atomic>
#include <bitset>
#include <cassert>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(CPU_CAPABILITY)
// The extension is built for baseline x86-64; the attention kernels are built for AVX-512 and run
// only where avx512_supported() says so (AVX512-BF16 instructions only behind their
// own runtime check, see native_bf16()). GCC's target pragma does not define the ISA macros, and
// sleef.h (through at::vec) declares its AVX-512 functions only under them, hence the defines.
#define VLMK_ATTENTION_AVX512 1
#pragma GCC push_options
// GCC 12 flags the _mm512_undefined_* idiom inside its own intrinsics headers at -O3, and notes
// that 512-bit vector returns differ from the baseline ABI (all such functions are internal here).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wpsabi"
#pragma GCC target("avx,avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __AVX512F__ 1
#define __AVX512BW__ 1
#define __AVX512VL__ 1
#define __AVX512DQ__ 1
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#else
#define VLMK_ATTENTION_AVX512 0
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#endif

namespace vlmk {
namespace cpu {
namespace {

using at::BFloat16;
using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();
constexpr float kInf = std::numeric_limits<float>::infinity();

// Tiling. Rows are (query, head of the GQA group) pairs; gathered row counts above kRowAlign are
// padded to multiples of it, which bounds the number of distinct brgemm shapes (each is
// JIT-compiled once).
constexpr int64_t kRowAlign = 16;
constexpr int64_t kFwdRows = 256;  // rows per forward task (a block of 256 / group queries)
constexpr int64_t kFwdKeys = 512;  // keys per forward tile at most
constexpr int64_t kBwdRows = 256;  // rows per backward GEMM block
constexpr int64_t kBwdKeys = 256;  // keys per backward tile at most
// Row strides of the score / probability tiles: whole 64-byte lines in float32 and bfloat16 (AMX
// tile rows), but not a power of two, which would put a GEMM's 16 output rows into a few L1 sets.
constexpr int64_t kFwdLd = kFwdKeys + 32;
constexpr int64_t kBwdLd = kBwdKeys + 32;
// Lazy online softmax: a row's running max is rebased only when a score exceeds it by 2^8.
constexpr float kLazyRescale = 8.f;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }
inline int64_t padded_rows(int64_t rows) {
  return rows <= kRowAlign ? rows : round_up(rows, kRowAlign);
}

// Elements per 32-bit word of a brgemm B operand: bfloat16 B is in VNNI layout, pairs along K.
template <typename T>
constexpr int64_t kPair = std::is_same_v<T, float> ? 1 : 2;

// ---- scratch memory -----------------------------------------------------------------------------

struct FreeDeleter {
  void operator()(void* ptr) const { std::free(ptr); }
};
template <typename T>
using Buffer = std::unique_ptr<T[], FreeDeleter>;

template <typename T>
Buffer<T> make_buffer(int64_t count, bool zero = false) {
  const size_t bytes = static_cast<size_t>(round_up(std::max<int64_t>(count, 1) * sizeof(T), 64));
  void* ptr = std::aligned_alloc(64, bytes);
  TORCH_CHECK(ptr != nullptr, "attention (cpu): out of memory allocating ", bytes, " bytes");
  if (zero) std::memset(ptr, 0, bytes);
  return Buffer<T>(static_cast<T*>(ptr));
}

// ---- float32 vectors from/to float32 or bfloat16 memory -----------------------------------------

#if VLMK_ATTENTION_AVX512
inline __mmask16 lanes_mask(int64_t count) { return static_cast<__mmask16>((1u << count) - 1u); }
inline Vec load_vec(const float* ptr) { return Vec::loadu(ptr); }
inline Vec load_vec(const float* ptr, int64_t count) { return Vec::loadu(ptr, count); }
inline Vec load_vec(const BFloat16* ptr) {
  __m512 out;
  at::vec::cvtbf16_fp32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(ptr)), out);
  return out;
}
inline Vec load_vec(const BFloat16* ptr, int64_t count) {
  __m512 out;
  at::vec::cvtbf16_fp32(_mm256_maskz_loadu_epi16(lanes_mask(count), ptr), out);
  return out;
}
// float32 -> bfloat16 (round to nearest even): one instruction with AVX512-BF16, else at::vec's.
template <bool kNative>
inline __m256i to_bf16(Vec value) {
  if constexpr (kNative) {
    return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(value));
  } else {
    return at::vec::cvtfp32_bf16(value);
  }
}
template <bool kNative = false>
inline void store_vec(BFloat16* ptr, Vec value) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(ptr), to_bf16<kNative>(value));
}
template <bool kNative = false>
inline void store_vec(BFloat16* ptr, Vec value, int64_t count) {
  _mm256_mask_storeu_epi16(ptr, lanes_mask(count), to_bf16<kNative>(value));
}
template <bool kNative = false>
inline void store_vec(float* ptr, Vec value) {
  value.store(ptr);
}
template <bool kNative = false>
inline void store_vec(float* ptr, Vec value, int64_t count) {
  value.store(ptr, count);
}
// Two rows of bfloat16 values interleaved element by element (VNNI pairs): 2 * count values.
template <bool kNative = false>
inline void store_pair(BFloat16* ptr, Vec row0, Vec row1, int64_t count = kLanes) {
  const __m512i both =
      _mm512_inserti64x4(_mm512_castsi256_si512(to_bf16<kNative>(row0)), to_bf16<kNative>(row1), 1);
  const __m512i index = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24,
                                         8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i mixed = _mm512_permutexvar_epi16(index, both);
  if (count == kLanes) {
    _mm512_storeu_si512(ptr, mixed);
  } else {
    const __mmask32 mask = static_cast<__mmask32>((1ull << (2 * count)) - 1ull);
    _mm512_mask_storeu_epi16(ptr, mask, mixed);
  }
}
#else
template <typename T>
inline Vec load_vec(const T* ptr, int64_t count = kLanes) {
  float values[kLanes] = {};
  for (int64_t i = 0; i < count; ++i) values[i] = static_cast<float>(ptr[i]);
  return Vec::loadu(values);
}
template <bool kNative = false, typename T>
inline void store_vec(T* ptr, Vec value, int64_t count = kLanes) {
  float values[kLanes];
  value.store(values);
  for (int64_t i = 0; i < count; ++i) ptr[i] = static_cast<T>(values[i]);
}
template <bool kNative = false>
inline void store_pair(BFloat16* ptr, Vec row0, Vec row1, int64_t count = kLanes) {
  float values0[kLanes], values1[kLanes];
  row0.store(values0);
  row1.store(values1);
  for (int64_t i = 0; i < count; ++i) {
    ptr[2 * i] = static_cast<BFloat16>(values0[i]);
    ptr[2 * i + 1] = static_cast<BFloat16>(values1[i]);
  }
}
#endif

// Maximum without at::vec::maximum's NaN handling: 1 instruction instead of 4.
inline Vec fast_max(Vec a, Vec b) {
#if VLMK_ATTENTION_AVX512
  return _mm512_max_ps(a, b);
#else
  return at::vec::maximum(a, b);
#endif
}

// 2^t for t <= ~0 (0 below -125): Cephes exp2f polynomial (<= 2 ulp) and vscalefps, 10 instructions
// where at::vec's exp_u20 takes 17; the softmax runs one per score.
inline Vec fast_exp2(Vec t) {
#if VLMK_ATTENTION_AVX512
  // 0 below 2^-125 (no denormals downstream); NaN stays NaN (the compare is unordered-true).
  const __mmask16 keep = _mm512_cmp_ps_mask(t, _mm512_set1_ps(-125.f), _CMP_NLT_UQ);
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.535336188319500e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.339887440266574e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618437357674640e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550332471162809e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402264791363012e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472028550421e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_maskz_scalef_ps(keep, p, n);
#else
  return (t * Vec(0.6931471805599453f)).exp_u20();
#endif
}
constexpr float kLog2e = 1.4426950408889634f;

inline float reduce_max(Vec value) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); },
                                        value);
}
inline float reduce_sum(Vec value) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, value);
}

// Whether this CPU converts float32 to bfloat16 in one instruction (AVX512-BF16).
inline bool native_bf16() {
#if VLMK_ATTENTION_AVX512
  static const bool supported = __builtin_cpu_supports("avx512bf16");
  return supported;
#else
  return false;
#endif
}

// ---- GEMM: C[M, N] (+)= A[M, K] B[K, N]; float32 C; bfloat16 B in VNNI layout [K / 2][ldb][2] ---

// float32 runs in K blocks of 128 so a B block stays in cache across the rows (+25% on strided B).
inline void gemm(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc,
                 bool accumulate, const float* a, const float* b, float* c) {
  constexpr int64_t kBlock = 128;
  for (int64_t p = 0; p < k; p += kBlock) {
    at::native::cpublas::brgemm(m, n, std::min(kBlock, k - p), lda, ldb, ldc, accumulate || p > 0,
                                a + p, b + p * ldb, c, /*is_vnni=*/false);
  }
}
inline void gemm(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc,
                 bool accumulate, const BFloat16* a, const BFloat16* b, float* c) {
  at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, accumulate, a, b, c, /*is_vnni=*/true);
}
template <typename T>
void release_gemm() {
  if constexpr (!std::is_same_v<T, float>) at::native::cpublas::brgemm_release(/*is_vnni=*/true);
}

// ---- packing of brgemm B operands ---------------------------------------------------------------

template <typename T>
inline uint32_t load_word(const T* ptr) {
  uint32_t word;
  std::memcpy(&word, ptr, sizeof(word));
  return word;
}

#if VLMK_ATTENTION_AVX512
// In-register transpose of a 16 x 16 matrix of 32-bit words: r[i] is row i before, column i after.
inline void transpose_16x16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
  }
}
#endif

// B = src^T for src [rows][cols] (row stride src_stride): B [cols][rows], in words of kPair
// elements along cols: dst[(w * ld + j) * kPair + e] = src[j][w * kPair + e] (0 past cols).
template <typename T>
void pack_transposed(const T* src, int64_t src_stride, int64_t rows, int64_t cols, T* dst,
                     int64_t ld) {
  constexpr int64_t pair = kPair<T>;
  static_assert(sizeof(T) * pair == 4, "packs 32-bit words");
  const int64_t full_words = cols / pair;
  uint32_t* out = reinterpret_cast<uint32_t*>(dst);
  constexpr int64_t kBlock = 16;
  for (int64_t j0 = 0; j0 < rows; j0 += kBlock) {
    const int64_t j1 = std::min(rows, j0 + kBlock);
    int64_t w0 = 0;
#if VLMK_ATTENTION_AVX512
    if (j1 - j0 == kBlock) {
      // 16 x 16 word transposes.
      for (; w0 + kBlock <= full_words; w0 += kBlock) {
        __m512i r[16];
        for (int i = 0; i < 16; ++i) {
          r[i] = _mm512_loadu_si512(src + (j0 + i) * src_stride + w0 * pair);
        }
        transpose_16x16(r);
        // r[i] now holds word column w0 + i of rows j0 .. j0 + 15.
        for (int i = 0; i < 16; ++i) _mm512_storeu_si512(out + (w0 + i) * ld + j0, r[i]);
      }
    }
#endif
    for (int64_t w = w0; w < full_words; ++w) {
      for (int64_t j = j0; j < j1; ++j)
        out[w * ld + j] = load_word(src + j * src_stride + w * pair);
    }
    if (full_words * pair < cols) {  // odd cols of bfloat16: the last word is (src[j][cols - 1], 0)
      for (int64_t j = j0; j < j1; ++j) {
        T* word = dst + (full_words * ld + j) * pair;
        word[0] = src[j * src_stride + cols - 1];
        word[1] = T(0);
      }
    }
  }
}

// dst[j][e] = T(scale * src[e][j]) for src [rows][ld_src] float32, e < rows, j < cols (dst row
// stride dst_stride): the transposed write-out of the backward's dK^T / dV^T tiles.
template <typename T>
void store_transposed(const float* src, int64_t ld_src, int64_t rows, int64_t cols, float scale,
                      T* dst, int64_t dst_stride) {
  constexpr int64_t kBlock = 16;
  for (int64_t e0 = 0; e0 < rows; e0 += kBlock) {
    int64_t j0 = 0;
#if VLMK_ATTENTION_AVX512
    if (e0 + kBlock <= rows) {
      for (; j0 + kBlock <= cols; j0 += kBlock) {
        __m512i r[16];
        for (int i = 0; i < 16; ++i) {
          r[i] = _mm512_loadu_si512(src + (e0 + i) * ld_src + j0);
        }
        transpose_16x16(r);
        for (int i = 0; i < 16; ++i) {
          store_vec(dst + (j0 + i) * dst_stride + e0, Vec(_mm512_castsi512_ps(r[i])) * Vec(scale));
        }
      }
    }
#endif
    const int64_t e1 = std::min(rows, e0 + kBlock);
    for (int64_t j = j0; j < cols; ++j) {
      for (int64_t e = e0; e < e1; ++e) {
        dst[j * dst_stride + e] = static_cast<T>(scale * src[e * ld_src + j]);
      }
    }
  }
}

// dst[e][j] = src[j][e] for src [rows][src_stride], j < rows, e < cols; dst row stride ld. Blocked
// so both sides stay in cache (the strided side alone would thrash the L1 sets).
template <typename T>
void transpose_blocked(const T* src, int64_t src_stride, int64_t rows, int64_t cols, T* dst,
                       int64_t ld) {
  constexpr int64_t kBlock = 32;
  for (int64_t j0 = 0; j0 < rows; j0 += kBlock) {
    const int64_t j1 = std::min(rows, j0 + kBlock);
    for (int64_t e0 = 0; e0 < cols; e0 += kBlock) {
      const int64_t e1 = std::min(cols, e0 + kBlock);
      for (int64_t e = e0; e < e1; ++e) {
        for (int64_t j = j0; j < j1; ++j) dst[e * ld + j] = src[j * src_stride + e];
      }
    }
  }
}

// bfloat16 B = src for src [rows][cols]: VNNI pairs of rows, dst[((j / 2) * cols + e) * 2 + j % 2]
// = src[j][e]; an odd last row is paired with zeros.
inline void pack_row_pairs(const BFloat16* src, int64_t src_stride, int64_t rows, int64_t cols,
                           BFloat16* dst) {
  for (int64_t j = 0; j < rows; j += 2) {
    const BFloat16* row0 = src + j * src_stride;
    const BFloat16* row1 = j + 1 < rows ? row0 + src_stride : nullptr;
    BFloat16* out = dst + j * cols;
    int64_t e = 0;
#if VLMK_ATTENTION_AVX512
    const __m512i low = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40,
                                         8, 39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i high =
        _mm512_set_epi16(63, 31, 62, 30, 61, 29, 60, 28, 59, 27, 58, 26, 57, 25, 56, 24, 55, 23, 54,
                         22, 53, 21, 52, 20, 51, 19, 50, 18, 49, 17, 48, 16);
    for (; e + 32 <= cols; e += 32) {
      const __m512i a = _mm512_loadu_si512(row0 + e);
      const __m512i b = row1 ? _mm512_loadu_si512(row1 + e) : _mm512_setzero_si512();
      _mm512_storeu_si512(out + 2 * e, _mm512_permutex2var_epi16(a, low, b));
      _mm512_storeu_si512(out + 2 * e + 32, _mm512_permutex2var_epi16(a, high, b));
    }
#endif
    for (; e < cols; ++e) {
      out[2 * e] = row0[e];
      out[2 * e + 1] = row1 ? row1[e] : BFloat16(0.f);
    }
  }
}

// ---- softmax row pieces -------------------------------------------------------------------------

// max_j scale * s[j]. Four accumulators: the max has a 4-cycle latency chain otherwise.
inline float scaled_row_max(const float* s, int64_t n, float scale) {
  const Vec vscale(scale);
  Vec vmax[4] = {Vec(-kInf), Vec(-kInf), Vec(-kInf), Vec(-kInf)};
  int64_t j = 0;
  for (; j + 4 * kLanes <= n; j += 4 * kLanes) {
    for (int u = 0; u < 4; ++u)
      vmax[u] = fast_max(vmax[u], Vec::loadu(s + j + u * kLanes) * vscale);
  }
  for (; j + kLanes <= n; j += kLanes) vmax[0] = fast_max(vmax[0], Vec::loadu(s + j) * vscale);
  float result = reduce_max(fast_max(fast_max(vmax[0], vmax[1]), fast_max(vmax[2], vmax[3])));
  for (; j < n; ++j) result = std::max(result, s[j] * scale);
  return result;
}

// p[j] = exp(scale * s[j] - shift); returns sum_j p[j] (of the float32 values). With top !=
// nullptr, *top = max_j (scale * s[j] - shift) * log2(e), the exponent of the largest p[j] in
// base 2.
template <bool kNative, typename T>
inline float exp_row(const float* s, int64_t n, float scale, float shift, T* p, float* top) {
  const Vec vscale(scale * kLog2e), vshift(-shift * kLog2e);
  Vec vsum(0.f), vtop(-kInf);
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const Vec t = at::vec::fmadd(Vec::loadu(s + j), vscale, vshift);
    const Vec e = fast_exp2(t);
    vsum = vsum + e;
    if (top != nullptr) vtop = fast_max(vtop, t);
    store_vec<kNative>(p + j, e);
  }
  if (j < n) {
    const int64_t count = n - j;
    const Vec t = at::vec::fmadd(Vec::loadu(s + j, count), vscale, vshift);
    const Vec e = Vec::set(Vec(0.f), fast_exp2(t), count);
    vsum = vsum + e;
    vtop = fast_max(vtop, Vec::set(Vec(-kInf), t, count));
    store_vec<kNative>(p + j, e, count);
  }
  if (top != nullptr) *top = reduce_max(vtop);
  return reduce_sum(vsum);
}

// dst[i][0:cols] = a * dst[i] + src[i] for a vector of cols floats.
inline void scale_add(float* dst, float a, const float* src, int64_t cols) {
  const Vec va(a);
  int64_t d = 0;
  for (; d + kLanes <= cols; d += kLanes) {
    at::vec::fmadd(Vec::loadu(dst + d), va, Vec::loadu(src + d)).store(dst + d);
  }
  if (d < cols) {
    at::vec::fmadd(Vec::loadu(dst + d, cols - d), va, Vec::loadu(src + d, cols - d))
        .store(dst + d, cols - d);
  }
}

// dst[0:cols] = T(a * src) for float src.
template <typename T>
inline void store_scaled(T* dst, const float* src, float a, int64_t cols) {
  const Vec va(a);
  int64_t d = 0;
  for (; d + kLanes <= cols; d += kLanes) store_vec(dst + d, Vec::loadu(src + d) * va);
  if (d < cols) store_vec(dst + d, Vec::loadu(src + d, cols - d) * va, cols - d);
}

template <typename T>
inline void fill_zero(T* dst, int64_t count) {
  std::memset(static_cast<void*>(dst), 0, sizeof(T) * count);
}

// Runs body(task, worker) for every task in [0, num_tasks), handing tasks out dynamically to
// at::get_num_threads() workers; make_worker() builds each worker's scratch state.
template <typename MakeWorker, typename Body>
void run_tasks(int64_t num_tasks, MakeWorker make_worker, Body body) {
  if (num_tasks <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), num_tasks));
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      auto worker = make_worker();
      for (int64_t task = next++; task < num_tasks; task = next++) body(task, worker);
    }
  });
}

// Whether this CPU runs the instruction set the kernels were compiled for (AVX-512 on x86-64).
inline bool avx512_supported() {
#if VLMK_ATTENTION_AVX512
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return true;
#endif
}

// scores[r][j] = -inf for r < m and the keys j < n with key_visible[j] == 0 (their P is 0).
inline void hide_key_columns(float* scores, int64_t ld, int64_t m, int64_t n,
                             const uint8_t* key_visible) {
  for (int64_t j = 0; j < n; ++j) {
    if (key_visible[j]) continue;
    for (int64_t r = 0; r < m; ++r) scores[r * ld + j] = -kInf;
  }
}

// ==== forward tile step ==========================================================================

// exp(scale * s - shift) into p (see exp_row), with the float32 -> bfloat16 conversion the CPU has.
template <typename T>
inline float exp_probs(const float* s, int64_t n, float scale, float shift, T* p, float* top) {
  return native_bf16() ? exp_row<true>(s, n, scale, shift, p, top)
                       : exp_row<false>(s, n, scale, shift, p, top);
}

// Online softmax over one key tile. scores [m][ld] float32 holds S = Q K^T for n keys in its first
// `rows` rows (the rest up to m is GEMM padding); row r keeps its running max and sum at
// row_max / row_sum[row_of[r]]. Writes P = exp(scale S - max) into probs [m][ld] in T (padding rows
// and the VNNI pair slot past n zeroed) and alpha[r], the factor row r's accumulator must be scaled
// by before P V is added; returns whether any alpha differs from 1.
//
// The running max is lazy: a row keeps its max while the tile's scores stay below max +
// kLazyRescale (base 2), which saves the max pass and the rescale of the accumulator on most tiles.
// probs is not written in place of scores: a rebased row reads its scores again.
template <typename T>
bool online_softmax_tile(const float* scores, int64_t ld, int64_t rows, int64_t m, int64_t n,
                         float scale, const int64_t* row_of, float* row_max, float* row_sum,
                         float* alpha, T* probs) {
  const int64_t n_pairs = round_up(n, kPair<T>);
  bool rescale = false;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t row = row_of[r];
    const float* s = scores + r * ld;
    T* p = probs + r * ld;
    const float old_max = row_max[row];
    float new_max = old_max, factor = 1.f, sum = 0.f, top = -kInf;
    if (old_max != -kInf) sum = exp_probs(s, n, scale, old_max, p, &top);
    if (old_max == -kInf || top > kLazyRescale) {
      new_max = std::max(old_max, scaled_row_max(s, n, scale));
      factor = old_max == -kInf ? 1.f : std::exp(old_max - new_max);  // acc is 0 on first visit
      sum = exp_probs(s, n, scale, new_max, p, nullptr);
      rescale |= factor != 1.f;
    }
    if (n_pairs > n) p[n] = T(0);
    row_sum[row] = row_sum[row] * factor + sum;
    row_max[row] = new_max;
    alpha[r] = factor;
  }
  for (int64_t r = rows; r < m; ++r) fill_zero(probs + r * ld, n_pairs);
  return rescale;
}

// acc[row_of[r]] = alpha[r] * acc[row_of[r]] + (P V)[r] for the tile's rows r < rows, P [m][ld] and
// V [n_pairs][dh] (VNNI row pairs for bfloat16, row stride ld_values). `in_place`: the rows are the
// accumulator's own, in order, and no alpha differs from 1, so the GEMM accumulates into acc
// directly; otherwise through out_tile [m][dh].
template <typename T>
void accumulate_pv(const T* probs, int64_t ld, int64_t rows, int64_t m, int64_t n_pairs,
                   const T* values, int64_t ld_values, int64_t dh, bool in_place,
                   const int64_t* row_of, const float* alpha, float* out_tile, float* acc) {
  if (in_place) {
    gemm(m, dh, n_pairs, ld, ld_values, dh, true, probs, values, acc);
    return;
  }
  gemm(m, dh, n_pairs, ld, ld_values, dh, false, probs, values, out_tile);
  for (int64_t r = 0; r < rows; ++r) {
    scale_add(acc + row_of[r] * dh, alpha[r], out_tile + r * dh, dh);
  }
}

// ==== backward tile step =========================================================================
//
// For a set of loaded rows (q, dO, their transposes, lse, delta = rowsum(dO * out)) and one tile of
// n keys, per block of kBwdRows rows:
//   S = Q K^T, P = exp(scale S - lse), dP = dO V^T, dS = P (dP - delta)
//   dV^T += dO^T P,  dK^T += Q^T dS,  dQ += dS K     (dK, dQ scaled by the caller)

// Scratch of the backward tile step, for up to max_rows rows (a multiple of kRowAlign).
template <typename T>
struct BackwardScratch {
  BackwardScratch(int64_t max_rows, int64_t head_dim) {
    const int64_t rows = max_rows, dh = head_dim, dhp = round_up(head_dim, kPair<T>);
    q = make_buffer<T>(rows * dhp, true);
    grad_out = make_buffer<T>(rows * dhp, true);
    q_t = make_buffer<T>(dh * rows, true);
    grad_out_t = make_buffer<T>(dh * rows, true);
    lse = make_buffer<float>(rows);
    delta = make_buffer<float>(rows);
    dq = make_buffer<float>(rows * dh, true);
    scores = make_buffer<float>(kBwdRows * kBwdLd, true);
    dprobs = make_buffer<float>(kBwdRows * kBwdLd, true);
    if constexpr (kPair<T> == 2) {
      probs_pairs = make_buffer<T>(kBwdRows * kBwdLd, true);
      dscores = make_buffer<T>(kBwdRows * kBwdLd, true);
      dscores_pairs = make_buffer<T>(kBwdRows * kBwdLd, true);
    }
    key_rows = make_buffer<T>((kBwdKeys + 2) * dh, true);
    dk_t = make_buffer<float>(dh * kBwdLd);
    dv_t = make_buffer<float>(dh * kBwdLd);
    key_t = make_buffer<T>(dhp * kBwdLd, true);
    value_t = make_buffer<T>(dhp * kBwdLd, true);
  }
  ~BackwardScratch() { release_gemm<T>(); }
  BackwardScratch(BackwardScratch&&) = default;
  // Loaded rows: q, dO [rows][dhp]; their transposes [dh][rows]; lse, delta [rows]; dQ [rows][dh].
  Buffer<T> q, grad_out, q_t, grad_out_t;
  Buffer<float> lse, delta, dq;
  // Tile: S and dP [kBwdRows][kBwdLd] float32; bfloat16 P and dS as VNNI row pairs and dS plain.
  Buffer<float> scores, dprobs;
  Buffer<T> probs_pairs, dscores, dscores_pairs;
  // Tile: K^T, V^T [dhp][kBwdLd] (words of kPair), K rows (VNNI pairs for bfloat16), dK^T, dV^T.
  Buffer<T> key_t, value_t, key_rows;
  Buffer<float> dk_t, dv_t;
};

// delta = rowsum(dO * out). float32: one sequential fused multiply-add chain, the order in which
// the dP = dO V^T GEMM sums, so dP - delta cancels exactly where it should (a row that sees one key
// has out = v, P = 1 and dS = 0).
template <typename T>
float row_dot(const T* dout, const T* out, int64_t dh) {
  if constexpr (std::is_same_v<T, float>) {
    float sum = 0.f;
    for (int64_t d = 0; d < dh; ++d) sum = std::fma(dout[d], out[d], sum);
    return sum;
  } else {
    Vec sum(0.f);
    int64_t d = 0;
    for (; d + kLanes <= dh; d += kLanes)
      sum = at::vec::fmadd(load_vec(dout + d), load_vec(out + d), sum);
    if (d < dh) sum = at::vec::fmadd(load_vec(dout + d, dh - d), load_vec(out + d, dh - d), sum);
    return reduce_sum(sum);
  }
}

// Where loaded row r of the backward comes from.
template <typename T>
struct BackwardRow {
  const T* q;         // [dh]
  const T* grad_out;  // [dh]
  const T* out;       // [dh], the forward's output
  float lse;          // the forward's log-sum-exp
};

// Loads rows r < rows from source(r) -> BackwardRow<T> into w (q, dO, their transposes, lse,
// delta); rows up to round_up(rows, kRowAlign) are padding with P = 0.
template <typename T, typename Source>
void load_backward_rows(BackwardScratch<T>& w, int64_t rows, int64_t dh, Source source) {
  const int64_t dhp = round_up(dh, kPair<T>);
  const int64_t rows_padded = round_up(rows, kRowAlign);
  for (int64_t r = 0; r < rows; ++r) {
    const BackwardRow<T> row = source(r);
    T* q_row = w.q.get() + r * dhp;
    T* dout_row = w.grad_out.get() + r * dhp;
    std::memcpy(q_row, row.q, sizeof(T) * dh);
    std::memcpy(dout_row, row.grad_out, sizeof(T) * dh);
    if (dhp > dh) {
      q_row[dh] = T(0);
      dout_row[dh] = T(0);
    }
    w.delta[r] = row_dot(row.grad_out, row.out, dh);
    w.lse[r] = row.lse;
  }
  for (int64_t r = rows; r < rows_padded; ++r) {
    fill_zero(w.q.get() + r * dhp, dhp);
    fill_zero(w.grad_out.get() + r * dhp, dhp);
    w.delta[r] = 0.f;
    w.lse[r] = kInf;  // P = exp(-inf) = 0 on padding rows
  }
  transpose_blocked(w.q.get(), dhp, rows_padded, dh, w.q_t.get(), rows_padded);
  transpose_blocked(w.grad_out.get(), dhp, rows_padded, dh, w.grad_out_t.get(), rows_padded);
}

// float32: P = exp(scale S - lse) in place of S, dS = P (dP - delta) in place of dP, rows r0 ..
// r0 + m of the loaded rows.
inline void softmax_grad_rows(BackwardScratch<float>& w, float scale, int64_t r0, int64_t m,
                              int64_t n) {
  const Vec vscale(scale * kLog2e);
  for (int64_t r = 0; r < m; ++r) {
    float* s = w.scores.get() + r * kBwdLd;
    float* dp = w.dprobs.get() + r * kBwdLd;
    const Vec shift(-w.lse[r0 + r] * kLog2e), delta(w.delta[r0 + r]);
    int64_t j = 0;
    for (; j + kLanes <= n; j += kLanes) {
      const Vec p = fast_exp2(at::vec::fmadd(Vec::loadu(s + j), vscale, shift));
      p.store(s + j);
      (p * (Vec::loadu(dp + j) - delta)).store(dp + j);
    }
    if (j < n) {
      const int64_t count = n - j;
      const Vec p = fast_exp2(at::vec::fmadd(Vec::loadu(s + j, count), vscale, shift));
      p.store(s + j, count);
      (p * (Vec::loadu(dp + j, count) - delta)).store(dp + j, count);
    }
  }
}

// bfloat16: the same, written as P and dS in VNNI row pairs (B operands) and dS plain (A operand).
template <bool kNative>
void softmax_grad_row_pairs(BackwardScratch<BFloat16>& w, float scale, int64_t r0, int64_t m,
                            int64_t n, int64_t n_pairs) {
  using T = BFloat16;
  const Vec vscale(scale * kLog2e);
  for (int64_t r = 0; r < m; r += 2) {
    const float* s0 = w.scores.get() + r * kBwdLd;
    const float* s1 = s0 + kBwdLd;
    const float* dp0 = w.dprobs.get() + r * kBwdLd;
    const float* dp1 = dp0 + kBwdLd;
    T* ds0 = w.dscores.get() + r * kBwdLd;
    T* ds1 = ds0 + kBwdLd;
    T* probs_pairs = w.probs_pairs.get() + r * kBwdLd;
    T* dscores_pairs = w.dscores_pairs.get() + r * kBwdLd;
    const Vec shift0(-w.lse[r0 + r] * kLog2e), shift1(-w.lse[r0 + r + 1] * kLog2e);
    const Vec delta0(w.delta[r0 + r]), delta1(w.delta[r0 + r + 1]);
    for (int64_t j = 0; j < n; j += kLanes) {
      const int64_t count = std::min(kLanes, n - j);
      const Vec p0 = fast_exp2(at::vec::fmadd(Vec::loadu(s0 + j, count), vscale, shift0));
      const Vec p1 = fast_exp2(at::vec::fmadd(Vec::loadu(s1 + j, count), vscale, shift1));
      const Vec d0 = p0 * (Vec::loadu(dp0 + j, count) - delta0);
      const Vec d1 = p1 * (Vec::loadu(dp1 + j, count) - delta1);
      store_vec<kNative>(ds0 + j, d0, count);
      store_vec<kNative>(ds1 + j, d1, count);
      store_pair<kNative>(probs_pairs + 2 * j, p0, p1, count);
      store_pair<kNative>(dscores_pairs + 2 * j, d0, d1, count);
    }
    if (n_pairs > n) {
      ds0[n] = T(0);
      ds1[n] = T(0);
    }
  }
}

// One key tile of n <= kBwdKeys keys (rows keys[j * k_stride], values[j * v_stride]) against the
// rows_padded loaded rows: dK^T, dV^T of the tile into w.dk_t / w.dv_t (unscaled, overwritten) and
// dQ += dS K into w.dq (unscaled). key_visible (optional, [n]): keys with 0 there get P = 0, hence
// no gradient and no part in dQ.
template <typename T>
void backward_tile(BackwardScratch<T>& w, int64_t rows_padded, const T* keys, int64_t k_stride,
                   const T* values, int64_t v_stride, int64_t n, int64_t dh, float scale,
                   const uint8_t* key_visible = nullptr) {
  const int64_t dhp = round_up(dh, kPair<T>), n_pairs = round_up(n, kPair<T>);
  pack_transposed(keys, k_stride, n, dh, w.key_t.get(), kBwdLd);
  pack_transposed(values, v_stride, n, dh, w.value_t.get(), kBwdLd);
  // K itself, the B operand of dQ = dS K: VNNI row pairs, or dense rows (float32 rows are often
  // 4 KB apart, which maps a GEMM's B block onto a few cache sets).
  if constexpr (kPair<T> == 2) {
    pack_row_pairs(keys, k_stride, n, dh, w.key_rows.get());
  } else {
    for (int64_t j = 0; j < n; ++j) {
      std::memcpy(w.key_rows.get() + j * dh, keys + j * k_stride, sizeof(T) * dh);
    }
  }
  bool first = true;
  for (int64_t r0 = 0; r0 < rows_padded; r0 += kBwdRows) {
    const int64_t m = std::min(kBwdRows, rows_padded - r0);
    gemm(m, n, dhp, dhp, kBwdLd, kBwdLd, false, w.q.get() + r0 * dhp, w.key_t.get(),
         w.scores.get());
    if (key_visible != nullptr) hide_key_columns(w.scores.get(), kBwdLd, m, n, key_visible);
    gemm(m, n, dhp, dhp, kBwdLd, kBwdLd, false, w.grad_out.get() + r0 * dhp, w.value_t.get(),
         w.dprobs.get());
    const T* probs_b;
    const T* dscores_a;
    const T* dscores_b;
    if constexpr (kPair<T> == 1) {
      softmax_grad_rows(w, scale, r0, m, n);
      probs_b = w.scores.get();
      dscores_a = w.dprobs.get();
      dscores_b = w.dprobs.get();
    } else {
      if (native_bf16()) {
        softmax_grad_row_pairs<true>(w, scale, r0, m, n, n_pairs);
      } else {
        softmax_grad_row_pairs<false>(w, scale, r0, m, n, n_pairs);
      }
      probs_b = w.probs_pairs.get();
      dscores_a = w.dscores.get();
      dscores_b = w.dscores_pairs.get();
    }
    // dV^T[dh][n] += dO^T P, dK^T[dh][n] += Q^T dS, dQ[m][dh] += dS K
    gemm(dh, n, m, rows_padded, kBwdLd, kBwdLd, !first, w.grad_out_t.get() + r0, probs_b,
         w.dv_t.get());
    gemm(dh, n, m, rows_padded, kBwdLd, kBwdLd, !first, w.q_t.get() + r0, dscores_b, w.dk_t.get());
    gemm(m, dh, n_pairs, kBwdLd, dh, dh, true, dscores_a, w.key_rows.get(), w.dq.get() + r0 * dh);
    first = false;
  }
}

// dK = scale * (dK^T)^T and dV = (dV^T)^T of the last tile's n keys into rows dk[j * stride],
// dv[j * stride].
template <typename T>
void write_key_grads(const BackwardScratch<T>& w, int64_t n, int64_t dh, float scale, T* dk, T* dv,
                     int64_t stride) {
  store_transposed(w.dk_t.get(), kBwdLd, dh, n, scale, dk, stride);
  store_transposed(w.dv_t.get(), kBwdLd, dh, n, 1.f, dv, stride);
}

}  // namespace
}  // namespace cpu
}  // namespace vlmk
