// patch_embed on the CPU, forward and backward (semantics in cpu/patch_embed.h).
//
// Implicit GEMM. The B*Np patch rows are cut into blocks of at most kMaxBlockRows patches of one
// image (equal-sized blocks per image, so the rows of a block are consecutive rows of the output
// and of grad_out). GEMMs run on oneDNN's brgemm microkernel through at::native::cpublas::brgemm
// (AMX tiles for bfloat16 where the CPU has them, AVX-512 for float32), float32 accumulation.
//
// Forward: the weight is packed once per call as the B operand, W^T in blocks of
// kPatchEmbedWeightBlockN columns (pack_weight_blocked). Per block of patch rows: gather +
// normalize the block's patches into a per-thread A buffer [rows, Kp] (no unfolded copy of the
// image ever exists; pixels already in the GEMM's type and not normalized are copied), then for
// each tile of kTileN output columns C = A W^T (one brgemm per weight block) followed by the
// epilogue out = C + bias + pos, rounded once to the output dtype and written straight into
// out [B, N, D] (whole cache lines by non-temporal stores when the output is larger than
// kStreamOutputBytes). The block of an image's first patch writes the image's CLS row.
//
// Backward:
//   grad_pos (float32) = sum over images of grad_out, then grad_bias = its sum over patch tokens
//   (grad_cls is grad_pos[0], taken by the glue).
//   grad_weight^T [K, D] = sum over blocks X_blk^T dYp_blk. The K rows are split across threads in
//   whole (c, u) patch rows; each thread gathers only its slice of X^T per block and accumulates
//   over the blocks in order: no reduction across threads, so the bits do not depend on the thread
//   count. For bfloat16, dYp is packed once into VNNI pairs (the B operand layout).
//   grad_pixels: per block C = dYp W ([rows, K]), scaled by pixel_scale[c] and scattered to the
//   image (stride = kernel: every pixel belongs to exactly one patch).
#include "cpu/patch_embed.h"

#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "cpu/avx512_util.h"
#include "cpu/thread_scratch.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(VLMK_PE_PORTABLE)
// The extension is built for baseline x86-64; this file's kernels are built for AVX-512 and run
// only where cpu::avx512::supported() says so (elsewhere the glue runs the same source built again
// with its portable loops: cpu/patch_embed_portable.cpp). Every header is included above, so only
// this file's own functions are compiled for AVX-512.
#include <immintrin.h>
#define VLMK_PE_AVX512 1
#pragma GCC push_options
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC target("avx,avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq")
#else
#define VLMK_PE_AVX512 0
#endif

namespace vlmk {
namespace cpu {
namespace {

using at::BFloat16;
using at::Half;

// Patch rows per block at most (the K depth of the weight-gradient GEMM, the M of the others).
constexpr int64_t kMaxBlockRows = 256;
// Output columns per forward C tile: [rows, kTileN] float32 stays in L2 next to the A block and
// the weight (128 measured a little faster than 64, 256 and 512 at both ViT shapes, bfloat16).
constexpr int64_t kTileN = 128;
// Largest brgemm M and N per call (each distinct shape is JIT-compiled once and cached).
constexpr int64_t kGemmMaxM = 256;
constexpr int64_t kGemmMaxN = 512;
// float32 GEMMs run in K steps of 128 so the B rows of a step stay in L1/L2 across the M rows.
constexpr int64_t kFloatKStep = 128;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// Whether the GEMMs run as ATen mm calls over whole products (and the forward as one per block of
// patch rows over the whole D) rather than brgemm calls: float32 in the portable build. Without
// AVX-512, ATen's float32 brgemm is not oneDNN's microkernel but ATen's own fallback GEMM (29
// GFLOP/s at 32 x 64 x 512 on one Zen 3 core), and its many small calls ran the clip-vit-l14-336
// forward at 73% of torch.mm's GFLOP/s (Zen 3 EPYC, 2 threads) where ATen's mm (MKL) is ~100%.
template <typename T>
constexpr bool kBlockGemm = !VLMK_PE_AVX512 && std::is_same_v<T, float>;

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
Buffer<T> make_buffer(int64_t count) {
  const size_t bytes = static_cast<size_t>(round_up(std::max<int64_t>(count, 1) * sizeof(T), 64));
  void* ptr = std::aligned_alloc(64, bytes);
  TORCH_CHECK(ptr != nullptr, "patch_embed (cpu): out of memory allocating ", bytes, " bytes");
  return Buffer<T>(static_cast<T*>(ptr));
}

// ---- GEMM: C[M, N] (+)= A[M, K] B[K, N]; float32 C; bfloat16 B in VNNI layout [K / 2][ldb][2] ---

inline void brgemm_call(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc,
                        bool accumulate, const float* a, const float* b, float* c) {
  for (int64_t p = 0; p < k; p += kFloatKStep) {
    at::native::cpublas::brgemm(m, n, std::min(kFloatKStep, k - p), lda, ldb, ldc,
                                accumulate || p > 0, a + p, b + p * ldb, c, /*is_vnni=*/false);
  }
}
inline void brgemm_call(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc,
                        bool accumulate, const BFloat16* a, const BFloat16* b, float* c) {
  at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, accumulate, a, b, c, /*is_vnni=*/true);
}

// Any sizes (tiles M and N to the microkernel's sizes; K = 0 gives C = 0 or leaves it).
template <typename T>
void gemm(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc, bool accumulate,
          const T* a, const T* b, float* c) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    if (!accumulate) {
      for (int64_t i = 0; i < m; ++i) std::fill_n(c + i * ldc, n, 0.f);
    }
    return;
  }
  if constexpr (kBlockGemm<T>) {  // one ATen mm for the whole product (see kBlockGemm)
    at::Tensor c_t = at::from_blob(c, {m, n}, {ldc, 1}, at::kFloat);
    const at::Tensor a_t = at::from_blob(const_cast<T*>(a), {m, k}, {lda, 1}, at::kFloat);
    const at::Tensor b_t = at::from_blob(const_cast<T*>(b), {k, n}, {ldb, 1}, at::kFloat);
    accumulate ? c_t.addmm_(a_t, b_t) : at::mm_out(c_t, a_t, b_t);
    return;
  }
  for (int64_t m0 = 0; m0 < m; m0 += kGemmMaxM) {
    for (int64_t n0 = 0; n0 < n; n0 += kGemmMaxN) {
      brgemm_call(std::min(kGemmMaxM, m - m0), std::min(kGemmMaxN, n - n0), k, lda, ldb, ldc,
                  accumulate, a + m0 * lda, b + n0 * kPair<T>, c + m0 * ldc + n0);
    }
  }
}

// Releases the AMX tile state a bfloat16 brgemm configured on this thread.
template <typename T>
struct GemmScope {
  ~GemmScope() {
    if constexpr (!std::is_same_v<T, float>) at::native::cpublas::brgemm_release(/*is_vnni=*/true);
  }
};

// ---- blocks of patch rows -----------------------------------------------------------------------

struct RowBlock {
  int64_t image;  // b
  int64_t first;  // first patch index i of the block
  int64_t rows;   // patches in the block
};

// Each image's Np patches in ceil(Np / kMaxBlockRows) blocks of near-equal size (multiples of 16
// except the last), in (image, patch) order.
std::vector<RowBlock> row_blocks(int64_t batch, int64_t patches) {
  std::vector<RowBlock> blocks;
  if (patches == 0) return blocks;
  const int64_t per_image = ceil_div(patches, kMaxBlockRows);
  const int64_t rows = std::min(round_up(ceil_div(patches, per_image), 16), kMaxBlockRows);
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t first = 0; first < patches; first += rows) {
      blocks.push_back({b, first, std::min(rows, patches - first)});
    }
  }
  return blocks;
}

// ---- element conversions and the contiguous row loops ----------------------------------------

template <typename T>
inline float to_float(T value) {
  return static_cast<float>(value);
}
template <typename T>
inline T from_float(float value) {
  return static_cast<T>(value);
}

#if VLMK_PE_AVX512
using avx512::lanes;
inline __m512 load16(const float* ptr, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, ptr); }
inline __m512 load16(const BFloat16* ptr, __mmask16 mask) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, ptr));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
inline __m512 load16(const Half* ptr, __mmask16 mask) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, ptr));
}
inline __m512 load16(const uint8_t* ptr, __mmask16 mask) {
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mask, ptr)));
}
inline __m512 load16(const double* ptr, __mmask16 mask) {
  const __m256 low = _mm512_cvtpd_ps(_mm512_maskz_loadu_pd(static_cast<__mmask8>(mask), ptr));
  const __m256 high =
      _mm512_cvtpd_ps(_mm512_maskz_loadu_pd(static_cast<__mmask8>(mask >> 8), ptr + 8));
  return _mm512_insertf32x8(_mm512_castps256_ps512(low), high, 1);
}
inline void store16(float* ptr, __m512 value, __mmask16 mask) {
  _mm512_mask_storeu_ps(ptr, mask, value);
}
inline void store16(BFloat16* ptr, __m512 value, __mmask16 mask) {
  _mm256_mask_storeu_epi16(ptr, mask, avx512::bf16_bits(value));
}
inline void store16(Half* ptr, __m512 value, __mmask16 mask) {
  _mm256_mask_storeu_epi16(ptr, mask, avx512::half_bits(value));
}
// One whole 64-byte line of dst, written with a non-temporal store (dst 64-byte aligned).
inline void stream_line(float* dst, __m512 v0, __m512) { _mm512_stream_ps(dst, v0); }
inline void stream_line(BFloat16* dst, __m512 v0, __m512 v1) {
  _mm512_stream_si512(
      reinterpret_cast<__m512i*>(dst),
      _mm512_inserti64x4(_mm512_castsi256_si512(avx512::bf16_bits(v0)), avx512::bf16_bits(v1), 1));
}
inline void stream_line(Half* dst, __m512 v0, __m512 v1) {
  _mm512_stream_si512(
      reinterpret_cast<__m512i*>(dst),
      _mm512_inserti64x4(_mm512_castsi256_si512(avx512::half_bits(v0)), avx512::half_bits(v1), 1));
}
inline void store16(double* ptr, __m512 value, __mmask16 mask) {
  _mm512_mask_storeu_pd(ptr, static_cast<__mmask8>(mask),
                        _mm512_cvtps_pd(_mm512_castps512_ps256(value)));
  _mm512_mask_storeu_pd(ptr + 8, static_cast<__mmask8>(mask >> 8),
                        _mm512_cvtps_pd(_mm512_extractf32x8_ps(value, 1)));
}
#endif

// dst[j] = src[j] * scale + shift, j < n.
template <typename Src, typename Dst>
inline void scale_shift_row(const Src* src, float scale, float shift, int64_t n, Dst* dst) {
#if VLMK_PE_AVX512
  const __m512 scale_v = _mm512_set1_ps(scale), shift_v = _mm512_set1_ps(shift);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 mask = lanes(n - j);
    store16(dst + j, _mm512_fmadd_ps(load16(src + j, mask), scale_v, shift_v), mask);
  }
#else
  for (int64_t j = 0; j < n; ++j) dst[j] = from_float<Dst>(to_float(src[j]) * scale + shift);
#endif
}

// dst[j] = c[j] (+ bias[j]) (+ pos[j]), j < n; bias / pos may be nullptr.
template <typename Out>
inline void add_store_row(const float* c, const Out* bias, const Out* pos, int64_t n, Out* dst) {
#if VLMK_PE_AVX512
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 mask = lanes(n - j);
    __m512 value = _mm512_maskz_loadu_ps(mask, c + j);
    if (bias != nullptr) value = _mm512_add_ps(value, load16(bias + j, mask));
    if (pos != nullptr) value = _mm512_add_ps(value, load16(pos + j, mask));
    store16(dst + j, value, mask);
  }
#else
  for (int64_t j = 0; j < n; ++j) {
    float value = c[j];
    if (bias != nullptr) value += to_float(bias[j]);
    if (pos != nullptr) value += to_float(pos[j]);
    dst[j] = from_float<Out>(value);
  }
#endif
}

// add_store_row, with every whole 64-byte line of dst written by a non-temporal store: the
// forward's output is written once and not read back by this op, so its lines need not be read
// into the cache first (a regular store reads each line before writing it). Needs stream_fence()
// before another thread reads dst.
template <typename Out>
inline void add_stream_row(const float* c, const Out* bias, const Out* pos, int64_t n, Out* dst) {
#if VLMK_PE_AVX512
  constexpr int64_t kLine = 64 / sizeof(Out);
  if constexpr (std::is_same_v<Out, float> || std::is_same_v<Out, BFloat16> ||
                std::is_same_v<Out, Half>) {
    const int64_t misalign = (reinterpret_cast<uintptr_t>(dst) % 64) / sizeof(Out);
    const int64_t head = std::min(n, misalign == 0 ? 0 : kLine - misalign);
    if (reinterpret_cast<uintptr_t>(dst) % sizeof(Out) == 0) {
      add_store_row(c, bias, pos, head, dst);
      int64_t j = head;
      for (; j + kLine <= n; j += kLine) {
        __m512 v[2];
        for (int64_t h = 0; h < kLine / 16; ++h) {
          const int64_t o = j + 16 * h;
          v[h] = _mm512_loadu_ps(c + o);
          if (bias != nullptr) v[h] = _mm512_add_ps(v[h], load16(bias + o, 0xffff));
          if (pos != nullptr) v[h] = _mm512_add_ps(v[h], load16(pos + o, 0xffff));
        }
        stream_line(dst + j, v[0], v[kLine / 16 - 1]);
      }
      add_store_row(c + j, bias != nullptr ? bias + j : nullptr, pos != nullptr ? pos + j : nullptr,
                    n - j, dst + j);
      return;
    }
  }
#endif
  add_store_row(c, bias, pos, n, dst);
}

// dst[j] = src[j], j < n: masked vector moves inline (the gather copies rows of P = 8-16 values,
// where a call to memcpy cost more than the move).
template <typename T>
inline void copy_row(const T* src, int64_t n, T* dst) {
#if VLMK_PE_AVX512
  if constexpr (sizeof(T) == 2) {
    for (int64_t j = 0; j < n; j += 32) {
      const __mmask32 mask =
          n - j >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((uint32_t{1} << (n - j)) - 1u);
      _mm512_mask_storeu_epi16(dst + j, mask, _mm512_maskz_loadu_epi16(mask, src + j));
    }
    return;
  } else if constexpr (sizeof(T) == 4) {
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 mask = lanes(n - j);
      _mm512_mask_storeu_epi32(dst + j, mask, _mm512_maskz_loadu_epi32(mask, src + j));
    }
    return;
  }
#endif
  std::memcpy(dst, src, n * sizeof(T));
}

// dst[j] += src[j], j < n (float32 dst).
template <typename Src>
inline void accumulate_row(const Src* src, int64_t n, float* dst) {
#if VLMK_PE_AVX512
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 mask = lanes(n - j);
    _mm512_mask_storeu_ps(
        dst + j, mask, _mm512_add_ps(_mm512_maskz_loadu_ps(mask, dst + j), load16(src + j, mask)));
  }
#else
  for (int64_t j = 0; j < n; ++j) dst[j] += to_float(src[j]);
#endif
}

// Where the pixels of one patch come from.
template <typename Pixel>
struct PixelView {
  const Pixel* data;
  const float* scale;  // [C]
  const float* shift;  // [C]
  int64_t stride_batch, stride_channel, stride_row, stride_col;
  int64_t channels, patch, cols;  // cols = W / P

  // Pointer to pixel (b, c, P*r + u, P*s) of patch i = r * cols + s.
  const Pixel* patch_row(int64_t b, int64_t i, int64_t c, int64_t u) const {
    const int64_t r = i / cols, s = i % cols;
    return data + b * stride_batch + c * stride_channel + (patch * r + u) * stride_row +
           patch * s * stride_col;
  }
};

// Walks the patches first, first + 1, ... of one image, giving the pointer to pixel row (c, u) of
// each: no division per patch (the gathers call it per patch row of P pixels, where a 64-bit
// division would cost as much as the copy).
template <typename Pixel>
class PatchWalk {
 public:
  PatchWalk(const PixelView<Pixel>& view, int64_t b, int64_t first, int64_t c, int64_t u)
      : view_(view), ptr_(view.patch_row(b, first, c, u)), s_(first % view.cols) {}
  const Pixel* get() const { return ptr_; }
  void next() {
    if (++s_ < view_.cols) {
      ptr_ += view_.patch * view_.stride_col;
    } else {  // the first patch of the next patch row
      s_ = 0;
      ptr_ += view_.patch * (view_.stride_row - (view_.cols - 1) * view_.stride_col);
    }
  }

 private:
  const PixelView<Pixel>& view_;
  const Pixel* ptr_;
  int64_t s_;
};

// dst[v * dst_stride] = normalized pixel v of one P-wide patch row, v < P.
template <typename Pixel, typename T>
inline void load_patch_row(const Pixel* src, int64_t src_stride, float scale, float shift,
                           int64_t patch, T* dst, int64_t dst_stride) {
  if (src_stride == 1 && dst_stride == 1) {
    scale_shift_row(src, scale, shift, patch, dst);
  } else {
    for (int64_t v = 0; v < patch; ++v) {
      dst[v * dst_stride] = from_float<T>(to_float(src[v * src_stride]) * scale + shift);
    }
  }
}

// A block of the forward: a[row][k] = X[b, first + row, k] for k < K, 0 for K <= k < lda.
// The pixel row (c, u) is the outer loop: consecutive patches of a patch row then read one image
// row front to back, a stream the hardware prefetcher follows. (Patch-major order read C * P
// short segments of different image rows per patch: the first touch of every line was a cache
// miss, measured as half of the bfloat16 forward's time.)
template <typename Pixel, typename T>
void gather_patches(const PixelView<Pixel>& view, const RowBlock& block, T* a, int64_t lda) {
  const int64_t patch = view.patch, k_size = view.channels * patch * patch;
  for (int64_t c = 0; c < view.channels; ++c) {
    for (int64_t u = 0; u < patch; ++u) {
      PatchWalk<Pixel> walk(view, block.image, block.first, c, u);
      T* dst = a + (c * patch + u) * patch;
      // Pixels already in the GEMM's type and not normalized: a plain copy (bit for bit, where
      // x * 1 + 0 would turn -0 into +0).
      bool copy = false;
      if constexpr (std::is_same_v<Pixel, T>) {
        copy = view.stride_col == 1 && view.scale[c] == 1.f && view.shift[c] == 0.f;
      }
      for (int64_t row = 0; row < block.rows; ++row, walk.next(), dst += lda) {
        if constexpr (std::is_same_v<Pixel, T>) {
          if (copy) {
            copy_row(walk.get(), patch, dst);
            continue;
          }
        }
        load_patch_row(walk.get(), view.stride_col, view.scale[c], view.shift[c], patch, dst, 1);
      }
    }
  }
  for (int64_t row = 0; row < block.rows; ++row) {
    std::fill(a + row * lda + k_size, a + (row + 1) * lda, from_float<T>(0.f));
  }
}

// A block of the weight gradient, transposed and restricted to the patch rows (c, u) = unit in
// [unit_begin, unit_end): a[(unit - unit_begin) * P + v][row] = X[b, first + row, unit * P + v];
// rows from block.rows to lda are 0.
template <typename Pixel, typename T>
void gather_patches_t(const PixelView<Pixel>& view, const RowBlock& block, int64_t unit_begin,
                      int64_t unit_end, T* a, int64_t lda) {
  const int64_t patch = view.patch;
  // Pixel row outer, patches inner: image rows read front to back (see gather_patches).
  for (int64_t unit = unit_begin; unit < unit_end; ++unit) {
    const int64_t c = unit / patch, u = unit % patch;
    PatchWalk<Pixel> walk(view, block.image, block.first, c, u);
    for (int64_t row = 0; row < block.rows; ++row, walk.next()) {
      load_patch_row(walk.get(), view.stride_col, view.scale[c], view.shift[c], patch,
                     a + (unit - unit_begin) * patch * lda + row, lda);
    }
  }
  if (block.rows < lda) {
    for (int64_t k = 0; k < (unit_end - unit_begin) * patch; ++k) {
      std::fill(a + k * lda + block.rows, a + (k + 1) * lda, from_float<T>(0.f));
    }
  }
}

// ---- forward ------------------------------------------------------------------------------------

// The forward's B operand from the weight W [D, K] (row-major, Out): W^T in blocks of
// kPatchEmbedWeightBlockN columns, [Dp / nb][Kp / pair][nb][pair] in T (pair = kPair<T>), zeros in
// the padding (D to a multiple of nb, K to Kp). Packed here rather than by ATen ops in the glue:
// a permute with an inner dimension of 2 ran at ~570 us per call for a 1024 x 588 weight, as
// much as a tenth of the bfloat16 forward.
template <typename Out, typename T>
void pack_weight_blocked(const Out* w, int64_t d, int64_t k, int64_t k_padded, T* dst) {
  constexpr int64_t nb = kPatchEmbedWeightBlockN, pair = kPair<T>;
  // A value moves as part of a 32-bit word (a VNNI pair, or one float) when the types agree.
  constexpr bool kWords = std::is_same_v<Out, T> && sizeof(T) * pair == sizeof(uint32_t);
  // Words per step of the transpose: 16 rows of W read one cache line each and 16 rows of the
  // block written one line each, so both sides stay in L1 (a column at a time touched a new line
  // per value of a 78 KiB block: 6% of the bfloat16 forward).
  constexpr int64_t kStep = 16;
  at::parallel_for(0, ceil_div(d, nb), 1, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      T* block = dst + j * k_padded * nb;
      const int64_t rows = std::min(nb, d - j * nb);  // weight rows of this block; the rest pad
      int64_t kk = 0;
      if (kWords && k % pair == 0) {
        uint32_t* words = reinterpret_cast<uint32_t*>(block);
        const int64_t k_words = k / pair;
        for (int64_t w0 = 0; w0 < k_words; w0 += kStep) {
          const int64_t w_end = std::min(w0 + kStep, k_words);
          for (int64_t col = 0; col < rows; ++col) {
            const Out* src = w + (j * nb + col) * k;
            for (int64_t word = w0; word < w_end; ++word) {
              std::memcpy(&words[word * nb + col], src + word * pair, sizeof(uint32_t));
            }
          }
        }
      } else {
        for (int64_t col = 0; col < rows; ++col) {
          const Out* src = w + (j * nb + col) * k;
          for (int64_t i = 0; i < k; ++i) {
            block[(i / pair * nb + col) * pair + i % pair] = from_float<T>(to_float(src[i]));
          }
        }
      }
      kk = k;
      // Zero: K padding of the real rows, and every value of the padding rows.
      for (int64_t col = 0; col < nb; ++col) {
        for (int64_t i = col < rows ? kk : 0; i < k_padded; ++i) {
          block[(i / pair * nb + col) * pair + i % pair] = from_float<T>(0.f);
        }
      }
    }
  });
}

#if VLMK_PE_AVX512
// add_store_row / add_stream_row for bfloat16 on a CPU with AVX512-BF16: 32 values per
// vcvtne2ps2bf16 (round to nearest even, NaN kept; like oneDNN's bfloat16 outputs, float32
// denormals read and written as zero) instead of ~10 integer ops per 16 values. The c + pos loads
// and the output stores dominate the epilogue, so the gain is small: 1-4% of the bf16 forward.
VLMK_AVX512_BF16_FN inline __m512 epilogue16(const float* c, const BFloat16* bias,
                                             const BFloat16* pos, int64_t j, __mmask16 mask) {
  __m512 value = _mm512_maskz_loadu_ps(mask, c + j);
  if (bias != nullptr) value = _mm512_add_ps(value, load16(bias + j, mask));
  if (pos != nullptr) value = _mm512_add_ps(value, load16(pos + j, mask));
  return value;
}

VLMK_AVX512_BF16_FN void add_store_row_bf16(const float* c, const BFloat16* bias,
                                            const BFloat16* pos, int64_t n, BFloat16* dst,
                                            bool stream) {
  int64_t j = 0;
  // Values before dst's first whole line go first, masked (up to 31 of them).
  int64_t head = 0;
  if (stream) {
    const int64_t misalign = (reinterpret_cast<uintptr_t>(dst) % 64) / sizeof(BFloat16);
    head = std::min(n, misalign == 0 ? int64_t{0} : 32 - misalign);
  }
  for (; j < n; j += 32) {
    const int64_t count = std::min<int64_t>(32, (j < head ? head : n) - j);
    if (count == 32) {
      const __m512i line = (__m512i)_mm512_cvtne2ps_pbh(epilogue16(c, bias, pos, j + 16, 0xffff),
                                                        epilogue16(c, bias, pos, j, 0xffff));
      if (stream) {
        _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + j), line);
      } else {
        _mm512_storeu_si512(dst + j, line);
      }
      continue;
    }
    for (int64_t h = 0; h < count; h += 16) {  // a head or a tail: 16 at a time, masked
      const __mmask16 mask = lanes(count - h);
      _mm256_mask_storeu_epi16(dst + j + h, mask,
                               (__m256i)_mm512_cvtneps_pbh(epilogue16(c, bias, pos, j + h, mask)));
    }
    j += count - 32;  // the next line starts right after this head
  }
}
#endif

// out[row][j] = c[row][j] + bias[j] + pos[row][j] for a tile of rows x cols (pointers at the tile),
// whole lines of out by non-temporal stores when `stream`.
template <typename Out>
void store_tile(const float* c, int64_t ldc, int64_t rows, int64_t cols, const Out* bias,
                const Out* pos, Out* out, int64_t ld, bool stream) {
#if VLMK_PE_AVX512
  if constexpr (std::is_same_v<Out, BFloat16>) {
    if (avx512::bf16_supported()) {
      for (int64_t row = 0; row < rows; ++row) {
        add_store_row_bf16(c + row * ldc, bias, pos != nullptr ? pos + row * ld : nullptr, cols,
                           out + row * ld, stream);
      }
      return;
    }
  }
#endif
  for (int64_t row = 0; row < rows; ++row) {
    const Out* pos_row = pos != nullptr ? pos + row * ld : nullptr;
    if (stream) {
      add_stream_row(c + row * ldc, bias, pos_row, cols, out + row * ld);
    } else {
      add_store_row(c + row * ldc, bias, pos_row, cols, out + row * ld);
    }
  }
}

template <typename Pixel, typename T, typename Out>
void forward(const PatchEmbedFwdParams& p) {
  const int64_t patch = p.patch, dim = p.dim, cols = p.width / patch;
  const int64_t patches = (p.height / patch) * cols;
  const int64_t k_size = p.channels * patch * patch;
  const int64_t k_padded =
      std::is_same_v<T, float> ? k_size : round_up(k_size, kPatchEmbedBf16KAlign);
  const int64_t offset = p.cls_token != nullptr ? 1 : 0, tokens = patches + offset;
  const PixelView<Pixel> view{static_cast<const Pixel*>(p.pixels),
                              p.pixel_scale,
                              p.pixel_shift,
                              p.pixel_stride_batch,
                              p.pixel_stride_channel,
                              p.pixel_stride_row,
                              p.pixel_stride_col,
                              p.channels,
                              patch,
                              cols};
  const Out* bias = static_cast<const Out*>(p.bias);
  const Out* cls = static_cast<const Out*>(p.cls_token);
  const Out* pos = static_cast<const Out*>(p.pos_embed);
  Out* out = static_cast<Out*>(p.out);

  if (cls != nullptr) {  // out[b, 0] = cls + pos[0]
    Buffer<float> zeros = make_buffer<float>(dim);
    std::fill_n(zeros.get(), dim, 0.f);
    for (int64_t b = 0; b < p.batch; ++b) {
      add_store_row(zeros.get(), cls, pos, dim, out + b * tokens * dim);
    }
  }
  const std::vector<RowBlock> blocks = row_blocks(p.batch, patches);
  if (blocks.empty()) return;
  const int64_t max_rows = blocks.front().rows;
  // Outputs larger than a core's L2 leave it before the next op reads them anyway: write their
  // lines without reading them first (measured 6-8% faster at the ViT shapes, float32 and
  // bfloat16, one thread, with a layer_norm after it no slower).
  const bool stream =
      p.batch * tokens * dim * static_cast<int64_t>(sizeof(Out)) >= kStreamOutputBytes;
  if constexpr (kBlockGemm<T>) {
    // One BLAS GEMM per block over the whole D: C [rows, D] = A W^T, W read where it lies (a
    // float32 copy for 16-bit weights), then the epilogue.
    const float* weight = static_cast<const float*>(p.weight);
    if constexpr (!std::is_same_v<Out, float>) {
      float* converted = thread_scratch<float>(ScratchSlot::kA, dim * k_size);
      const Out* w = static_cast<const Out*>(p.weight);
      at::parallel_for(0, dim, 16, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin * k_size; i < end * k_size; ++i) converted[i] = to_float(w[i]);
      });
      weight = converted;
    }
    at::parallel_for(0, static_cast<int64_t>(blocks.size()), 1, [&](int64_t begin, int64_t end) {
      float* a = thread_scratch<float>(ScratchSlot::kB, max_rows * k_size);
      float* c = thread_scratch<float>(ScratchSlot::kC, max_rows * dim);
      for (int64_t index = begin; index < end; ++index) {
        const RowBlock& block = blocks[index];
        gather_patches(view, block, a, k_size);
        // ATen's mm on the scratch (MKL's sgemm; one thread inside this parallel region).
        at::Tensor c_rows = at::from_blob(c, {block.rows, dim}, at::kFloat);
        at::mm_out(c_rows, at::from_blob(a, {block.rows, k_size}, at::kFloat),
                   at::from_blob(const_cast<float*>(weight), {dim, k_size}, at::kFloat).t());
        const int64_t token = offset + block.first;
        store_tile(c, dim, block.rows, dim, bias, pos != nullptr ? pos + token * dim : nullptr,
                   out + (block.image * tokens + token) * dim, dim, stream);
      }
    });
    return;
  }
  const int64_t dim_padded = round_up(dim, kPatchEmbedWeightBlockN);
  T* weight_buffer = thread_scratch<T>(ScratchSlot::kA, dim_padded * k_padded);
  pack_weight_blocked(static_cast<const Out*>(p.weight), dim, k_size, k_padded, weight_buffer);
  const T* weight = weight_buffer;
  at::parallel_for(0, static_cast<int64_t>(blocks.size()), 1, [&](int64_t begin, int64_t end) {
    GemmScope<T> scope;
    T* a = thread_scratch<T>(ScratchSlot::kB, max_rows * k_padded);
    float* c = thread_scratch<float>(ScratchSlot::kC, max_rows * kTileN);
    for (int64_t index = begin; index < end; ++index) {
      const RowBlock& block = blocks[index];
      gather_patches(view, block, a, k_padded);
      const int64_t token = offset + block.first;
      Out* out_rows = out + (block.image * tokens + token) * dim;
      const Out* pos_rows = pos != nullptr ? pos + token * dim : nullptr;
      for (int64_t n0 = 0; n0 < dim; n0 += kTileN) {
        const int64_t tile = std::min(kTileN, dim - n0);
        // One call per packed block of columns (its rows are nb values apart).
        for (int64_t j = 0; j < tile; j += kPatchEmbedWeightBlockN) {
          gemm(block.rows, kPatchEmbedWeightBlockN, k_padded, k_padded, kPatchEmbedWeightBlockN,
               kTileN, false, a, weight + (n0 + j) * k_padded, c + j);
        }
        store_tile(c, kTileN, block.rows, tile, bias != nullptr ? bias + n0 : nullptr,
                   pos_rows != nullptr ? pos_rows + n0 : nullptr, out_rows + n0, dim, stream);
      }
    }
#if VLMK_PE_AVX512
    stream_fence();  // the streamed lines are visible to other threads after this
#endif
  });
}

// ---- backward -----------------------------------------------------------------------------------

template <typename Out>
void position_and_bias_gradients(const PatchEmbedBwdParams& p, int64_t tokens) {
  const Out* grad_out = static_cast<const Out*>(p.grad_out);
  const int64_t dim = p.dim, offset = p.has_cls ? 1 : 0;
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      float* dst = p.grad_pos + t * dim;
      std::fill_n(dst, dim, 0.f);
      for (int64_t b = 0; b < p.batch; ++b) {
        accumulate_row(grad_out + (b * tokens + t) * dim, dim, dst);
      }
    }
  });
  // Column chunks of 64 so each thread sums whole columns in token order (deterministic).
  at::parallel_for(0, ceil_div(dim, 64), 1, [&](int64_t begin, int64_t end) {
    const int64_t j0 = begin * 64, j1 = std::min(end * 64, dim);
    std::fill(p.grad_bias + j0, p.grad_bias + j1, 0.f);
    for (int64_t t = offset; t < tokens; ++t)
      accumulate_row(p.grad_pos + t * dim + j0, j1 - j0, p.grad_bias + j0);
  });
}

// The patch rows of grad_out as bfloat16 VNNI B operands, one [rows_padded / 2][D][2] slab per
// block (padded rows 0).
Buffer<BFloat16> pack_grad_rows_vnni(const BFloat16* grad_out, const std::vector<RowBlock>& blocks,
                                     int64_t slab_rows, int64_t tokens, int64_t offset,
                                     int64_t dim) {
  Buffer<BFloat16> packed = make_buffer<BFloat16>(blocks.size() * slab_rows * dim);
  at::parallel_for(0, static_cast<int64_t>(blocks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t index = begin; index < end; ++index) {
      const RowBlock& block = blocks[index];
      const BFloat16* src = grad_out + (block.image * tokens + offset + block.first) * dim;
      BFloat16* dst = packed.get() + index * slab_rows * dim;
      for (int64_t row = 0; row < round_up(block.rows, 2); row += 2) {
        const BFloat16* row0 = src + row * dim;
        const BFloat16* row1 = row0 + dim;
        BFloat16* pairs = dst + row * dim;
        const bool has_second = row + 1 < block.rows;
        for (int64_t j = 0; j < dim; ++j) {
          pairs[2 * j] = row0[j];
          pairs[2 * j + 1] = has_second ? row1[j] : BFloat16(0.f);
        }
      }
    }
  });
  return packed;
}

template <typename Pixel, typename T>
void weight_gradient(const PatchEmbedBwdParams& p, const PixelView<Pixel>& view,
                     const std::vector<RowBlock>& blocks, int64_t tokens) {
  const int64_t patch = p.patch, dim = p.dim, offset = p.has_cls ? 1 : 0;
  const int64_t units = p.channels * patch;  // (c, u) patch rows: P consecutive k each
  const T* grad_out = static_cast<const T*>(p.grad_out);
  if (blocks.empty() || units == 0 || dim == 0) {
    std::fill_n(p.grad_weight_t, units * patch * dim, 0.f);
    return;
  }
  const int64_t slab_rows = round_up(blocks.front().rows, kPair<T>);
  Buffer<BFloat16> packed;
  if constexpr (!std::is_same_v<T, float>) {
    packed = pack_grad_rows_vnni(grad_out, blocks, slab_rows, tokens, offset, dim);
  }
  at::parallel_for(0, units, 1, [&](int64_t unit_begin, int64_t unit_end) {
    GemmScope<T> scope;
    const int64_t k_rows = (unit_end - unit_begin) * patch;
    Buffer<T> a = make_buffer<T>(k_rows * slab_rows);
    float* c = p.grad_weight_t + unit_begin * patch * dim;
    for (size_t index = 0; index < blocks.size(); ++index) {
      const RowBlock& block = blocks[index];
      gather_patches_t(view, block, unit_begin, unit_end, a.get(), slab_rows);
      const T* b;
      if constexpr (std::is_same_v<T, float>) {
        b = grad_out + (block.image * tokens + offset + block.first) * dim;
      } else {
        b = packed.get() + index * slab_rows * dim;
      }
      gemm(k_rows, dim, round_up(block.rows, kPair<T>), slab_rows, dim, dim, index > 0, a.get(), b,
           c);
    }
  });
}

template <typename Pixel, typename T>
void pixel_gradient(const PatchEmbedBwdParams& p, const std::vector<RowBlock>& blocks,
                    int64_t tokens) {
  const int64_t patch = p.patch, dim = p.dim, cols = p.width / patch, channels = p.channels;
  const int64_t k_size = channels * patch * patch, dim_padded = round_up(dim, kPair<T>);
  const int64_t offset = p.has_cls ? 1 : 0;
  const T* grad_out = static_cast<const T*>(p.grad_out);
  const T* weight = static_cast<const T*>(p.weight_packed);
  Pixel* grad_pixels = static_cast<Pixel*>(p.grad_pixels);
  const int64_t plane = p.height * p.width;
  if (blocks.empty()) return;
  const int64_t max_rows = blocks.front().rows;
  // grad_out rows are the A operand as they are, unless they need a zero pad column (odd D with
  // bfloat16 pairs).
  const bool copy_rows = dim_padded != dim;
  at::parallel_for(0, static_cast<int64_t>(blocks.size()), 1, [&](int64_t begin, int64_t end) {
    GemmScope<T> scope;
    Buffer<float> c = make_buffer<float>(max_rows * k_size);
    Buffer<T> a = make_buffer<T>(copy_rows ? max_rows * dim_padded : 0);
    for (int64_t index = begin; index < end; ++index) {
      const RowBlock& block = blocks[index];
      const T* rows = grad_out + (block.image * tokens + offset + block.first) * dim;
      const T* a_rows;
      int64_t lda = dim;
      if (copy_rows) {
        for (int64_t row = 0; row < block.rows; ++row) {
          T* dst = a.get() + row * dim_padded;
          for (int64_t j = 0; j < dim; ++j) dst[j] = from_float<T>(to_float(rows[row * dim + j]));
          std::fill(dst + dim, dst + dim_padded, from_float<T>(0.f));
        }
        a_rows = a.get();
        lda = dim_padded;
      } else {
        a_rows = rows;
      }
      gemm(block.rows, k_size, dim_padded, lda, k_size, k_size, false, a_rows, weight, c.get());
      for (int64_t row = 0; row < block.rows; ++row) {
        const int64_t i = block.first + row, r = i / cols, s = i % cols;
        for (int64_t ch = 0; ch < channels; ++ch) {
          const float scale = p.pixel_scale[ch];
          for (int64_t u = 0; u < patch; ++u) {
            const float* src = c.get() + row * k_size + (ch * patch + u) * patch;
            Pixel* dst = grad_pixels + (block.image * channels + ch) * plane +
                         (patch * r + u) * p.width + patch * s;
            scale_shift_row(src, scale, 0.f, patch, dst);
          }
        }
      }
    }
  });
}

template <typename Pixel, typename T>
void backward(const PatchEmbedBwdParams& p) {
  const int64_t patch = p.patch, cols = p.width / patch;
  const int64_t patches = (p.height / patch) * cols, tokens = patches + (p.has_cls ? 1 : 0);
  position_and_bias_gradients<T>(p, tokens);
  const PixelView<Pixel> view{static_cast<const Pixel*>(p.pixels),
                              p.pixel_scale,
                              p.pixel_shift,
                              p.pixel_stride_batch,
                              p.pixel_stride_channel,
                              p.pixel_stride_row,
                              p.pixel_stride_col,
                              p.channels,
                              patch,
                              cols};
  const std::vector<RowBlock> blocks = row_blocks(p.batch, patches);
  weight_gradient<Pixel, T>(p, view, blocks, tokens);
  if (p.grad_pixels != nullptr) {
    if constexpr (std::is_same_v<Pixel, uint8_t>) {
      TORCH_CHECK(false, "patch_embed (cpu): uint8 pixels have no gradient");
    } else {
      pixel_gradient<Pixel, T>(p, blocks, tokens);
    }
  }
}

// ---- dtype dispatch -----------------------------------------------------------------------------

template <template <typename, typename, typename> class Fn, typename Params>
void dispatch(const Params& p) {
  auto with_out = [&](auto pixel_tag, auto compute_tag) {
    using Pixel = decltype(pixel_tag);
    using T = decltype(compute_tag);
    switch (p.out_type) {
      case PatchEmbedType::kFloat32:
        if constexpr (std::is_same_v<T, float>) return Fn<Pixel, T, float>::run(p);
        break;
      case PatchEmbedType::kBFloat16:
        return Fn<Pixel, T, BFloat16>::run(p);
      case PatchEmbedType::kFloat16:
        if constexpr (std::is_same_v<T, float>) return Fn<Pixel, T, Half>::run(p);
        break;
      default:
        break;
    }
    TORCH_CHECK(false, "patch_embed (cpu): unsupported output / compute dtype pair ",
                static_cast<int>(p.out_type), " / ", static_cast<int>(p.compute_type));
  };
  auto with_compute = [&](auto pixel_tag) {
    if (p.compute_type == PatchEmbedType::kBFloat16) return with_out(pixel_tag, BFloat16{});
    TORCH_CHECK(p.compute_type == PatchEmbedType::kFloat32,
                "patch_embed (cpu): compute dtype must be float32 or bfloat16");
    return with_out(pixel_tag, float{});
  };
  switch (p.pixel_type) {
    case PatchEmbedType::kUInt8:
      return with_compute(uint8_t{});
    case PatchEmbedType::kFloat32:
      return with_compute(float{});
    case PatchEmbedType::kBFloat16:
      return with_compute(BFloat16{});
    case PatchEmbedType::kFloat16:
      return with_compute(Half{});
    case PatchEmbedType::kFloat64:
      return with_compute(double{});
  }
  TORCH_CHECK(false, "patch_embed (cpu): unsupported pixel dtype ", static_cast<int>(p.pixel_type));
}

template <typename Pixel, typename T, typename Out>
struct Forward {
  static void run(const PatchEmbedFwdParams& p) { forward<Pixel, T, Out>(p); }
};
// The backward reads grad_out as its GEMM operands: the glue passes it in the compute dtype.
template <typename Pixel, typename T, typename Out>
struct Backward {
  static void run(const PatchEmbedBwdParams& p) {
    if constexpr (std::is_same_v<T, Out>) {
      backward<Pixel, T>(p);
    } else {
      TORCH_CHECK(false, "patch_embed (cpu): the backward takes grad_out in the compute dtype");
    }
  }
};

}  // namespace

#if defined(VLMK_PE_PORTABLE)
void patch_embed_fwd_portable(const PatchEmbedFwdParams& params) { dispatch<Forward>(params); }
void patch_embed_bwd_portable(const PatchEmbedBwdParams& params) { dispatch<Backward>(params); }
#else
void patch_embed_fwd(const PatchEmbedFwdParams& params) { dispatch<Forward>(params); }
void patch_embed_bwd(const PatchEmbedBwdParams& params) { dispatch<Backward>(params); }
#endif

}  // namespace cpu
}  // namespace vlmk

#if VLMK_PE_AVX512
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif
