// image_text_attention on the CPU, forward and backward (semantics in cpu/image_text_attention.h).
//
// Flash-style, float32 softmax statistics, GEMMs by oneDNN's brgemm microkernel through
// at::native::cpublas::brgemm (AMX tiles for bfloat16 on CPUs that have them, AVX-512 for float32).
// The rows of one task are the Hq/Hkv query heads of one kv head times a block of queries, stacked,
// so each GEMM reads a key/value tile once for the whole GQA group.
//
// Chunk skipping: a task walks only the media chunks some of its queries may see. Consecutive
// chunks seen by the same queries form a segment (in the forward's shared packed layout only where
// no padding separates them), cut into key tiles. For each segment the task gathers the query rows
// that see it, so the GEMMs run on exactly the visible (row, key) pairs and no per-element mask is
// ever applied.
//
// Forward, per task (batch, kv head, query block [, key split]): for each tile S = Q K^T, online
// softmax (running max m, sum l, float32 accumulator; the max is rebased lazily, only when a score
// exceeds it by 2^8), acc += P V. Key tiles are packed once per call (K^T, and V in the VNNI pair
// layout AMX wants) when several query blocks share them (20% faster than packing per task when 16
// blocks share a tile, as fast with 4); otherwise (decode, one query block) each task packs its own
// tiles, or computes S^T = K Q^T straight from k. Few (batch, head, query block) tasks (decode
// with small batch) split the keys of a block across tasks and combine the partial (m, l, acc).
//
// Backward, per task (batch, kv head [, key split]): for each segment gather the rows that see it
// (q, dO, their transposes, lse, delta = rowsum(dO * out)), then for each key tile and block of
// rows
//   S = Q K^T, P = exp(scale S - lse), dP = dO V^T, dS = P (dP - delta)
//   dV^T += dO^T P,  dK^T += Q^T dS,  dQ += dS K     (dK, dQ scaled at the end)
// A task owns its keys' dK/dV and its rows' dQ outright (key splits sum their dQ afterwards), so
// there are no atomics and every run is bitwise reproducible.
#include "cpu/image_text_attention.h"

// Everything this file takes from the standard library and ATen is included here, before the
// AVX-512 section, so their inline functions are compiled for the baseline ISA (they may be shared
// with other translation units); only at::vec (in its own inline namespace at::vec::AVX512) and
// this file's kernels are compiled for AVX-512.
#include <ATen/NumericUtils.h>
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
// The extension is built for baseline x86-64; this file's kernels are built for AVX-512 and run
// only where image_text_attention_supported() says so (AVX512-BF16 instructions only behind their
// own runtime check, see native_bf16()). GCC's target pragma does not define the ISA macros, and
// sleef.h (through at::vec) declares its AVX-512 functions only under them, hence the defines.
#define VLMK_ITA_AVX512 1
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
#define VLMK_ITA_AVX512 0
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
constexpr int64_t kFwdRows = 256;       // rows per forward task (a block of 256 / group queries)
constexpr int64_t kFwdKeys = 512;       // keys per forward tile at most
constexpr int64_t kBwdRows = 256;       // rows per backward GEMM block
constexpr int64_t kBwdKeys = 256;       // keys per backward tile at most
constexpr int64_t kDirectMaxRows = 64;  // unpacked forward (S^T = K Q^T) up to this many rows
// Row strides of the score / probability tiles: whole 64-byte lines in float32 and bfloat16 (AMX
// tile rows), but not a power of two, which would put a GEMM's 16 output rows into a few L1 sets.
constexpr int64_t kFwdLd = kFwdKeys + 32;
constexpr int64_t kBwdLd = kBwdKeys + 32;
// Lazy online softmax: a row's running max is rebased only when a score exceeds it by 2^8.
constexpr float kLazyRescale = 8.f;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }
int64_t padded_rows(int64_t rows) { return rows <= kRowAlign ? rows : round_up(rows, kRowAlign); }

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
  TORCH_CHECK(ptr != nullptr, "image_text_attention: out of memory allocating ", bytes, " bytes");
  if (zero) std::memset(ptr, 0, bytes);
  return Buffer<T>(static_cast<T*>(ptr));
}

// ---- float32 vectors from/to float32 or bfloat16 memory -----------------------------------------

#if VLMK_ITA_AVX512
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
#if VLMK_ITA_AVX512
  return _mm512_max_ps(a, b);
#else
  return at::vec::maximum(a, b);
#endif
}

// 2^t for t <= ~0 (0 below -125): Cephes exp2f polynomial (<= 2 ulp) and vscalefps, 10 instructions
// where at::vec's exp_u20 takes 17; the softmax runs one per score.
inline Vec fast_exp2(Vec t) {
#if VLMK_ITA_AVX512
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
bool native_bf16() {
#if VLMK_ITA_AVX512
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

#if VLMK_ITA_AVX512
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
#if VLMK_ITA_AVX512
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
#if VLMK_ITA_AVX512
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
void pack_row_pairs(const BFloat16* src, int64_t src_stride, int64_t rows, int64_t cols,
                    BFloat16* dst) {
  for (int64_t j = 0; j < rows; j += 2) {
    const BFloat16* row0 = src + j * src_stride;
    const BFloat16* row1 = j + 1 < rows ? row0 + src_stride : nullptr;
    BFloat16* out = dst + j * cols;
    int64_t e = 0;
#if VLMK_ITA_AVX512
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

// Keys per chunk in the packed K^T / V layouts: even for VNNI pairs, and a multiple of 16 for long
// chunks so that tiles start on 64-byte boundaries (brgemm runs ~2x slower on misaligned B rows).
// Chunks of media_len keys are merged into common tiles only when no padding separates them.
int64_t packed_chunk_len(int64_t media_len, int64_t pair) {
  return media_len >= 256 ? round_up(media_len, kRowAlign) : round_up(media_len, pair);
}

// ---- visibility, segments and tiles -------------------------------------------------------------

// Effective chunk visibility [B][Lq][M] (uint8, contiguous), with the `uniform` rule applied: a row
// that sees no chunk sees them all.
std::vector<uint8_t> effective_visibility(const uint8_t* mask, int64_t stride_batch,
                                          int64_t stride_query, int64_t stride_chunk, int64_t batch,
                                          int64_t query_len, int64_t chunks, bool uniform) {
  std::vector<uint8_t> visible(static_cast<size_t>(batch * query_len * chunks));
  at::parallel_for(0, batch * query_len, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const uint8_t* src =
          mask + (row / query_len) * stride_batch + (row % query_len) * stride_query;
      uint8_t* dst = visible.data() + row * chunks;
      uint8_t any = 0;
      for (int64_t c = 0; c < chunks; ++c) any |= dst[c] = src[c * stride_chunk] != 0;
      if (uniform && !any) std::fill(dst, dst + chunks, uint8_t{1});
    }
  });
  return visible;
}

// A run of keys [key_begin, key_begin + keys) seen by the same queries; packed_begin is the column
// of its first key in the packed key layout (chunks padded to packed_chunk_len keys).
struct Tile {
  int64_t key_begin;
  int64_t keys;
  int64_t packed_begin;
  int64_t chunk;  // first chunk of the tile's segment: its visibility column selects the rows
};

// The tiles of the chunks seen by queries [t_begin, t_end) of one batch entry (visible: [Lq][M]).
// Consecutive chunks seen by the same queries merge into one segment when `merge` (the packed
// layout has no padding between chunks); a segment is cut into near-equal tiles of at most max_keys
// keys.
std::vector<Tile> visible_tiles(const uint8_t* visible, int64_t chunks, int64_t t_begin,
                                int64_t t_end, int64_t media_len, int64_t packed_chunk_len,
                                int64_t max_keys, bool merge) {
  std::vector<Tile> tiles;
  auto column_seen = [&](int64_t c) {
    for (int64_t t = t_begin; t < t_end; ++t) {
      if (visible[t * chunks + c]) return true;
    }
    return false;
  };
  auto same_column = [&](int64_t c0, int64_t c1) {
    for (int64_t t = t_begin; t < t_end; ++t) {
      if (visible[t * chunks + c0] != visible[t * chunks + c1]) return false;
    }
    return true;
  };
  int64_t c = 0;
  while (c < chunks) {
    if (!column_seen(c)) {
      ++c;
      continue;
    }
    int64_t end = c + 1;
    while (merge && end < chunks && same_column(c, end)) ++end;
    const int64_t keys = (end - c) * media_len;
    const int64_t count = ceil_div(keys, max_keys);
    const int64_t tile_keys = std::min(max_keys, round_up(ceil_div(keys, count), kRowAlign));
    for (int64_t offset = 0; offset < keys; offset += tile_keys) {
      tiles.push_back(Tile{c * media_len + offset, std::min(tile_keys, keys - offset),
                           c * packed_chunk_len + offset, c});
    }
    c = end;
  }
  return tiles;
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

// ==== forward ====================================================================================

template <typename T>
class Forward {
 public:
  explicit Forward(const ImageTextAttentionFwdParams& p) : p_(p) {
    group_ = p.heads_q / p.heads_kv;
    head_words_ = ceil_div(p.head_dim, kPair<T>);
    head_dim_padded_ = head_words_ * kPair<T>;
    block_q_ = std::max<int64_t>(1, std::min(p.query_len, kFwdRows / group_));
    num_blocks_ = ceil_div(p.query_len, block_q_);
    rows_ = block_q_ * group_;
    rows_padded_ = padded_rows(rows_);
    packed_chunk_len_ = packed_chunk_len(p.media_len, kPair<T>);
    packed_len_ = round_up(p.num_chunks * packed_chunk_len_, kRowAlign);
    const int64_t threads = at::get_num_threads();
    const int64_t base_tasks = p.batch * p.heads_kv * num_blocks_;
    // Key splits when (batch, kv head, query block) alone leaves threads idle: decode.
    splits_ = 1;
    if (base_tasks < 4 * threads) {
      splits_ = std::min(ceil_div(4 * threads, base_tasks),
                         std::max<int64_t>(1, ceil_div(p.num_chunks * p.media_len, kFwdKeys)));
    }
    prepack_ = num_blocks_ >= 2;
    direct_ = !prepack_ && rows_padded_ <= kDirectMaxRows &&
              (kPair<T> == 1 || p.head_dim % kPair<T> == 0);
  }

  void run() {
    visible_ = effective_visibility(p_.media_mask, p_.mask_stride_batch, p_.mask_stride_query,
                                    p_.mask_stride_chunk, p_.batch, p_.query_len, p_.num_chunks,
                                    p_.empty_rows == EmptyRows::kUniform);
    if (prepack_) pack_keys_values();
    const int64_t num_tasks = p_.batch * p_.heads_kv * num_blocks_ * splits_;
    if (splits_ > 1) {
      partial_max_ = make_buffer<float>(num_tasks * rows_);
      partial_sum_ = make_buffer<float>(num_tasks * rows_);
      partial_acc_ = make_buffer<float>(num_tasks * rows_ * p_.head_dim);
    }
    run_tasks(
        num_tasks, [&] { return Worker(*this); },
        [&](int64_t task, Worker& worker) { run_task(task, worker); });
    if (splits_ > 1) combine_splits();
  }

 private:
  struct Worker {
    explicit Worker(const Forward& f) {
      const int64_t rows = f.rows_padded_, dh = f.p_.head_dim, dhp = f.head_dim_padded_;
      q = make_buffer<T>(rows * dhp, true);
      scores = make_buffer<float>(rows * kFwdLd, true);
      probs = make_buffer<T>(rows * kFwdLd, true);
      out_tile = make_buffer<float>(rows * dh);
      acc = make_buffer<float>(rows * dh);
      row_max = make_buffer<float>(f.rows_);
      row_sum = make_buffer<float>(f.rows_);
      alpha = make_buffer<float>(rows);
      row_of.resize(f.rows_);
      query_set.resize(f.block_q_);
      if (!f.prepack_) {
        key_tile = make_buffer<T>(dhp * kFwdLd, true);
        if constexpr (kPair<T> == 2) value_tile = make_buffer<T>((kFwdKeys + 2) * dh, true);
        if (f.direct_) scores_t = make_buffer<float>(kFwdKeys * rows, true);
      }
    }
    ~Worker() { release_gemm<T>(); }
    Worker(Worker&&) = default;
    Buffer<T> q, probs, key_tile, value_tile;
    Buffer<float> scores, scores_t, out_tile, acc, row_max, row_sum, alpha;
    std::vector<int64_t> row_of;     // gathered row -> block row (query * group + head)
    std::vector<uint8_t> query_set;  // block queries in the current gather
  };

  const T* q_ptr() const { return static_cast<const T*>(p_.q); }
  const T* k_ptr() const { return static_cast<const T*>(p_.k); }
  const T* v_ptr() const { return static_cast<const T*>(p_.v); }

  // K^T (and V as VNNI pairs for bfloat16) of every chunk some query of a batch entry sees, once.
  void pack_keys_values() {
    const int64_t dhp = head_dim_padded_, dh = p_.head_dim, len = p_.media_len;
    const int64_t heads = p_.batch * p_.heads_kv;
    key_pack_ = make_buffer<T>(heads * dhp * packed_len_);
    value_pack_ = make_buffer<T>(heads * packed_len_ * dh);
    std::vector<uint8_t> seen(static_cast<size_t>(p_.batch * p_.num_chunks), 0);
    for (int64_t b = 0; b < p_.batch; ++b) {
      for (int64_t t = 0; t < p_.query_len; ++t) {
        for (int64_t c = 0; c < p_.num_chunks; ++c) {
          seen[b * p_.num_chunks + c] |= visible_[(b * p_.query_len + t) * p_.num_chunks + c];
        }
      }
    }
    at::parallel_for(0, heads * p_.num_chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t bh = item / p_.num_chunks, c = item % p_.num_chunks;
        const int64_t b = bh / p_.heads_kv, h = bh % p_.heads_kv;
        if (!seen[b * p_.num_chunks + c]) continue;
        const T* k =
            k_ptr() + b * p_.k_stride_batch + c * len * p_.k_stride_token + h * p_.k_stride_head;
        pack_transposed(k, p_.k_stride_token, len, dh,
                        key_pack_.get() + bh * dhp * packed_len_ + c * packed_chunk_len_ * kPair<T>,
                        packed_len_);
        // V as VNNI row pairs (bfloat16) or dense rows (float32: q/k/v rows are often 4 KB apart,
        // which maps a GEMM's B block onto a few cache sets).
        const T* v =
            v_ptr() + b * p_.v_stride_batch + c * len * p_.v_stride_token + h * p_.v_stride_head;
        T* v_dst = value_pack_.get() + (bh * packed_len_ + c * packed_chunk_len_) * dh;
        if constexpr (kPair<T> == 2) {
          pack_row_pairs(v, p_.v_stride_token, len, dh, v_dst);
        } else {
          for (int64_t j = 0; j < len; ++j) {
            std::memcpy(v_dst + j * dh, v + j * p_.v_stride_token, sizeof(T) * dh);
          }
        }
      }
    });
  }

  // exp(scale * s - shift) into p (see exp_row), with the float32 -> bfloat16 conversion the CPU
  // has.
  float exp_probs(const float* s, int64_t n, float shift, T* p, float* top) const {
    return native_bf16() ? exp_row<true>(s, n, p_.scale, shift, p, top)
                         : exp_row<false>(s, n, p_.scale, shift, p, top);
  }

  // Gathers the block rows whose query sees chunk `chunk` into worker.q; returns the row count.
  int64_t gather_rows(const uint8_t* visible_block, int64_t queries, int64_t chunk, int64_t b,
                      int64_t t0, int64_t kv_head, Worker& w, bool& changed) const {
    bool same = true;
    for (int64_t i = 0; i < queries; ++i) {
      const uint8_t in = visible_block[i * p_.num_chunks + chunk];
      same &= in == w.query_set[i];
      w.query_set[i] = in;
    }
    changed = !same;
    int64_t rows = 0;
    for (int64_t i = 0; i < queries; ++i) rows += w.query_set[i] ? group_ : 0;
    if (same) return rows;
    const int64_t dh = p_.head_dim, dhp = head_dim_padded_;
    int64_t row = 0;
    for (int64_t i = 0; i < queries; ++i) {
      if (!w.query_set[i]) continue;
      const T* q = q_ptr() + b * p_.q_stride_batch + (t0 + i) * p_.q_stride_token +
                   kv_head * group_ * p_.q_stride_head;
      for (int64_t g = 0; g < group_; ++g, ++row) {
        w.row_of[row] = i * group_ + g;
        T* dst = w.q.get() + row * dhp;
        std::memcpy(dst, q + g * p_.q_stride_head, sizeof(T) * dh);
        if (dhp > dh) fill_zero(dst + dh, dhp - dh);
      }
    }
    const int64_t rows_padded = padded_rows(rows);
    fill_zero(w.q.get() + rows * dhp, (rows_padded - rows) * dhp);
    return rows;
  }

  void run_task(int64_t task, Worker& w) {
    const int64_t split = task % splits_;
    const int64_t block = (task / splits_) % num_blocks_;
    const int64_t kv_head = (task / splits_ / num_blocks_) % p_.heads_kv;
    const int64_t b = task / splits_ / num_blocks_ / p_.heads_kv;
    const int64_t t0 = block * block_q_;
    const int64_t queries = std::min(block_q_, p_.query_len - t0);
    const int64_t rows = queries * group_;
    const int64_t dh = p_.head_dim, dhp = head_dim_padded_;
    const uint8_t* visible_block = visible_.data() + (b * p_.query_len + t0) * p_.num_chunks;

    const std::vector<Tile> tiles =
        visible_tiles(visible_block, p_.num_chunks, 0, queries, p_.media_len, packed_chunk_len_,
                      kFwdKeys, can_merge());
    const int64_t tile_begin = static_cast<int64_t>(tiles.size()) * split / splits_;
    const int64_t tile_end = static_cast<int64_t>(tiles.size()) * (split + 1) / splits_;

    std::fill(w.row_max.get(), w.row_max.get() + rows, -kInf);
    std::fill(w.row_sum.get(), w.row_sum.get() + rows, 0.f);
    fill_zero(w.acc.get(), padded_rows(rows) * dh);
    std::fill(w.query_set.begin(), w.query_set.end(), uint8_t{0});

    const int64_t bh = b * p_.heads_kv + kv_head;
    const T* k_head = k_ptr() + b * p_.k_stride_batch + kv_head * p_.k_stride_head;
    const T* v_head = v_ptr() + b * p_.v_stride_batch + kv_head * p_.v_stride_head;
    int64_t gathered = 0;
    for (int64_t i = tile_begin; i < tile_end; ++i) {
      const Tile& tile = tiles[i];
      bool changed = false;
      gathered = gather_rows(visible_block, queries, tile.chunk, b, t0, kv_head, w, changed);
      if (gathered == 0) continue;
      const int64_t m = padded_rows(gathered), n = tile.keys;
      const int64_t n_pairs = round_up(n, kPair<T>);

      // scores[m][n] = Q K^T
      const T* values;
      int64_t ld_values;
      if (prepack_) {
        const T* keys = key_pack_.get() + bh * dhp * packed_len_ + tile.packed_begin * kPair<T>;
        gemm(m, n, dhp, dhp, packed_len_, kFwdLd, false, w.q.get(), keys, w.scores.get());
      } else if (direct_) {
        // S^T = K Q^T straight from k (its rows are the A operand), then transposed.
        if (changed || i == tile_begin)
          pack_transposed(w.q.get(), dhp, m, dhp, w.key_tile.get(), m);
        gemm(n, m, dhp, p_.k_stride_token, m, m, false, k_head + tile.key_begin * p_.k_stride_token,
             w.key_tile.get(), w.scores_t.get());
        for (int64_t r = 0; r < m; ++r) {
          float* dst = w.scores.get() + r * kFwdLd;
          for (int64_t j = 0; j < n; ++j) dst[j] = w.scores_t[j * m + r];
        }
      } else {
        pack_transposed(k_head + tile.key_begin * p_.k_stride_token, p_.k_stride_token, n, dh,
                        w.key_tile.get(), kFwdLd);
        gemm(m, n, dhp, dhp, kFwdLd, kFwdLd, false, w.q.get(), w.key_tile.get(), w.scores.get());
      }
      if (prepack_) {
        values = value_pack_.get() + (bh * packed_len_ + tile.packed_begin) * dh;
        ld_values = dh;
      } else if constexpr (kPair<T> == 1) {
        values = v_head + tile.key_begin * p_.v_stride_token;
        ld_values = p_.v_stride_token;
      } else {
        pack_row_pairs(v_head + tile.key_begin * p_.v_stride_token, p_.v_stride_token, n, dh,
                       w.value_tile.get());
        values = w.value_tile.get();
        ld_values = dh;
      }

      // Online softmax over the tile; probabilities in T for the second GEMM. The running max is
      // lazy: a row keeps its max while the tile's scores stay below max + kLazyRescale (base 2),
      // which saves the max pass and the rescale of the accumulator on most tiles.
      T* probs = w.probs.get();  // not in place: a rebased row reads its scores again
      bool rescale = false;
      for (int64_t r = 0; r < gathered; ++r) {
        const int64_t row = w.row_of[r];
        const float* s = w.scores.get() + r * kFwdLd;
        T* p = probs + r * kFwdLd;
        const float old_max = w.row_max[row];
        float new_max = old_max, alpha = 1.f, sum = 0.f, top = -kInf;
        if (old_max != -kInf) sum = exp_probs(s, n, old_max, p, &top);
        if (old_max == -kInf || top > kLazyRescale) {
          new_max = std::max(old_max, scaled_row_max(s, n, p_.scale));
          alpha = old_max == -kInf ? 1.f : std::exp(old_max - new_max);  // acc is 0 on first visit
          sum = exp_probs(s, n, new_max, p, nullptr);
          rescale |= alpha != 1.f;
        }
        if (n_pairs > n) p[n] = T(0);
        w.row_sum[row] = w.row_sum[row] * alpha + sum;
        w.row_max[row] = new_max;
        w.alpha[r] = alpha;
      }
      for (int64_t r = gathered; r < m; ++r) fill_zero(probs + r * kFwdLd, n_pairs);

      if (gathered == rows && !rescale) {
        // acc += P V straight into the accumulator (rows in block order, no rescale pending).
        gemm(m, dh, n_pairs, kFwdLd, ld_values, dh, true, probs, values, w.acc.get());
      } else {
        // out_tile[m][dh] = P V; acc = alpha * acc + out_tile
        gemm(m, dh, n_pairs, kFwdLd, ld_values, dh, false, probs, values, w.out_tile.get());
        for (int64_t r = 0; r < gathered; ++r) {
          scale_add(w.acc.get() + w.row_of[r] * dh, w.alpha[r], w.out_tile.get() + r * dh, dh);
        }
      }
    }

    if (splits_ == 1) {
      write_rows(b, t0, kv_head, rows, w.row_max.get(), w.row_sum.get(), w.acc.get());
    } else {
      std::memcpy(partial_max_.get() + task * rows_, w.row_max.get(), sizeof(float) * rows);
      std::memcpy(partial_sum_.get() + task * rows_, w.row_sum.get(), sizeof(float) * rows);
      std::memcpy(partial_acc_.get() + task * rows_ * dh, w.acc.get(), sizeof(float) * rows * dh);
    }
  }

  // out = acc / sum, lse = max + log(sum); rows that saw nothing: 0 and -inf. A NaN sum (a NaN or
  // an inf - inf among the row's visible scores) is not "nothing": it writes NaN, as SDPA does.
  void write_rows(int64_t b, int64_t t0, int64_t kv_head, int64_t rows, const float* row_max,
                  const float* row_sum, const float* acc) const {
    const int64_t dh = p_.head_dim;
    T* out = static_cast<T*>(p_.out);
    for (int64_t row = 0; row < rows; ++row) {
      const int64_t t = t0 + row / group_, h = kv_head * group_ + row % group_;
      T* dst = out + ((b * p_.query_len + t) * p_.heads_q + h) * dh;
      float* lse = p_.lse + (b * p_.heads_q + h) * p_.query_len + t;
      if (row_sum[row] != 0.f) {
        store_scaled(dst, acc + row * dh, 1.f / row_sum[row], dh);
        *lse = row_max[row] + std::log(row_sum[row]);
      } else {
        fill_zero(dst, dh);
        *lse = -kInf;
      }
    }
  }

  void combine_splits() {
    const int64_t dh = p_.head_dim;
    const int64_t blocks = p_.batch * p_.heads_kv * num_blocks_;
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> row_max(rows_), row_sum(rows_), acc(rows_ * dh), weight(splits_);
      for (int64_t block_task = begin; block_task < end; ++block_task) {
        const int64_t block = block_task % num_blocks_;
        const int64_t kv_head = (block_task / num_blocks_) % p_.heads_kv;
        const int64_t b = block_task / num_blocks_ / p_.heads_kv;
        const int64_t t0 = block * block_q_;
        const int64_t rows = std::min(block_q_, p_.query_len - t0) * group_;
        for (int64_t row = 0; row < rows; ++row) {
          float top = -kInf;
          bool poisoned = false;  // a split saw NaN: the row's output is NaN (write_rows)
          for (int64_t s = 0; s < splits_; ++s) {
            const int64_t task = block_task * splits_ + s;
            const float sum = partial_sum_[task * rows_ + row];
            poisoned |= std::isnan(sum);
            if (sum > 0.f) top = std::max(top, partial_max_[task * rows_ + row]);
          }
          if (poisoned) {
            row_max[row] = row_sum[row] = std::numeric_limits<float>::quiet_NaN();
            std::fill(acc.data() + row * dh, acc.data() + (row + 1) * dh, row_sum[row]);
            continue;
          }
          float total = 0.f;
          for (int64_t s = 0; s < splits_; ++s) {
            const int64_t task = block_task * splits_ + s;
            const float sum = partial_sum_[task * rows_ + row];
            weight[s] = sum > 0.f ? std::exp(partial_max_[task * rows_ + row] - top) : 0.f;
            total += weight[s] * sum;
          }
          float* dst = acc.data() + row * dh;
          std::fill(dst, dst + dh, 0.f);
          for (int64_t s = 0; s < splits_; ++s) {
            if (weight[s] == 0.f) continue;
            const int64_t task = block_task * splits_ + s;
            const float* src = partial_acc_.get() + (task * rows_ + row) * dh;
            for (int64_t d = 0; d < dh; ++d) dst[d] += weight[s] * src[d];
          }
          row_max[row] = top;
          row_sum[row] = total;
        }
        write_rows(b, t0, kv_head, rows, row_max.data(), row_sum.data(), acc.data());
      }
    });
  }

  // Whether consecutive chunks can share a tile: tiles packed per task always can; the shared
  // packed layout only when it has no padding between chunks.
  bool can_merge() const { return !prepack_ || packed_chunk_len_ == p_.media_len; }

  const ImageTextAttentionFwdParams& p_;
  int64_t group_, head_words_, head_dim_padded_, block_q_, num_blocks_, rows_, rows_padded_;
  int64_t packed_chunk_len_, packed_len_, splits_;
  bool prepack_, direct_;
  std::vector<uint8_t> visible_;
  Buffer<T> key_pack_, value_pack_;
  Buffer<float> partial_max_, partial_sum_, partial_acc_;
};

// ==== backward ===================================================================================

template <typename T>
class Backward {
 public:
  explicit Backward(const ImageTextAttentionBwdParams& p) : p_(p) {
    group_ = p.heads_q / p.heads_kv;
    head_dim_padded_ = round_up(p.head_dim, kPair<T>);
    rows_max_ = round_up(p.query_len * group_, kRowAlign);
    const int64_t threads = at::get_num_threads();
    const int64_t base_tasks = p.batch * p.heads_kv;
    splits_ = 1;
    if (base_tasks < 2 * threads) {
      splits_ = std::min(ceil_div(4 * threads, base_tasks),
                         std::max<int64_t>(1, ceil_div(p.num_chunks * p.media_len, kBwdKeys)));
    }
  }

  void run() {
    visible_ = effective_visibility(p_.media_mask, p_.mask_stride_batch, p_.mask_stride_query,
                                    p_.mask_stride_chunk, p_.batch, p_.query_len, p_.num_chunks,
                                    p_.empty_rows == EmptyRows::kUniform);
    if (splits_ > 1) {
      const int64_t dq_elems = p_.batch * p_.query_len * p_.heads_q * p_.head_dim;
      dq_acc_ = make_buffer<float>(splits_ * dq_elems);
    }
    // Tiles are packed per task, so chunks seen by the same queries always merge.
    tiles_.resize(p_.batch);
    at::parallel_for(0, p_.batch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        tiles_[b] = visible_tiles(visible_.data() + b * p_.query_len * p_.num_chunks, p_.num_chunks,
                                  0, p_.query_len, p_.media_len, p_.media_len, kBwdKeys, true);
      }
    });
    run_tasks(
        p_.batch * p_.heads_kv * splits_, [&] { return Worker(*this); },
        [&](int64_t task, Worker& worker) { run_task(task, worker); });
    if (splits_ > 1) sum_dq_splits();
  }

 private:
  struct Worker {
    explicit Worker(const Backward& f) {
      const int64_t rows = f.rows_max_, dh = f.p_.head_dim, dhp = f.head_dim_padded_;
      q = make_buffer<T>(rows * dhp, true);
      grad_out = make_buffer<T>(rows * dhp, true);
      q_t = make_buffer<T>(dh * rows, true);
      grad_out_t = make_buffer<T>(dh * rows, true);
      lse = make_buffer<float>(rows);
      delta = make_buffer<float>(rows);
      dq = make_buffer<float>(rows * dh, true);
      dq_task = make_buffer<float>(f.p_.query_len * f.group_ * dh);
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
      row_of.resize(rows);
    }
    ~Worker() { release_gemm<T>(); }
    Worker(Worker&&) = default;
    Buffer<T> q, grad_out, q_t, grad_out_t, probs_pairs, dscores, dscores_pairs, key_rows, key_t,
        value_t;
    Buffer<float> lse, delta, dq, dq_task, scores, dprobs, dk_t, dv_t;
    std::vector<int64_t> row_of;  // gathered row -> query * group + head in group
  };

  template <typename U>
  const U* ptr(const void* p) const {
    return static_cast<const U*>(p);
  }

  // Gathers every (query, head of kv_head's group) row whose query sees `chunk`; returns the count.
  int64_t gather_rows(int64_t b, int64_t kv_head, int64_t chunk, Worker& w) const {
    const int64_t dh = p_.head_dim, dhp = head_dim_padded_;
    const uint8_t* visible = visible_.data() + b * p_.query_len * p_.num_chunks;
    int64_t rows = 0;
    for (int64_t t = 0; t < p_.query_len; ++t) {
      if (!visible[t * p_.num_chunks + chunk]) continue;
      for (int64_t g = 0; g < group_; ++g) w.row_of[rows++] = t * group_ + g;
    }
    const int64_t rows_padded = round_up(rows, kRowAlign);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t t = w.row_of[r] / group_, h = kv_head * group_ + w.row_of[r] % group_;
      const T* q =
          ptr<T>(p_.q) + b * p_.q_stride_batch + t * p_.q_stride_token + h * p_.q_stride_head;
      const T* dout = ptr<T>(p_.grad_out) + b * p_.grad_out_stride_batch +
                      t * p_.grad_out_stride_token + h * p_.grad_out_stride_head;
      const T* out = ptr<T>(p_.out) + b * p_.out_stride_batch + t * p_.out_stride_token +
                     h * p_.out_stride_head;
      T* q_row = w.q.get() + r * dhp;
      T* dout_row = w.grad_out.get() + r * dhp;
      std::memcpy(q_row, q, sizeof(T) * dh);
      std::memcpy(dout_row, dout, sizeof(T) * dh);
      if (dhp > dh) {
        q_row[dh] = T(0);
        dout_row[dh] = T(0);
      }
      w.delta[r] = row_dot(dout, out, dh);
      w.lse[r] = p_.lse[(b * p_.heads_q + h) * p_.query_len + t];
    }
    for (int64_t r = rows; r < rows_padded; ++r) {
      fill_zero(w.q.get() + r * dhp, dhp);
      fill_zero(w.grad_out.get() + r * dhp, dhp);
      w.delta[r] = 0.f;
      w.lse[r] = kInf;  // P = exp(-inf) = 0 on padding rows
    }
    transpose_blocked(w.q.get(), dhp, rows_padded, dh, w.q_t.get(), rows_padded);
    transpose_blocked(w.grad_out.get(), dhp, rows_padded, dh, w.grad_out_t.get(), rows_padded);
    return rows;
  }

  // delta = rowsum(dO * out). float32: one sequential fused multiply-add chain, the order in which
  // the dP = dO V^T GEMM sums, so dP - delta cancels exactly where it should (a row that sees one
  // key has out = v, P = 1 and dS = 0).
  static float row_dot(const T* dout, const T* out, int64_t dh) {
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

  // The task's dQ rows += w.dq (gathered rows), then w.dq = 0.
  void flush_dq(int64_t rows, Worker& w) const {
    const int64_t dh = p_.head_dim;
    for (int64_t r = 0; r < rows; ++r) {
      scale_add(w.dq_task.get() + w.row_of[r] * dh, 1.f, w.dq.get() + r * dh, dh);
      fill_zero(w.dq.get() + r * dh, dh);
    }
  }

  // dq of the task's rows (all queries x the kv head's group): scale * dQ into grad_q, or the
  // unscaled partial into dq_acc_[split] when the keys are split.
  void write_dq(int64_t b, int64_t kv_head, int64_t split, const Worker& w) const {
    const int64_t dh = p_.head_dim;
    for (int64_t t = 0; t < p_.query_len; ++t) {
      const int64_t row = (b * p_.query_len + t) * p_.heads_q + kv_head * group_;
      const float* src = w.dq_task.get() + t * group_ * dh;
      if (splits_ == 1) {
        store_scaled(static_cast<T*>(p_.grad_q) + row * dh, src, p_.scale, group_ * dh);
      } else {
        const int64_t elems = p_.batch * p_.query_len * p_.heads_q * dh;
        std::memcpy(dq_acc_.get() + split * elems + row * dh, src, sizeof(float) * group_ * dh);
      }
    }
  }

  void run_task(int64_t task, Worker& w) {
    const int64_t split = task % splits_;
    const int64_t kv_head = (task / splits_) % p_.heads_kv;
    const int64_t b = task / splits_ / p_.heads_kv;
    const int64_t dh = p_.head_dim, dhp = head_dim_padded_;
    const std::vector<Tile>& tiles = tiles_[b];
    const int64_t tile_begin = static_cast<int64_t>(tiles.size()) * split / splits_;
    const int64_t tile_end = static_cast<int64_t>(tiles.size()) * (split + 1) / splits_;
    const T* k_head = ptr<T>(p_.k) + b * p_.k_stride_batch + kv_head * p_.k_stride_head;
    const T* v_head = ptr<T>(p_.v) + b * p_.v_stride_batch + kv_head * p_.v_stride_head;
    T* dk_head = static_cast<T*>(p_.grad_k) +
                 (b * p_.num_chunks * p_.media_len * p_.heads_kv + kv_head) * dh;
    T* dv_head = static_cast<T*>(p_.grad_v) +
                 (b * p_.num_chunks * p_.media_len * p_.heads_kv + kv_head) * dh;
    const int64_t dkv_stride = p_.heads_kv * dh;

    if (split == 0) zero_unseen_keys(tiles, dk_head, dv_head, dkv_stride);
    fill_zero(w.dq_task.get(), p_.query_len * group_ * dh);

    int64_t gathered = 0, gathered_chunk = -1;
    for (int64_t i = tile_begin; i < tile_end; ++i) {
      const Tile& tile = tiles[i];
      if (gathered_chunk < 0 || !same_rows(b, gathered_chunk, tile.chunk)) {
        if (gathered > 0) flush_dq(gathered, w);
        gathered = gather_rows(b, kv_head, tile.chunk, w);
      }
      gathered_chunk = tile.chunk;
      const int64_t rows_padded = round_up(gathered, kRowAlign);
      const int64_t n = tile.keys, n_pairs = round_up(n, kPair<T>);
      const T* keys = k_head + tile.key_begin * p_.k_stride_token;
      const T* values = v_head + tile.key_begin * p_.v_stride_token;
      pack_transposed(keys, p_.k_stride_token, n, dh, w.key_t.get(), kBwdLd);
      pack_transposed(values, p_.v_stride_token, n, dh, w.value_t.get(), kBwdLd);
      // K itself, the B operand of dQ = dS K: VNNI row pairs, or dense rows (float32 rows are often
      // 4 KB apart, which maps a GEMM's B block onto a few cache sets).
      if constexpr (kPair<T> == 2) {
        pack_row_pairs(keys, p_.k_stride_token, n, dh, w.key_rows.get());
      } else {
        for (int64_t j = 0; j < n; ++j) {
          std::memcpy(w.key_rows.get() + j * dh, keys + j * p_.k_stride_token, sizeof(T) * dh);
        }
      }
      bool first = true;
      for (int64_t r0 = 0; r0 < rows_padded; r0 += kBwdRows) {
        const int64_t m = std::min(kBwdRows, rows_padded - r0);
        gemm(m, n, dhp, dhp, kBwdLd, kBwdLd, false, w.q.get() + r0 * dhp, w.key_t.get(),
             w.scores.get());
        gemm(m, n, dhp, dhp, kBwdLd, kBwdLd, false, w.grad_out.get() + r0 * dhp, w.value_t.get(),
             w.dprobs.get());
        const T* probs_b;
        const T* dscores_a;
        const T* dscores_b;
        if constexpr (kPair<T> == 1) {
          softmax_grad_rows(w, r0, m, n);
          probs_b = w.scores.get();
          dscores_a = w.dprobs.get();
          dscores_b = w.dprobs.get();
        } else {
          if (native_bf16()) {
            softmax_grad_row_pairs<true>(w, r0, m, n, n_pairs);
          } else {
            softmax_grad_row_pairs<false>(w, r0, m, n, n_pairs);
          }
          probs_b = w.probs_pairs.get();
          dscores_a = w.dscores.get();
          dscores_b = w.dscores_pairs.get();
        }
        // dV^T[dh][n] += dO^T P, dK^T[dh][n] += Q^T dS, dQ[m][dh] += dS K
        gemm(dh, n, m, rows_padded, kBwdLd, kBwdLd, !first, w.grad_out_t.get() + r0, probs_b,
             w.dv_t.get());
        gemm(dh, n, m, rows_padded, kBwdLd, kBwdLd, !first, w.q_t.get() + r0, dscores_b,
             w.dk_t.get());
        gemm(m, dh, n_pairs, kBwdLd, dh, dh, true, dscores_a, w.key_rows.get(),
             w.dq.get() + r0 * dh);
        first = false;
      }
      write_key_grads(w, tile, n, dk_head, dv_head, dkv_stride);
    }
    if (gathered > 0) flush_dq(gathered, w);
    write_dq(b, kv_head, split, w);
  }

  bool same_rows(int64_t b, int64_t c0, int64_t c1) const {
    if (c0 == c1) return true;
    const uint8_t* visible = visible_.data() + b * p_.query_len * p_.num_chunks;
    for (int64_t t = 0; t < p_.query_len; ++t) {
      if (visible[t * p_.num_chunks + c0] != visible[t * p_.num_chunks + c1]) return false;
    }
    return true;
  }

  // float32: P = exp(scale S - lse) in place of S, dS = P (dP - delta) in place of dP.
  void softmax_grad_rows(Worker& w, int64_t r0, int64_t m, int64_t n) const {
    const Vec vscale(p_.scale * kLog2e);
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

  // bfloat16: the same, written as P and dS in VNNI row pairs (B operands) and dS plain (A
  // operand).
  template <bool kNative>
  void softmax_grad_row_pairs(Worker& w, int64_t r0, int64_t m, int64_t n, int64_t n_pairs) const {
    const Vec vscale(p_.scale * kLog2e);
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

  // dK = scale * (dK^T)^T and dV = (dV^T)^T for the tile's keys (this task owns them).
  void write_key_grads(const Worker& w, const Tile& tile, int64_t n, T* dk_head, T* dv_head,
                       int64_t stride) const {
    const int64_t dh = p_.head_dim;
    store_transposed(w.dk_t.get(), kBwdLd, dh, n, p_.scale, dk_head + tile.key_begin * stride,
                     stride);
    store_transposed(w.dv_t.get(), kBwdLd, dh, n, 1.f, dv_head + tile.key_begin * stride, stride);
  }

  // dK = dV = 0 on keys of chunks no query of this batch entry sees.
  void zero_unseen_keys(const std::vector<Tile>& tiles, T* dk_head, T* dv_head,
                        int64_t stride) const {
    const int64_t dh = p_.head_dim;
    const int64_t keys = p_.num_chunks * p_.media_len;
    int64_t key = 0;
    size_t next = 0;
    while (key < keys) {
      const int64_t end = next < tiles.size() ? tiles[next].key_begin : keys;
      for (; key < end; ++key) {
        fill_zero(dk_head + key * stride, dh);
        fill_zero(dv_head + key * stride, dh);
      }
      if (next < tiles.size()) key = tiles[next].key_begin + tiles[next].keys;
      ++next;
    }
  }

  // dq = scale * sum over key splits of dq_acc.
  void sum_dq_splits() {
    const int64_t dh = p_.head_dim;
    const int64_t rows = p_.batch * p_.query_len * p_.heads_q;
    T* dq = static_cast<T*>(p_.grad_q);
    at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
      std::vector<float> sum(dh);
      for (int64_t row = begin; row < end; ++row) {
        const float* src = dq_acc_.get() + row * dh;
        std::copy(src, src + dh, sum.begin());
        for (int64_t s = 1; s < splits_; ++s) scale_add(sum.data(), 1.f, src + s * rows * dh, dh);
        store_scaled(dq + row * dh, sum.data(), p_.scale, dh);
      }
    });
  }

  const ImageTextAttentionBwdParams& p_;
  int64_t group_, head_dim_padded_, rows_max_, splits_;
  std::vector<uint8_t> visible_;
  std::vector<std::vector<Tile>> tiles_;
  Buffer<float> dq_acc_;
};

// ---- empty_rows = "mean"
// -------------------------------------------------------------------------- A "mean" row's scores
// are all equal, so its softmax is uniform over the Lk keys whatever q and k are: its output is the
// mean of the values of its kv head and its gradient reaches v only. The attention kernels run such
// rows as "zero" rows (no visible key: out 0, dq 0, nothing to dk/dv); these passes then write the
// mean rows and add their dv term, per (batch, kv head), in float32.

// Whether row t of batch b sees no chunk (read from the caller's mask, not the effective one).
template <typename Params>
bool row_is_empty(const Params& p, int64_t b, int64_t t) {
  const uint8_t* row = p.media_mask + b * p.mask_stride_batch + t * p.mask_stride_query;
  for (int64_t c = 0; c < p.num_chunks; ++c) {
    if (row[c * p.mask_stride_chunk] != 0) return false;
  }
  return true;
}

// [B][Lq] 1 where the row sees no chunk; returns whether any row does.
template <typename Params>
bool empty_rows_of(const Params& p, std::vector<uint8_t>& empty) {
  empty.assign(static_cast<size_t>(p.batch * p.query_len), 0);
  std::atomic<bool> any{false};
  at::parallel_for(0, p.batch * p.query_len, 1024, [&](int64_t begin, int64_t end) {
    bool found = false;
    for (int64_t row = begin; row < end; ++row) {
      empty[row] = row_is_empty(p, row / p.query_len, row % p.query_len);
      found |= empty[row] != 0;
    }
    if (found) any.store(true, std::memory_order_relaxed);
  });
  return any.load();
}

// out[b, t, h] = mean_j v[b, j, h / group] and lse[b, h, t] = log(Lk) on the empty rows.
template <typename T>
void write_mean_rows(const ImageTextAttentionFwdParams& p) {
  std::vector<uint8_t> empty;
  if (!empty_rows_of(p, empty)) return;
  const int64_t dh = p.head_dim, keys = p.num_chunks * p.media_len, group = p.heads_q / p.heads_kv;
  const T* v = static_cast<const T*>(p.v);
  T* out = static_cast<T*>(p.out);
  const float lse_value = std::log(static_cast<float>(keys));
  at::parallel_for(0, p.batch * p.heads_kv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> mean(dh);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / p.heads_kv, hk = task % p.heads_kv;
      std::fill(mean.begin(), mean.end(), 0.f);
      const T* v_head = v + b * p.v_stride_batch + hk * p.v_stride_head;
      for (int64_t j = 0; j < keys; ++j) {
        const T* row = v_head + j * p.v_stride_token;
        for (int64_t d = 0; d < dh; ++d) mean[d] += static_cast<float>(row[d]);
      }
      for (int64_t d = 0; d < dh; ++d) mean[d] /= static_cast<float>(keys);
      for (int64_t t = 0; t < p.query_len; ++t) {
        if (!empty[b * p.query_len + t]) continue;
        for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
          T* dst = out + ((b * p.query_len + t) * p.heads_q + h) * dh;
          for (int64_t d = 0; d < dh; ++d) dst[d] = static_cast<T>(mean[d]);
          p.lse[(b * p.heads_q + h) * p.query_len + t] = lse_value;
        }
      }
    }
  });
}

// dv[b, j, hk] += (sum of grad_out over the empty rows of the query heads of hk) / Lk, every key j.
template <typename T>
void add_mean_rows_grad(const ImageTextAttentionBwdParams& p) {
  std::vector<uint8_t> empty;
  if (!empty_rows_of(p, empty)) return;
  const int64_t dh = p.head_dim, keys = p.num_chunks * p.media_len, group = p.heads_q / p.heads_kv;
  const T* grad_out = static_cast<const T*>(p.grad_out);
  T* dv = static_cast<T*>(p.grad_v);
  at::parallel_for(0, p.batch * p.heads_kv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> sum(dh);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / p.heads_kv, hk = task % p.heads_kv;
      std::fill(sum.begin(), sum.end(), 0.f);
      for (int64_t t = 0; t < p.query_len; ++t) {
        if (!empty[b * p.query_len + t]) continue;
        for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
          const T* row = grad_out + b * p.grad_out_stride_batch + t * p.grad_out_stride_token +
                         h * p.grad_out_stride_head;
          for (int64_t d = 0; d < dh; ++d) sum[d] += static_cast<float>(row[d]);
        }
      }
      for (int64_t d = 0; d < dh; ++d) sum[d] /= static_cast<float>(keys);
      T* dv_head = dv + (b * keys * p.heads_kv + hk) * dh;  // grad_v is contiguous
      for (int64_t j = 0; j < keys; ++j) {
        T* dst = dv_head + j * p.heads_kv * dh;
        for (int64_t d = 0; d < dh; ++d)
          dst[d] = static_cast<T>(static_cast<float>(dst[d]) + sum[d]);
      }
    }
  });
}

}  // namespace

bool image_text_attention_supported() {
#if VLMK_ITA_AVX512
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return true;
#endif
}

void image_text_attention_fwd(const ImageTextAttentionFwdParams& params) {
  const bool mean = params.empty_rows == EmptyRows::kMean;
  if (params.dtype == AttentionDtype::kBFloat16) {
    Forward<BFloat16>(params).run();
    if (mean) write_mean_rows<BFloat16>(params);
  } else {
    Forward<float>(params).run();
    if (mean) write_mean_rows<float>(params);
  }
}

void image_text_attention_bwd(const ImageTextAttentionBwdParams& params) {
  const bool mean = params.empty_rows == EmptyRows::kMean;
  if (params.dtype == AttentionDtype::kBFloat16) {
    Backward<BFloat16>(params).run();
    if (mean) add_mean_rows_grad<BFloat16>(params);
  } else {
    Backward<float>(params).run();
    if (mean) add_mean_rows_grad<float>(params);
  }
}

}  // namespace cpu
}  // namespace vlmk

#if VLMK_ITA_AVX512
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif
