// concat_project on the CPU, forward and backward, with no concatenated buffer: every product is a
// GEMM of one source with the weight's column block of that source, read where they lie (a row
// stride per source, the weight's row stride for a column block). With X_l [M, D_l] and
// c_l = D_0 + ... + D_{l-1}:
//
//   out[M, N]               = sum_l X_l @ W[:, c_l : c_l + D_l]^T + bias
//   dX_l [M, D_l]           = dY @ W[:, c_l : c_l + D_l]   (one GEMM per source, its own tensor)
//   dW[:, c_l : c_l + D_l]  = dY^T @ X_l                   (in place, into one [N, K] gradient)
//   dbias                   = sum_m dY[m, :]               (float32 accumulation)
//
// Forward, float32 (and any dtype with a single source: a plain Linear): ATen addmm per source
// accumulating in place in the output (MKL; oneDNN for 16-bit dtypes). Forward,
// bfloat16 / float16: oneDNN's brgemm ukernel (at::native::cpublas::brgemm, AMX tiles where the CPU
// has them) accumulating in a small float32 tile per thread, rounded once (forward_brgemm); where
// the CPU has no brgemm for the dtype, the addmm path in that dtype when ATen runs it through
// oneDNN, else float32 GEMMs on converted row blocks (forward_converted). With few rows (fewer than
// the output features and at most kTransposedMaxRows) the 16-bit forward runs transposed
// (forward_brgemm_transposed) and packs the rows, not W. Backward: ATen mm_out on views (MKL /
// oneDNN, float32 accumulation), so each gradient is rounded once. The forward allocates the
// output; the 16-bit paths also use, per thread, one packed operand block and one float32 tile,
// kept across calls (cpu/thread_scratch.h). Where ATen has no fast 16-bit GEMM, the backward runs
// on float32 copies.
#include "torch/concat_project_cpu.h"

#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <type_traits>

#include "cpu/avx512_util.h"
#include "cpu/thread_scratch.h"

namespace vlmk {
namespace {

// One source as a row-major [rows, width] matrix.
template <typename T>
struct Source {
  const T* data;
  int64_t width;
  int64_t row_stride;
  int64_t column;  // its first column in the weight
};

void check_cpu(const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), "concat_project (cpu): ", name,
              " must be a CPU tensor, got one on ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16 ||
                  t.scalar_type() == at::kHalf,
              "concat_project (cpu): ", name, " must be float32, bfloat16 or float16, got ",
              t.scalar_type());
}

// Checks what the Python op validates (for direct callers of vlm_kernels._C) and returns the
// sources as [M, D_l] matrices with a unit column stride (views where the leading dims collapse to
// one row stride; reshape copies the rest).
std::vector<at::Tensor> flat_sources(const std::vector<at::Tensor>& features,
                                     const at::Tensor& weight) {
  TORCH_CHECK(!features.empty(), "concat_project (cpu): features must be a non-empty list");
  check_cpu("weight", weight);
  TORCH_CHECK(weight.dim() == 2, "concat_project (cpu): weight must be [N, sum_l D_l], got shape ",
              weight.sizes());
  const auto lead = features[0].sizes().slice(0, features[0].dim() - 1);
  const int64_t rows = c10::multiply_integers(lead);
  std::vector<at::Tensor> flat;
  int64_t total = 0;
  for (size_t i = 0; i < features.size(); ++i) {
    const at::Tensor& f = features[i];
    check_cpu("features", f);
    TORCH_CHECK(f.dim() >= 1 && f.sizes().slice(0, f.dim() - 1) == lead,
                "concat_project (cpu): features must share their leading shape: features[0] is ",
                features[0].sizes(), ", features[", i, "] is ", f.sizes());
    TORCH_CHECK(f.scalar_type() == weight.scalar_type(), "concat_project (cpu): features[", i,
                "] is ", f.scalar_type(), ", weight is ", weight.scalar_type());
    at::Tensor f2d = f.reshape({rows, f.size(-1)});
    if (f2d.size(1) > 1 && f2d.stride(1) != 1) f2d = f2d.contiguous();
    total += f2d.size(1);
    flat.push_back(std::move(f2d));
  }
  TORCH_CHECK(weight.size(1) == total, "concat_project (cpu): weight must be [N, sum_l D_l] = [N, ",
              total, "], got ", weight.sizes());
  return flat;
}

template <typename T>
std::vector<Source<T>> sources_of(const std::vector<at::Tensor>& flat) {
  std::vector<Source<T>> sources;
  int64_t column = 0;
  for (const at::Tensor& f : flat) {
    // A source of one column may have any stride: its row stride is then the only one read.
    sources.push_back(
        {f.const_data_ptr<T>(), f.size(1), std::max<int64_t>(f.stride(0), 1), column});
    column += f.size(1);
  }
  return sources;
}

// Whether the 16-bit forward's brgemm path runs this dtype on this CPU (oneDNN's brgemm ukernel:
// AVX-512-BF16 / AMX for bfloat16, AVX-512-FP16 / AMX-FP16 for float16) and oneDNN is switched on
// (torch.backends.mkldnn, as ATen's matmul asks).
bool brgemm_supported(at::ScalarType type) {
  return at::globalContext().userEnabledMkldnn() && at::native::cpublas::could_pack(type);
}

inline uint32_t load_word(const void* ptr) {
  uint32_t word;
  std::memcpy(&word, ptr, sizeof(word));
  return word;
}

// ---- the 16-bit paths' packing and epilogues: AVX-512 where the CPU has it, else portable loops

constexpr int64_t kWordStep = 16;  // portable packing: 32-bit words per row per step (a line)

#if VLMK_HAVE_AVX512_UTIL
// GCC 12 reports the masked-load intrinsics' internal undefined vectors as maybe-uninitialized.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// 16 x 16 blocks of words: 16 row loads of a line each, a register transpose, 16 stores.
VLMK_AVX512_FN void pack_word_columns_avx512(const uint16_t* src, int64_t src_stride, int64_t rows,
                                             int64_t words, uint32_t* dst, int64_t ld_dst) {
  __m512i block[16];
  // Rows outer: 16 source rows are read front to back together (16 streams the prefetcher
  // follows) while the packed rows they feed stay in L2 (words outer read 16-word columns down
  // all rows: ~4% slower on the llava bf16 forward).
  for (int64_t r0 = 0; r0 < rows; r0 += 16) {
    const int64_t row_count = std::min<int64_t>(16, rows - r0);
    const __mmask16 row_mask = cpu::avx512::lanes(row_count);
    for (int64_t i0 = 0; i0 < words; i0 += 16) {
      const int64_t word_count = std::min<int64_t>(16, words - i0);
      const __mmask16 word_mask = cpu::avx512::lanes(word_count);
      cpu::avx512::load_block16(block, src + r0 * src_stride + 2 * i0, src_stride * 2, row_count,
                                word_mask);
      cpu::avx512::transpose16x16(block);
      for (int64_t i = 0; i < word_count; ++i) {
        _mm512_mask_storeu_epi32(dst + (i0 + i) * ld_dst + r0, row_mask, block[i]);
      }
    }
  }
}

template <typename T>
VLMK_AVX512_FN inline __m256i bits16(__m512 value) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return cpu::avx512::bf16_bits(value);
  } else {
    return cpu::avx512::half_bits(value);
  }
}

template <typename T>
VLMK_AVX512_FN void add_bias_store_avx512(const float* acc, const float* bias, int64_t n, T* out) {
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 mask = cpu::avx512::lanes(n - j);
    const __m512 value =
        _mm512_add_ps(_mm512_maskz_loadu_ps(mask, acc + j), _mm512_maskz_loadu_ps(mask, bias + j));
    _mm256_mask_storeu_epi16(out + j, mask, bits16<T>(value));
  }
}

// bfloat16 on a CPU with AVX512-BF16: out[j] = acc[j] + bias[j] for the whole 32s of j < n, one
// vcvtne2ps2bf16 and one 64-byte store each (non-temporal when `stream` and out is 64-byte
// aligned: the caller fences). Returns how many it wrote.
VLMK_AVX512_BF16_FN int64_t add_bias_store_bf16_lines(const float* acc, const float* bias,
                                                      int64_t n, c10::BFloat16* out, bool stream) {
  stream = stream && reinterpret_cast<uintptr_t>(out) % 64 == 0;
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    const __m512 low = _mm512_add_ps(_mm512_loadu_ps(acc + j), _mm512_loadu_ps(bias + j));
    const __m512 high =
        _mm512_add_ps(_mm512_loadu_ps(acc + j + 16), _mm512_loadu_ps(bias + j + 16));
    const __m512i line = (__m512i)_mm512_cvtne2ps_pbh(high, low);
    if (stream) {
      _mm512_stream_si512(reinterpret_cast<__m512i*>(out + j), line);
    } else {
      _mm512_storeu_si512(out + j, line);
    }
  }
  return j;
}

// bfloat16 on a CPU with AVX512-BF16, 16 rows x 32 features at a time: per feature pair, the two
// tile rows + bias are rounded by one vcvtne2ps2bf16 (round to nearest even, NaN kept; like
// oneDNN's own bfloat16 outputs it reads and writes float32 denormals as zero) and interleaved into
// 16 words (f_2p, f_2p+1) per row; a transpose of those 16 vectors gives each output row's 32
// features, one 64-byte store (non-temporal when `stream`: the caller fences). Features past the
// last whole 32 and rows past the last whole 16 are left to the caller.
VLMK_AVX512_BF16_FN void store_transposed_bf16_pairs(const float* tile, int64_t ld_tile, int64_t n,
                                                     int64_t m, const float* bias,
                                                     c10::BFloat16* out, int64_t ld_out,
                                                     bool stream) {
  // Word t of the result: element t of the low half, then element t of the high half.
  const __m512i interleave =
      _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                       21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  __m512i block[16];
  // Non-temporal only where every row's stores are whole aligned lines.
  stream = stream && reinterpret_cast<uintptr_t>(out) % 64 == 0 && ld_out % 32 == 0;
  for (int64_t r0 = 0; r0 + 16 <= m; r0 += 16) {
    for (int64_t j0 = 0; j0 + 32 <= n; j0 += 32) {
#pragma GCC unroll 16
      for (int p = 0; p < 16; ++p) {
        const int64_t j = j0 + 2 * p;
        const __m512 even =
            _mm512_add_ps(_mm512_loadu_ps(tile + j * ld_tile + r0), _mm512_set1_ps(bias[j]));
        const __m512 odd = _mm512_add_ps(_mm512_loadu_ps(tile + (j + 1) * ld_tile + r0),
                                         _mm512_set1_ps(bias[j + 1]));
        block[p] = _mm512_permutexvar_epi16(interleave, (__m512i)_mm512_cvtne2ps_pbh(odd, even));
      }
      cpu::avx512::transpose16x16(block);
#pragma GCC unroll 16
      for (int r = 0; r < 16; ++r) {
        c10::BFloat16* dst = out + (r0 + r) * ld_out + j0;
        if (stream) {
          _mm512_stream_si512(reinterpret_cast<__m512i*>(dst), block[r]);
        } else {
          _mm512_storeu_si512(dst, block[r]);
        }
      }
    }
  }
}

// Per 16 rows x 16 features: 16 tile row loads, a register transpose, bias, 16 row stores. Whole
// blocks take unmasked loads and stores with fixed trip counts (in the masked general form GCC
// kept the block on the stack).
template <typename T>
VLMK_AVX512_FN void store_transposed_avx512(const float* tile, int64_t ld_tile, int64_t n,
                                            int64_t m, const float* bias, T* out, int64_t ld_out) {
  __m512i block[16];
  for (int64_t r0 = 0; r0 < m; r0 += 16) {
    const int64_t row_count = std::min<int64_t>(16, m - r0);
    const __mmask16 row_mask = cpu::avx512::lanes(row_count);
    for (int64_t j0 = 0; j0 < n; j0 += 16) {
      const int64_t feature_count = std::min<int64_t>(16, n - j0);
      const __mmask16 feature_mask = cpu::avx512::lanes(feature_count);
      const __m512 bias_v = _mm512_maskz_loadu_ps(feature_mask, bias + j0);
      if (row_count == 16 && feature_count == 16) {
#pragma GCC unroll 16
        for (int j = 0; j < 16; ++j) {
          block[j] = _mm512_castps_si512(_mm512_loadu_ps(tile + (j0 + j) * ld_tile + r0));
        }
        cpu::avx512::transpose16x16(block);
#pragma GCC unroll 16
        for (int r = 0; r < 16; ++r) {
          const __m512 value = _mm512_add_ps(_mm512_castsi512_ps(block[r]), bias_v);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (r0 + r) * ld_out + j0),
                              bits16<T>(value));
        }
        continue;
      }
      cpu::avx512::load_block16(block, tile + j0 * ld_tile + r0, ld_tile * 4, feature_count,
                                row_mask);
      cpu::avx512::transpose16x16(block);
      for (int64_t r = 0; r < row_count; ++r) {
        const __m512 value = _mm512_add_ps(_mm512_castsi512_ps(block[r]), bias_v);
        _mm256_mask_storeu_epi16(out + (r0 + r) * ld_out + j0, feature_mask, bits16<T>(value));
      }
    }
  }
}
#pragma GCC diagnostic pop
#endif

// dst[i * ld_dst + r] = the 32-bit word at src + r * src_stride + 2i, for r < rows, i < words: a
// transpose of words, which gives brgemm's VNNI B operand (pairs along K) from row-major rows.
// Columns rows .. ld_dst of dst are not written.
template <typename T>
void pack_word_columns(const T* src, int64_t src_stride, int64_t rows, int64_t words, uint32_t* dst,
                       int64_t ld_dst) {
  static_assert(sizeof(T) == 2);
#if VLMK_HAVE_AVX512_UTIL
  if (cpu::avx512::supported()) {
    return pack_word_columns_avx512(reinterpret_cast<const uint16_t*>(src), src_stride, rows, words,
                                    dst, ld_dst);
  }
#endif
  // kWordStep words at a time: each row gives one cache line, and the kWordStep packed rows it
  // writes stay in L1 while the rows advance (a whole row at a time wrote a new line per word).
  for (int64_t i0 = 0; i0 < words; i0 += kWordStep) {
    const int64_t i_end = std::min(words, i0 + kWordStep);
    for (int64_t r = 0; r < rows; ++r) {
      const T* row = src + r * src_stride;
      for (int64_t i = i0; i < i_end; ++i) dst[i * ld_dst + r] = load_word(row + 2 * i);
    }
  }
}

// out[j] = T(acc[j] + bias[j]), j < n, rounded once. With `stream`, the bfloat16 path writes
// whole aligned lines non-temporally (the caller fences).
template <typename T>
void add_bias_store(const float* acc, const float* bias, int64_t n, T* out, bool stream = false) {
#if VLMK_HAVE_AVX512_UTIL
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (cpu::avx512::bf16_supported()) {
      const int64_t done = add_bias_store_bf16_lines(acc, bias, n, out, stream);
      if (done < n) add_bias_store_avx512(acc + done, bias + done, n - done, out + done);
      return;
    }
  }
  if (cpu::avx512::supported()) return add_bias_store_avx512(acc, bias, n, out);
#endif
  for (int64_t j = 0; j < n; ++j) out[j] = static_cast<T>(acc[j] + bias[j]);
}

// out[r * ld_out + j] = T(tile[j * ld_tile + r] + bias[j]), j < n, r < m, rounded once.
// With `stream`, the bfloat16 path writes whole lines non-temporally (the caller fences).
template <typename T>
void store_transposed(const float* tile, int64_t ld_tile, int64_t n, int64_t m, const float* bias,
                      T* out, int64_t ld_out, bool stream) {
#if VLMK_HAVE_AVX512_UTIL
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (cpu::avx512::bf16_supported()) {
      const int64_t whole_m = m / 16 * 16, whole_n = n / 32 * 32;
      store_transposed_bf16_pairs(tile, ld_tile, n, m, bias, out, ld_out, stream);
      if (whole_n < n && whole_m > 0) {
        store_transposed_avx512(tile + whole_n * ld_tile, ld_tile, n - whole_n, whole_m,
                                bias + whole_n, out + whole_n, ld_out);
      }
      if (whole_m < m) {
        store_transposed_avx512(tile + whole_m, ld_tile, n, m - whole_m, bias,
                                out + whole_m * ld_out, ld_out);
      }
      return;
    }
  }
  if (cpu::avx512::supported())
    return store_transposed_avx512(tile, ld_tile, n, m, bias, out, ld_out);
#endif
  // kRowStep output rows at a time through a small block in L1 (reading the tile column by column
  // touched a new line per value).
  constexpr int64_t kRowStep = 16;
  float block[kRowStep][kWordStep];
  for (int64_t r0 = 0; r0 < m; r0 += kRowStep) {
    const int64_t r_count = std::min(kRowStep, m - r0);
    for (int64_t j0 = 0; j0 < n; j0 += kWordStep) {
      const int64_t j_count = std::min(kWordStep, n - j0);
      for (int64_t j = 0; j < j_count; ++j) {
        for (int64_t r = 0; r < r_count; ++r) block[r][j] = tile[(j0 + j) * ld_tile + r0 + r];
      }
      for (int64_t r = 0; r < r_count; ++r) {
        add_bias_store(block[r], bias + j0, j_count, out + (r0 + r) * ld_out + j0);
      }
    }
  }
}

// bfloat16 / float16: float32 accumulation through oneDNN's brgemm ukernel, one panel of kPanel
// output features per task. The task packs the panel's weight once, for every source, as brgemm B
// operands [D_l, kPanel] in VNNI layout (pairs along D_l: word (i, n) = W[n0 + n, c_l + 2i ..
// 2i+1], a transpose of 32-bit words). Then, per kSuperRows rows, source after source (chunk after
// chunk of a wide one), brgemm calls of kBlockRows rows and K steps of at most kMaxKStep accumulate
// into a float32 [kSuperRows, kPanel] tile (one source's packed B, 640 KiB at D_l = 1280, stays in
// L2 across the rows); an odd width's last column is a float32 rank-1 update. The tile takes the
// bias and is rounded once into the output. Tasks split the rows too when there are fewer panels
// than threads (each packs its panel then).
// Measured at the mllama-projector shape (bf16, 2 threads, medians of 4, whole-width K per call, on
// a slower day): panel x block x super rows 256 x 32 x 1024: 353 ms (cat + linear 343 ms); 128 x 32
// x 1024: 361; 256 x 32 x 256: 535; 64 x 32 with no super block (B from L2, A re-read per 64
// features): 467; 128 x 64 likewise: 456. With K steps (kMaxKStep), 64 rows x 320 measured 25%
// slower than 32 x 640, 48 x 448 10% slower.
constexpr int64_t kPanel = 256;       // output features per task (packed: 3.75 MiB at K = 7680)
constexpr int64_t kBlockRows = 32;    // rows per brgemm call
constexpr int64_t kSuperRows = 1024;  // rows of the float32 tile: 1 MiB, a source's B in L2 over it
// K per brgemm call at most: a source's width is cut into equal steps of a multiple of 32 (AMX
// takes K 32 bfloat16 at a time) no longer than this, so that a call's A block, kBlockRows x 640
// bfloat16 = 40 KiB, stays in L1 while the call sweeps the panel's features. mllama-projector bf16,
// 2 threads, interleaved medians: whole 1280-wide sources 184 ms, steps of 640 152-155 ms, of 320
// 156, of 256 159; uneven steps lose (576 + 576 + 128: 161, 384 x 3 + 128: 169).
constexpr int64_t kMaxKStep = 640;
// A source wider than this is taken in equal chunks of at most this many columns, each chunk over
// all the rows before the next: one chunk's packed B (2048 x 256 bfloat16 = 1 MiB) stays in L2 next
// to the 1 MiB tile, where a whole 4096-wide source's (2 MiB) did not. One 4096-wide source, 1024
// rows -> 4096 features, bf16, 2 threads: 24.6 ms whole, 15.9 ms in chunks of 2048 (1024: 15.5,
// 1536: 15.6); sources of 1280 and 2048 are one chunk either way.
constexpr int64_t kMaxKChunk = 2048;

// The K step for a width (even, > 0): the fewest equal steps of at most max_step, each rounded up
// to a multiple of 32.
int64_t k_step_of(int64_t width, int64_t max_step) {
  const int64_t steps = (width + max_step - 1) / max_step;
  return ((width + steps - 1) / steps + 31) / 32 * 32;
}

template <typename T>
void forward_brgemm(const std::vector<Source<T>>& sources, const T* w, int64_t ldw, const T* bias,
                    int64_t rows, int64_t cols, T* out) {
  const int64_t panels = (cols + kPanel - 1) / kPanel;
  const int64_t row_groups =
      std::min<int64_t>((rows + kBlockRows - 1) / kBlockRows,
                        std::max<int64_t>(1, (2 * at::get_num_threads() + panels - 1) / panels));
  const int64_t group_rows =
      ((rows + row_groups - 1) / row_groups + kBlockRows - 1) / kBlockRows * kBlockRows;
  int64_t packed_words = 0;  // per panel: sum over sources of floor(D_l / 2) rows of kPanel words
  for (const auto& src : sources) packed_words += src.width / 2 * kPanel;
  std::vector<float> bias_f(cols, 0.0f);
  if (bias != nullptr) std::copy(bias, bias + cols, bias_f.begin());
  const bool stream = rows * cols * static_cast<int64_t>(sizeof(T)) >= cpu::kStreamOutputBytes;

  at::parallel_for(0, panels * row_groups, 1, [&](int64_t begin, int64_t end) {
    // Per-thread scratch kept across calls (cpu/thread_scratch.h: allocated per call, it was
    // fresh pages every call), so ATen's memory profile does not count it.
    uint32_t* packed = cpu::thread_scratch<uint32_t>(cpu::ScratchSlot::kA, packed_words);
    float* tile = cpu::thread_scratch<float>(cpu::ScratchSlot::kB, kSuperRows * kPanel);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n0 = task / row_groups * kPanel;
      const int64_t n = std::min(kPanel, cols - n0);
      const int64_t row_begin = task % row_groups * group_rows;
      const int64_t row_end = std::min(rows, row_begin + group_rows);
      uint32_t* dst = packed;
      for (const auto& src : sources) {
        pack_word_columns(w + n0 * ldw + src.column, ldw, n, src.width / 2, dst, kPanel);
        dst += src.width / 2 * kPanel;
      }
      for (int64_t s0 = row_begin; s0 < row_end; s0 += kSuperRows) {
        const int64_t rows_here = std::min(kSuperRows, row_end - s0);
        bool accumulate = false;
        const uint32_t* b = packed;
        for (const auto& src : sources) {
          const int64_t even = src.width / 2 * 2;
          const int64_t chunk = even > 0 ? k_step_of(even, kMaxKChunk) : 0;
          for (int64_t c0 = 0; c0 < even; c0 += chunk) {
            const int64_t chunk_here = std::min(chunk, even - c0);
            const int64_t k_step = k_step_of(chunk_here, kMaxKStep);
            for (int64_t r0 = 0; r0 < rows_here; r0 += kBlockRows) {
              for (int64_t p = c0; p < c0 + chunk_here; p += k_step) {
                at::native::cpublas::brgemm(std::min(kBlockRows, rows_here - r0), n,
                                            std::min(k_step, c0 + chunk_here - p), src.row_stride,
                                            kPanel, kPanel, accumulate || p > 0,
                                            src.data + (s0 + r0) * src.row_stride + p,
                                            reinterpret_cast<const T*>(b + p / 2 * kPanel),
                                            tile + r0 * kPanel, /*is_vnni=*/true);
              }
            }
          }
          accumulate = accumulate || even > 0;
          b += even / 2 * kPanel;
        }
        if (!accumulate) std::fill(tile, tile + kSuperRows * kPanel, 0.0f);
        for (const auto& src : sources) {
          if (src.width % 2 == 0) continue;
          const int64_t k = src.width - 1;  // the last column of an odd width
          for (int64_t r = 0; r < rows_here; ++r) {
            const float x = static_cast<float>(src.data[(s0 + r) * src.row_stride + k]);
            float* acc = tile + r * kPanel;
            for (int64_t j = 0; j < n; ++j) {
              acc[j] += x * static_cast<float>(w[(n0 + j) * ldw + src.column + k]);
            }
          }
        }
        for (int64_t r = 0; r < rows_here; ++r) {
          add_bias_store(tile + r * kPanel, bias_f.data() + n0, n, out + (s0 + r) * cols + n0,
                         stream);
        }
      }
    }
    cpu::stream_fence();
    at::native::cpublas::brgemm_release(/*is_vnni=*/true);
  });
}

// bfloat16 / float16 when the rows are few: fewer than the output features and at most
// kTransposedMaxRows (a LLaVA connector over 576 tokens, a decode step): the same products
// transposed, out^T [N, M] = sum_l W_l [N, D_l] @ X_l^T, so that the operand packed per call is the
// smaller one, X (rows x K words) instead of W (N x K). W's rows are brgemm's A operand, read where
// they lie (row stride ldw, no packing); each task packs its block of rows of every source as VNNI
// B operands [D_l / 2, rows] (word (i, m) = X_l[m0 + m, 2i .. 2i+1]) once, then walks its output
// features kFeatureBlock at a time: brgemm calls accumulate a float32 [kFeatureBlock, rows] tile
// over the sources (an odd width's last column as a float32 rank-1 update), and the epilogue adds
// the bias and writes the tile transposed, rounded once. Tasks: row blocks of at most
// kTransposedRows, times groups of output features when there are fewer row blocks than 2 x threads
// (each task then packs its rows: X is the small operand).
constexpr int64_t kTransposedRows = 256;  // rows per task: B columns, and the tile's row length
// The transposed path runs for fewer rows than output features, up to this many. Beyond it the
// untransposed path's one pass of packing W is paid off and its kernel is faster (bf16, 2 threads,
// 2 sources of 1024 -> 4096 features, transposed / untransposed ms: 128 rows 1.10 / 1.58, 576
// rows 3.82 / 4.12, 768 rows 5.75 / 5.24, 1024 rows 7.30 / 6.58, 2048 rows 25.0 / 18.4; -> 2048
// features at 576 rows 2.02 / 2.13; 300 rows -> 1024 features 0.77 / 0.74).
constexpr int64_t kTransposedMaxRows = 640;
constexpr int64_t kFeatureBlock = 64;  // output features per brgemm call (A rows)
// K per brgemm call at most (equal steps, k_step_of). llava-2layer bf16, one thread, 3 alternating
// runs: 11.5-11.7 ms with each source's whole K per call, 10.4-10.8 ms with 256 (512: 11.1, 128:
// 11.7); at 2 threads 256, 320 and 512 measured alike, 128 10% slower.
constexpr int64_t kTransposedKStep = 256;

template <typename T>
void forward_brgemm_transposed(const std::vector<Source<T>>& sources, const T* w, int64_t ldw,
                               const T* bias, int64_t rows, int64_t cols, T* out) {
  const int64_t row_blocks = (rows + kTransposedRows - 1) / kTransposedRows;
  const int64_t block_rows = (rows + row_blocks - 1) / row_blocks;
  const int64_t ldp = (block_rows + 15) / 16 * 16;  // packed B / tile row length
  const int64_t feature_blocks = (cols + kFeatureBlock - 1) / kFeatureBlock;
  const int64_t groups = std::min<int64_t>(
      feature_blocks,
      std::max<int64_t>(1, (2 * at::get_num_threads() + row_blocks - 1) / row_blocks));
  const int64_t group_blocks = (feature_blocks + groups - 1) / groups;
  int64_t packed_words = 0;
  for (const auto& src : sources) packed_words += src.width / 2 * ldp;
  std::vector<float> bias_f(cols, 0.0f);
  if (bias != nullptr) std::copy(bias, bias + cols, bias_f.begin());
  const bool stream = rows * cols * static_cast<int64_t>(sizeof(T)) >= cpu::kStreamOutputBytes;

  at::parallel_for(0, row_blocks * groups, 1, [&](int64_t begin, int64_t end) {
    // Per-thread scratch kept across calls (as in forward_brgemm).
    uint32_t* packed = cpu::thread_scratch<uint32_t>(cpu::ScratchSlot::kA, packed_words);
    float* tile = cpu::thread_scratch<float>(cpu::ScratchSlot::kB, kFeatureBlock * ldp);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t m0 = task / groups * block_rows;
      const int64_t m = std::min(block_rows, rows - m0);
      if (m <= 0) continue;
      const int64_t block_begin = task % groups * group_blocks;
      const int64_t block_end = std::min(feature_blocks, block_begin + group_blocks);
      uint32_t* dst = packed;
      for (const auto& src : sources) {
        pack_word_columns(src.data + m0 * src.row_stride, src.row_stride, m, src.width / 2, dst,
                          ldp);
        dst += src.width / 2 * ldp;
      }
      for (int64_t fb = block_begin; fb < block_end; ++fb) {
        const int64_t n0 = fb * kFeatureBlock;
        const int64_t n = std::min(kFeatureBlock, cols - n0);
        bool accumulate = false;
        const uint32_t* b = packed;
        for (const auto& src : sources) {
          const int64_t even = src.width / 2 * 2;
          if (even > 0) {
            // K in equal steps of at most kTransposedKStep: the A block (W rows) of a step stays
            // in L1 and the B block in L2 across the brgemm's inner blocks.
            const int64_t k_step = k_step_of(even, kTransposedKStep);
            for (int64_t p = 0; p < even; p += k_step) {
              at::native::cpublas::brgemm(n, m, std::min(k_step, even - p), ldw, ldp, ldp,
                                          accumulate, w + n0 * ldw + src.column + p,
                                          reinterpret_cast<const T*>(b + p / 2 * ldp), tile,
                                          /*is_vnni=*/true);
              accumulate = true;
            }
          }
          b += even / 2 * ldp;
        }
        if (!accumulate) std::fill(tile, tile + kFeatureBlock * ldp, 0.0f);
        for (const auto& src : sources) {
          if (src.width % 2 == 0) continue;
          const int64_t k = src.width - 1;  // the last column of an odd width
          for (int64_t j = 0; j < n; ++j) {
            const float wk = static_cast<float>(w[(n0 + j) * ldw + src.column + k]);
            float* acc = tile + j * ldp;
            for (int64_t r = 0; r < m; ++r) {
              acc[r] += wk * static_cast<float>(src.data[(m0 + r) * src.row_stride + k]);
            }
          }
        }
        store_transposed(tile, ldp, n, m, bias_f.data() + n0, out + m0 * cols + n0, cols, stream);
      }
    }
    cpu::stream_fence();
    at::native::cpublas::brgemm_release(/*is_vnni=*/true);
  });
}

// float32, a single source of columns, and a 16-bit dtype on a CPU without its brgemm: one addmm
// per source into the output, in place (beta = 1) after the first: MKL (oneDNN for 16-bit dtypes)
// reads each source and the weight's column block where they lie. float32 accumulates exactly as
// one GEMM would; 16-bit outputs of several sources are rounded after each source (oneDNN
// accumulates each product in float32).
void forward_addmm(const std::vector<at::Tensor>& flat, const at::Tensor& weight,
                   const at::Tensor& bias, at::Tensor& out) {
  bool first = true;
  int64_t column = 0;
  for (const at::Tensor& x : flat) {
    const int64_t width = x.size(1);
    if (width > 0) {
      const at::Tensor w = weight.narrow(1, column, width).t();
      if (first && bias.defined()) {
        at::addmm_out(out, bias.unsqueeze(0), x, w);
      } else if (first) {
        at::mm_out(out, x, w);
      } else {
        out.addmm_(x, w);
      }
      first = false;
    }
    column += width;
  }
  if (first) bias.defined() ? out.copy_(bias.unsqueeze(0).expand_as(out)) : out.zero_();
}

// Whether ATen's CPU GEMM runs this 16-bit dtype through oneDNN: the check ATen's matmul makes
// (mkldnn::_is_mkldnn_bf16_supported / _fp16_supported, and oneDNN switched on). Where it does not
// (x86 without AVX-512 or AVX-NE-CONVERT, e.g. a Zen 3 EPYC), ATen's 16-bit GEMM is a scalar loop:
// 1 GFLOP/s there against ~140 for float32 at 2 threads.
bool aten_gemm_runs_16bit(at::ScalarType type) {
  const auto ask = [](const char* name) {
    const auto op = c10::Dispatcher::singleton().findSchema({name, ""});
    return op.has_value() && op->typed<bool()>().call();
  };
  static const bool bf16 = ask("mkldnn::_is_mkldnn_bf16_supported");
  static const bool f16 = ask("mkldnn::_is_mkldnn_fp16_supported");
  return at::globalContext().userEnabledMkldnn() && (type == at::kBFloat16 ? bf16 : f16);
}

// bfloat16 / float16 where neither oneDNN's brgemm nor ATen's GEMM runs the dtype (see
// aten_gemm_runs_16bit): the products run in float32 on converted blocks. Per panel of
// kConvertedPanel output features the weight's panel is converted once ([n, K] float32); then per
// block of at most kConvertedRows rows, every source's rows are converted into their columns of
// one [rows, K] float32 block (the concat exists for these rows only, in scratch), one float32
// GEMM takes the whole K (MKL), and the bias is added and the sum rounded once into the output
// (add_bias_store: ATen's add into a 16-bit output allocated a float32 temporary per block).
// Scratch: the calling thread's (cpu/thread_scratch.h); ATen's copy and GEMM run threaded.
constexpr int64_t kConvertedPanel = 512;
constexpr int64_t kConvertedRows = 256;

template <typename T>
void forward_converted(const std::vector<at::Tensor>& flat, const at::Tensor& weight,
                       const at::Tensor& bias, at::Tensor& out) {
  const int64_t rows = out.size(0), cols = out.size(1), total = weight.size(1);
  const int64_t panel = std::min(kConvertedPanel, cols);
  const int64_t row_blocks = (rows + kConvertedRows - 1) / kConvertedRows;
  const int64_t block = (rows + row_blocks - 1) / row_blocks;
  float* const w_panel = cpu::thread_scratch<float>(cpu::ScratchSlot::kA, panel * total);
  float* const x_block = cpu::thread_scratch<float>(cpu::ScratchSlot::kB, block * total);
  float* const acc = cpu::thread_scratch<float>(cpu::ScratchSlot::kC, block * panel);
  const auto as_float = at::TensorOptions().dtype(at::kFloat);
  std::vector<float> bias_f(cols, 0.0f);
  if (bias.defined()) std::copy_n(bias.const_data_ptr<T>(), cols, bias_f.begin());
  T* const out_data = out.mutable_data_ptr<T>();
  for (int64_t n0 = 0; n0 < cols; n0 += panel) {
    const int64_t n = std::min(panel, cols - n0);
    const at::Tensor w_n = at::from_blob(w_panel, {n, total}, as_float);
    w_n.copy_(weight.narrow(0, n0, n));
    for (int64_t r0 = 0; r0 < rows; r0 += block) {
      const int64_t m = std::min(block, rows - r0);
      const at::Tensor x_m = at::from_blob(x_block, {m, total}, as_float);
      int64_t column = 0;
      for (const at::Tensor& x : flat) {
        const int64_t width = x.size(1);
        if (width > 0) x_m.narrow(1, column, width).copy_(x.narrow(0, r0, m));
        column += width;
      }
      at::Tensor c = at::from_blob(acc, {m, n}, as_float);
      at::mm_out(c, x_m, w_n.t());
      at::parallel_for(0, m, 16, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          add_bias_store(acc + r * n, bias_f.data() + n0, n, out_data + (r0 + r) * cols + n0);
        }
      });
    }
  }
}

// Calls f(T{}) for the weight's dtype T (float, BFloat16 or Half).
template <typename F>
void dispatch_dtype(at::ScalarType type, F&& f) {
  switch (type) {
    case at::kFloat:
      return f(float{});
    case at::kBFloat16:
      return f(c10::BFloat16{});
    case at::kHalf:
      return f(c10::Half{});
    default:
      TORCH_CHECK(false, "concat_project (cpu): float32, bfloat16 or float16 only, got ", type);
  }
}

}  // namespace

at::Tensor concat_project_fwd_cpu(const std::vector<at::Tensor>& features, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias) {
  const std::vector<at::Tensor> flat = flat_sources(features, weight);
  const int64_t rows = flat[0].size(0);
  const int64_t cols = weight.size(0);
  std::vector<int64_t> shape(features[0].sizes().begin(), features[0].sizes().end() - 1);
  shape.push_back(cols);
  at::Tensor out = at::empty({rows, cols}, weight.options());
  if (out.numel() == 0) return out.view(shape);
  at::Tensor b;
  if (bias.has_value()) {
    check_cpu("bias", *bias);
    TORCH_CHECK(
        bias->dim() == 1 && bias->size(0) == cols && bias->scalar_type() == weight.scalar_type(),
        "concat_project (cpu): bias must be [N] = [", cols, "] of weight's dtype, got ",
        bias->sizes(), " ", bias->scalar_type());
    b = bias->contiguous();
  }
  const at::Tensor w = weight.stride(1) == 1 ? weight : weight.contiguous();
  const int64_t ldw = std::max<int64_t>(w.stride(0), 1);
  const at::ScalarType type = weight.scalar_type();
  // With one source of columns (the others empty) there is no concat to save: the op is a Linear,
  // and ATen's GEMM is the peer itself (bf16, 2 threads, ours / F.linear ms: 4096 rows x 1024 ->
  // 1024: 3.10 / 2.55; 1024 x 4096 -> 4096: 16.4 / 13.5; 128 x 2048 -> 4096: 1.19 / 1.10).
  const int64_t sources_with_columns =
      std::count_if(flat.begin(), flat.end(), [](const at::Tensor& x) { return x.size(1) > 0; });
  if (type != at::kFloat && !brgemm_supported(type) && !aten_gemm_runs_16bit(type)) {
    dispatch_dtype(type, [&](auto tag) { forward_converted<decltype(tag)>(flat, w, b, out); });
    return out.view(shape);
  }
  if (type == at::kFloat || !brgemm_supported(type) || sources_with_columns == 1) {
    forward_addmm(flat, w, b, out);
    return out.view(shape);
  }
  dispatch_dtype(type, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (!std::is_same_v<T, float>) {
      // Pack the smaller operand: the rows when there are few of them (see kTransposedMaxRows).
      const auto forward = rows < cols && rows <= kTransposedMaxRows ? forward_brgemm_transposed<T>
                                                                     : forward_brgemm<T>;
      forward(sources_of<T>(flat), w.const_data_ptr<T>(), ldw,
              b.defined() ? b.const_data_ptr<T>() : nullptr, rows, cols, out.mutable_data_ptr<T>());
    }
  });
  return out.view(shape);
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> concat_project_bwd_cpu(
    const at::Tensor& grad_out, const std::vector<at::Tensor>& features, const at::Tensor& weight) {
  const std::vector<at::Tensor> flat = flat_sources(features, weight);
  const int64_t rows = flat[0].size(0);
  const int64_t cols = weight.size(0);
  const int64_t total = weight.size(1);
  check_cpu("grad_out", grad_out);
  TORCH_CHECK(
      grad_out.numel() == rows * cols && grad_out.size(-1) == cols,
      "concat_project (cpu): grad_out must be [..., N] with the features' leading shape and "
      "N = ",
      cols, ", got ", grad_out.sizes());
  at::Tensor grad = grad_out.to(weight.scalar_type()).reshape({rows, cols});
  if (grad.stride(1) != 1) grad = grad.contiguous();
  const at::Tensor w = weight.stride(1) == 1 ? weight : weight.contiguous();

  std::vector<at::Tensor> grad_features;
  for (const at::Tensor& f : features)
    grad_features.push_back(at::empty(f.sizes(), weight.options()));
  at::Tensor grad_weight = at::empty({cols, total}, weight.options());
  if (rows == 0 || cols == 0) {
    for (at::Tensor& g : grad_features) g.zero_();
    grad_weight.zero_();
    return {grad_features, grad_weight, at::zeros({cols}, weight.options())};
  }
  // The bias gradient: column sums of dY. ATen's CPU sum accumulates 16-bit values in float32 and
  // rounds once (bit for bit the float32 sum rounded, at 577-30000 rows), ~3.5x faster than
  // sum(dtype=float32), which first copies dY to float32.
  at::Tensor grad_bias = grad.sum(0);

  if (grad.scalar_type() != at::kFloat && !aten_gemm_runs_16bit(grad.scalar_type())) {
    // No fast 16-bit GEMM on this CPU (see aten_gemm_runs_16bit): float32 copies of dY and W,
    // float32 products, each gradient rounded once.
    const at::Tensor grad_f = grad.to(at::kFloat), w_f = w.to(at::kFloat);
    int64_t column = 0;
    for (size_t l = 0; l < flat.size(); ++l) {
      const int64_t width = flat[l].size(1);
      if (width > 0) {
        grad_features[l].view({rows, width}).copy_(at::mm(grad_f, w_f.narrow(1, column, width)));
        grad_weight.narrow(1, column, width).copy_(at::mm(grad_f.t(), flat[l].to(at::kFloat)));
      }
      column += width;
    }
    return {grad_features, grad_weight, grad_bias};
  }
  int64_t column = 0;
  for (size_t l = 0; l < flat.size(); ++l) {
    const int64_t width = flat[l].size(1);
    if (width > 0) {
      const at::Tensor w_l = w.narrow(1, column, width);  // [N, D_l], row stride K
      // dX_l [M, D_l] = dY [M, N] @ W[:, c_l : c_l + D_l], straight into the feature's gradient.
      at::Tensor grad_x = grad_features[l].view({rows, width});
      at::mm_out(grad_x, grad, w_l);
      // dW[:, c_l : c_l + D_l] = dY^T @ X_l, in place in its column block of dW.
      at::Tensor grad_w_l = grad_weight.narrow(1, column, width);
      at::mm_out(grad_w_l, grad.t(), flat[l]);
    }
    column += width;
  }
  return {grad_features, grad_weight, grad_bias};
}

}  // namespace vlmk
