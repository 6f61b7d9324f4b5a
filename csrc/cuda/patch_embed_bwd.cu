// patch_embed backward kernels (semantics and params in patch_embed.h). Rows of the two GEMMs are
// patches over B*Np; patch row q = (b, i) reads grad_out row b*N + o + i (o = 1 with CLS).
//
// weight: grad_weight[D, K] = dYp^T X on tensor cores. Grid (ceil(K / 64), ceil(D / 64), splits);
//   split s reduces patches [s * rows_per_split, ...) in steps of 32 into its float32 partial
//   [s, D, K]; a second kernel sums the partials in split order (deterministic, no atomics).
//   Per step: A = dYp tile [32 patches][64 D] (cp.async when D and the pointer allow it), read
//   transposed (ldmatrix.x4.trans / scalar tf32 fragments); B = X tile [32 patches][64 features]
//   gathered, normalized and register-staged like the forward's A tile, k-major
//   (ldmatrix.x4.trans).
// pixels: dX[B*Np, K] = dYp W on tensor cores. Grid (ceil(B*Np / 64), ceil(K / 64)); per step of 32
//   along D: A = dYp tile [64 patches][32 D] (row-major), B = W tile [32 D][64 features] (k-major,
//   cp.async when K allows). Epilogue: * scale[c] (1/std) and scattered to [B, C, H, W] (stride =
//   kernel: each pixel is written by exactly one thread), in the pixels' dtype.
// pos / bias (SIMT, small): grid (ceil(D / 128), ceil(N / 16)); a thread sums its column over the
//   batch for 16 tokens -> grad_pos, and those sums over its patch tokens -> a bias partial; the
//   partials are summed over the token blocks in order.
// gpu-report: *patch_embed_bwd_weight_kernel* tensor_cores
// gpu-report: *patch_embed_bwd_pixels_kernel* tensor_cores
#include <cstdint>

#include "cuda/patch_embed_tiles.cuh"

namespace vlmk {
namespace VLMK_PE_NAMESPACE {
namespace {

using namespace patch_embed_detail;

using Params = PatchEmbedBwdParams;

// Offset of the grad_out row of patch row `patch` (-1 past `patch_end`).
struct GradRow {
  int64_t patches_per_image;
  int64_t tokens;
  int64_t cls_rows;
  int64_t dim;
  int64_t patch_end;
  __device__ __forceinline__ int64_t operator()(int64_t patch) const {
    if (patch >= patch_end) return -1;
    const int64_t image = patch / patches_per_image;
    const int64_t i = patch - image * patches_per_image;
    return (image * tokens + cls_rows + i) * dim;
  }
};

// Offset of row d of a [D, K] matrix (-1 past D).
struct MatrixRow {
  int64_t rows;
  int64_t row_stride;
  __device__ __forceinline__ int64_t operator()(int64_t d) const {
    return d < rows ? d * row_stride : -1;
  }
};

template <typename T>
struct WeightGradStorage {
  static constexpr int kRowA = TileRow<T, kRows>;
  static constexpr int kRowB = TileRow<T, kCols>;
  alignas(16) T dy[2][kDepth][kRowA];  // patches x D (read as A^T)
  alignas(16) T x[2][kDepth][kRowB];   // patches x features (k-major B)
};

template <typename T>
__global__ void __launch_bounds__(kThreads)
    patch_embed_bwd_weight_kernel(const __grid_constant__ Params p, const bool grad_vector) {
  using Storage = WeightGradStorage<T>;
  VLMK_SHARED(Storage, sm);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int features = static_cast<int>(p.image.features);
  const int dim = static_cast<int>(p.dim);
  const int feature_begin = blockIdx.x * kCols;
  const int d_begin = blockIdx.y * kRows;
  const int64_t patches = p.image.batch * p.image.patches_per_image;
  const int64_t patch_begin = static_cast<int64_t>(blockIdx.z) * p.rows_per_split;
  const int64_t patch_end = min(patches, patch_begin + p.rows_per_split);
  const GradRow grad_row{p.image.patches_per_image, p.tokens, p.has_cls ? 1 : 0, p.dim, patch_end};
  const T* grad_out = static_cast<const T*>(p.grad_out);

  FragC acc[kTilesN];
  zero(acc);
  PatchGather<kDepth, kCols> gather;
  pipelined_steps(
      static_cast<int>((patch_end - patch_begin + kDepth - 1) / kDepth),
      [&](int stage, int step) {
        const int64_t first = patch_begin + static_cast<int64_t>(step) * kDepth;
        copy_tile<T, kDepth, kRows>(&sm.dy[stage][0][0], Storage::kRowA, grad_out, grad_row, first,
                                    d_begin, dim, grad_vector);
        tc::cp_async_commit();
        gather.load(p.image, p.image.patches_per_image, 0, first, patch_end, feature_begin,
                    features);
      },
      [&](int stage) { gather.store(&sm.x[stage][0][0], Storage::kRowB); },
      [&](int stage) {
        warp_tile_mma<T, true, true>(acc, &sm.dy[stage][0][0], Storage::kRowA, &sm.x[stage][0][0],
                                     Storage::kRowB, 16 * warp);
      });

  // Accumulator element (d row g + 8 h, feature column 8 j + 2 t + e) is acc[j].x[2 h + e].
  const int g = lane / 4, t = lane % 4;
  float* partial = p.workspace + static_cast<int64_t>(blockIdx.z) * dim * features;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int d = d_begin + 16 * warp + g + 8 * h;
    if (d >= dim) continue;
#pragma unroll
    for (int j = 0; j < kTilesN; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int feature = feature_begin + 8 * j + 2 * t + e;
        if (feature < features) {
          partial[static_cast<int64_t>(d) * features + feature] = acc[j].x[2 * h + e];
        }
      }
    }
  }
}

template <typename T>
struct PixelGradStorage {
  static constexpr int kRowA = TileRow<T, kDepth>;
  static constexpr int kRowB = TileRow<T, kCols>;
  alignas(16) T dy[2][kRows][kRowA];  // patches x D (row-major A)
  alignas(16) T w[2][kDepth][kRowB];  // D x features (k-major B)
};

template <typename T>
__global__ void __launch_bounds__(kThreads)
    patch_embed_bwd_pixels_kernel(const __grid_constant__ Params p, const bool grad_vector,
                                  const bool weight_vector) {
  using Storage = PixelGradStorage<T>;
  VLMK_SHARED(Storage, sm);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int features = static_cast<int>(p.image.features);
  const int dim = static_cast<int>(p.dim);
  const int64_t patches = p.image.batch * p.image.patches_per_image;
  const int64_t patch_begin = static_cast<int64_t>(blockIdx.x) * kRows;
  const int feature_begin = blockIdx.y * kCols;
  const GradRow grad_row{p.image.patches_per_image, p.tokens, p.has_cls ? 1 : 0, p.dim, patches};
  const MatrixRow weight_row{p.dim, features};
  const T* grad_out = static_cast<const T*>(p.grad_out);
  const T* weight = static_cast<const T*>(p.weight);

  FragC acc[kTilesN];
  zero(acc);
  pipelined_steps(
      (dim + kDepth - 1) / kDepth,
      [&](int stage, int step) {
        copy_tile<T, kRows, kDepth>(&sm.dy[stage][0][0], Storage::kRowA, grad_out, grad_row,
                                    patch_begin, step * kDepth, dim, grad_vector);
        copy_tile<T, kDepth, kCols>(&sm.w[stage][0][0], Storage::kRowB, weight, weight_row,
                                    step * kDepth, feature_begin, features, weight_vector);
        tc::cp_async_commit();
      },
      [](int) {},  // both operands come by copy_tile
      [&](int stage) {
        warp_tile_mma<T, false, true>(acc, &sm.dy[stage][0][0], Storage::kRowA, &sm.w[stage][0][0],
                                      Storage::kRowB, 16 * warp);
      });

  // Accumulator element (patch row g + 8 h, feature column 8 j + 2 t + e) is acc[j].x[2 h + e].
  // grad_pixels is contiguous [B, C, H, W] (launched only with patches, so W / P > 0).
  const PatchEmbedPixels& g_img = p.image;
  const int64_t width = g_img.patches_w * g_img.patch;
  const int64_t height = g_img.patches_per_image / g_img.patches_w * g_img.patch;
  const int64_t stride_h = width, stride_c = height * width, stride_b = g_img.channels * stride_c;
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t patch = patch_begin + 16 * warp + g + 8 * h;
    if (patch >= patches) continue;
#pragma unroll
    for (int j = 0; j < kTilesN; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int feature = feature_begin + 8 * j + 2 * t + e;
        if (feature >= features) continue;
        int c = 0;
        const int64_t offset =
            pixel_offset(g_img, patch, feature, stride_b, stride_c, stride_h, 1, &c);
        float value = acc[j].x[2 * h + e];
        if (g_img.scale != nullptr) value *= g_img.scale[c];
        store_pixel(p.grad_pixels, offset, g_img.pixel_dtype, value);
      }
    }
  }
}

constexpr int kReduceThreads = 128;

// grad_pos[t, d] = sum_b grad_out[b, t, d] for the block's 16 tokens, and the bias partial
// bias_parts[token block, d] = sum over its patch tokens (t >= o) of those sums.
template <typename T>
__global__ void __launch_bounds__(kReduceThreads)
    patch_embed_bwd_pos_kernel(const __grid_constant__ Params p, float* bias_parts) {
  const int64_t d = static_cast<int64_t>(blockIdx.x) * kReduceThreads + threadIdx.x;
  if (d >= p.dim) return;
  const T* grad_out = static_cast<const T*>(p.grad_out);
  T* grad_pos = static_cast<T*>(p.grad_pos);
  const int64_t token_begin = static_cast<int64_t>(blockIdx.y) * kPatchEmbedTokensPerBlock;
  const int64_t token_end = min(p.tokens, token_begin + kPatchEmbedTokensPerBlock);
  const int64_t cls_rows = p.has_cls ? 1 : 0;
  const int64_t batch_stride = p.tokens * p.dim;
  float bias_sum = 0.0f;
  for (int64_t token = token_begin; token < token_end; ++token) {
    float sum = 0.0f;
    for (int64_t b = 0; b < p.image.batch; ++b) {
      sum += to_float(grad_out[b * batch_stride + token * p.dim + d]);
    }
    grad_pos[token * p.dim + d] = from_float<T>(sum);
    if (token >= cls_rows) bias_sum += sum;
  }
  bias_parts[blockIdx.y * p.dim + d] = bias_sum;
}

// out[i] = sum_s parts[s * count + i] over s in order, rounded once to T.
template <typename T>
__global__ void __launch_bounds__(kReduceThreads)
    patch_embed_sum_partials_kernel(const float* parts, int64_t num_parts, int64_t count, T* out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kReduceThreads + threadIdx.x;
  if (i >= count) return;
  float sum = 0.0f;
  for (int64_t s = 0; s < num_parts; ++s) sum += parts[s * count + i];
  out[i] = from_float<T>(sum);
}

template <typename T>
int launch_sum(const float* parts, int64_t num_parts, int64_t count, void* out,
               cudaStream_t stream) {
  const int64_t blocks = (count + kReduceThreads - 1) / kReduceThreads;
  if (blocks == 0) return 0;
  if (blocks > 0x7fffffff) return static_cast<int>(cudaErrorInvalidConfiguration);
  return static_cast<int>(VLMK_LAUNCH((patch_embed_sum_partials_kernel<T>),
                                      dim3(static_cast<unsigned>(blocks)), dim3(kReduceThreads), 0,
                                      stream, parts, num_parts, count, static_cast<T*>(out)));
}

template <typename T>
int launch_typed(const Params& p, cudaStream_t stream) {
  const int64_t features = p.image.features;
  const int64_t patches = p.image.batch * p.image.patches_per_image;
  const int64_t weight_floats = p.num_splits * p.dim * features;
  const bool grad_vector = vectorizable(p.grad_out, p.dim, sizeof(T));
  const bool weight_vector = vectorizable(p.weight, features, sizeof(T));
  cudaError_t status = cudaSuccess;

  // grad_pos and the bias partials, then grad_bias.
  const int64_t token_blocks =
      (p.tokens + kPatchEmbedTokensPerBlock - 1) / kPatchEmbedTokensPerBlock;
  const int64_t d_blocks = (p.dim + kReduceThreads - 1) / kReduceThreads;
  if (token_blocks > 65535 || d_blocks > 0x7fffffff) {
    return static_cast<int>(cudaErrorInvalidConfiguration);
  }
  float* bias_parts = p.workspace + weight_floats;
  status = VLMK_LAUNCH((patch_embed_bwd_pos_kernel<T>),
                       dim3(static_cast<unsigned>(d_blocks), static_cast<unsigned>(token_blocks)),
                       dim3(kReduceThreads), 0, stream, p, bias_parts);
  if (status != cudaSuccess) return static_cast<int>(status);
  int result = launch_sum<T>(bias_parts, token_blocks, p.dim, p.grad_bias, stream);
  if (result != 0) return result;

  // grad_weight: per-split partials, then their ordered sum.
  const int64_t feature_blocks = (features + kCols - 1) / kCols;
  const int64_t dim_blocks = (p.dim + kRows - 1) / kRows;
  if (feature_blocks > 0x7fffffff || dim_blocks > 65535 || p.num_splits > 65535) {
    return static_cast<int>(cudaErrorInvalidConfiguration);
  }
  if (features == 0) return 0;  // C = 0: grad_weight and grad_pixels are empty
  status = VLMK_LAUNCH((patch_embed_bwd_weight_kernel<T>),
                       dim3(static_cast<unsigned>(feature_blocks),
                            static_cast<unsigned>(dim_blocks), static_cast<unsigned>(p.num_splits)),
                       dim3(kThreads), 0, stream, p, grad_vector);
  if (status != cudaSuccess) return static_cast<int>(status);
  result = launch_sum<T>(p.workspace, p.num_splits, p.dim * features, p.grad_weight, stream);
  if (result != 0 || p.grad_pixels == nullptr || patches == 0) return result;

  const int64_t patch_blocks = (patches + kRows - 1) / kRows;
  if (patch_blocks > 0x7fffffff || feature_blocks > 65535) {
    return static_cast<int>(cudaErrorInvalidConfiguration);
  }
  status =
      VLMK_LAUNCH((patch_embed_bwd_pixels_kernel<T>),
                  dim3(static_cast<unsigned>(patch_blocks), static_cast<unsigned>(feature_blocks)),
                  dim3(kThreads), 0, stream, p, grad_vector, weight_vector);
  return static_cast<int>(status);
}

}  // namespace

int launch_patch_embed_bwd(const PatchEmbedBwdParams& params, void* stream) {
  const Params& p = params;
  const PatchEmbedPixels& g = p.image;
  const int64_t features = g.features;
  if (g.batch < 0 || g.channels < 0 || g.patch < 1 || g.patches_w < 0 || g.patches_per_image < 0 ||
      g.features != g.channels * g.patch * g.patch || p.dim < 0 ||
      p.tokens != g.patches_per_image + (p.has_cls ? 1 : 0) ||
      (g.scale == nullptr) != (g.shift == nullptr) ||
      (g.pixel_dtype == PatchEmbedPixelDtype::kUInt8 &&
       (g.scale == nullptr || p.grad_pixels != nullptr)) ||
      p.num_splits < 1 || p.num_splits > kPatchEmbedMaxSplits || p.rows_per_split < 1 ||
      p.rows_per_split % kPatchEmbedBlockDepth != 0 ||
      p.num_splits * p.rows_per_split < g.batch * g.patches_per_image) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  constexpr int64_t kIndexLimit = int64_t{1} << 30;
  if (features > kIndexLimit || p.dim > kIndexLimit) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  // No grad_out element: every gradient is zero, which the caller fills (nothing is launched).
  if (g.batch == 0 || p.tokens == 0 || p.dim == 0) return 0;
  if (p.workspace == nullptr) return static_cast<int>(cudaErrorInvalidValue);
  const cudaStream_t cuda_stream = static_cast<cudaStream_t>(stream);
  return VLMK_PE_DTYPE_SWITCH(p.dtype, [&] { return launch_typed<T>(p, cuda_stream); });
}

}  // namespace VLMK_PE_NAMESPACE
}  // namespace vlmk
