// The pieces specific to the patch_embed forward (patch_embed.cu) and backward (patch_embed_bwd.cu)
// kernels: pixel loads and stores, the patch geometry and the register-staged patch gather with the
// fused normalization. The generic GEMM machinery (tile copies, the warp's tensor-core tile
// product, the double-buffered loop) is gemm_tiles.cuh, shared with the other implicit-GEMM ops.
#pragma once

#include <cstdint>
#include <type_traits>

#include "cuda/gemm_tiles.cuh"
#include "cuda/patch_embed.h"

#define VLMK_PE_NAMESPACE VLMK_GEMM_NAMESPACE

namespace vlmk {
namespace VLMK_PE_NAMESPACE {
namespace patch_embed_detail {

using namespace gemm_tiles;
static_assert(kRows == kPatchEmbedBlockRows && kCols == kPatchEmbedBlockCols &&
                  kDepth == kPatchEmbedBlockDepth,
              "the host planning constants must match the GEMM tile");

// Pixel element `offset` as float (the dtype is uniform over the launch: no divergence).
__device__ __forceinline__ float load_pixel(const void* pixels, int64_t offset,
                                            PatchEmbedPixelDtype dtype) {
  switch (dtype) {
    case PatchEmbedPixelDtype::kUInt8:
      return static_cast<float>(static_cast<const uint8_t*>(pixels)[offset]);
    case PatchEmbedPixelDtype::kFloat16:
      return __half2float(static_cast<const __half*>(pixels)[offset]);
    case PatchEmbedPixelDtype::kBFloat16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(pixels)[offset]);
    case PatchEmbedPixelDtype::kFloat32:
      return static_cast<const float*>(pixels)[offset];
    case PatchEmbedPixelDtype::kFloat64:
      return static_cast<float>(static_cast<const double*>(pixels)[offset]);
  }
  return 0.0f;
}

__device__ __forceinline__ void store_pixel(void* pixels, int64_t offset,
                                            PatchEmbedPixelDtype dtype, float value) {
  switch (dtype) {
    case PatchEmbedPixelDtype::kUInt8:  // no gradient (the launcher rejects it)
      break;
    case PatchEmbedPixelDtype::kFloat16:
      static_cast<__half*>(pixels)[offset] = __float2half_rn(value);
      break;
    case PatchEmbedPixelDtype::kBFloat16:
      static_cast<__nv_bfloat16*>(pixels)[offset] = __float2bfloat16_rn(value);
      break;
    case PatchEmbedPixelDtype::kFloat32:
      static_cast<float*>(pixels)[offset] = value;
      break;
    case PatchEmbedPixelDtype::kFloat64:
      static_cast<double*>(pixels)[offset] = static_cast<double>(value);
      break;
  }
}

// ---- patch geometry ----

// Offset of feature k of patch `patch` (over B*Np) in a [B, C, H, W] tensor with these strides.
__device__ __forceinline__ int64_t pixel_offset(const PatchEmbedPixels& g, int64_t patch,
                                                int feature, int64_t stride_b, int64_t stride_c,
                                                int64_t stride_h, int64_t stride_w, int* channel) {
  const int p = static_cast<int>(g.patch);
  const int64_t image = patch / g.patches_per_image;
  const int64_t i = patch - image * g.patches_per_image;
  const int64_t r = i / g.patches_w;
  const int64_t s = i - r * g.patches_w;
  const int c = feature / (p * p);
  const int uv = feature - c * p * p;
  const int u = uv / p;
  const int v = uv - u * p;
  *channel = c;
  return image * stride_b + c * stride_c + (r * p + u) * stride_h + (s * p + v) * stride_w;
}

// The image part X[rows, features] of a [kTileRows][kTileCols] tile, staged in registers: tile row
// j is GEMM row row_begin + j, a token of `rows_per_image` per image whose first `cls_rows` (0 or
// 1) tokens are CLS rows (zeros, they read no pixel); columns are features feature_begin.. (zeros
// past K). load() issues the pixel loads of the next step before the current step's MMAs, store()
// normalizes and writes them to shared memory after them, so the gather's global latency overlaps
// the tensor-core work (the pixels cannot go by cp.async: they are converted and normalized).
// A thread's elements share one tile column (kThreads is a multiple of kTileCols), so the channel,
// the feature's pixel offset and the normalization constants are computed once per step.
template <int kTileRows, int kTileCols>
struct PatchGather {
  static_assert(kThreads % kTileCols == 0, "a thread's elements must share one column");
  static constexpr int kCount = kTileRows * kTileCols / kThreads;  // elements per thread
  static constexpr int kRowStep = kThreads / kTileCols;            // rows between them
  static_assert(kCount <= 32, "one validity bit per element");
  float raw[kCount];
  unsigned valid = 0;  // bit i: element i lies in the image (else it is padding: 0)
  float scale = 1.0f;
  float shift = 0.0f;

  __device__ __forceinline__ void load(const PatchEmbedPixels& g, int64_t rows_per_image,
                                       int cls_rows, int64_t row_begin, int64_t row_end,
                                       int feature_begin, int features) {
    const int col = threadIdx.x % kTileCols;
    const int feature = feature_begin + col;
    valid = 0;
#pragma unroll
    for (int i = 0; i < kCount; ++i) raw[i] = 0.0f;
    if (feature >= features) return;
    const int p = static_cast<int>(g.patch);
    const int c = feature / (p * p);
    const int uv = feature - c * p * p;
    const int u = uv / p;
    const int v = uv - u * p;
    if (g.scale != nullptr) {
      scale = g.scale[c];
      shift = g.shift[c];
    }
    const int64_t feature_offset = c * g.stride_channel + u * g.stride_height + v * g.stride_width;
#pragma unroll
    for (int i = 0; i < kCount; ++i) {
      const int64_t row = row_begin + threadIdx.x / kTileCols + i * kRowStep;
      if (row >= row_end) continue;
      const int64_t image = row / rows_per_image;
      const int64_t token = row - image * rows_per_image;
      if (token < cls_rows) continue;
      const int64_t patch = token - cls_rows;
      const int64_t r = patch / g.patches_w;
      const int64_t s = patch - r * g.patches_w;
      const int64_t offset = image * g.stride_batch + (r * p) * g.stride_height +
                             (s * p) * g.stride_width + feature_offset;
      raw[i] = load_pixel(g.pixels, offset, g.pixel_dtype);
      valid |= 1u << i;
    }
  }

  // Normalized, converted to T, into the shared tile (row stride `stride`). Plain stores: the
  // caller's barrier publishes them.
  template <typename T>
  __device__ __forceinline__ void store(T* tile, int stride) const {
    const int col = threadIdx.x % kTileCols;
#pragma unroll
    for (int i = 0; i < kCount; ++i) {
      const int j = threadIdx.x / kTileCols + i * kRowStep;
      const float value = ((valid >> i) & 1u) != 0u ? fmaf(raw[i], scale, shift) : 0.0f;
      st_shared(&tile[j * stride + col], from_float<T>(value));
    }
  }
};

}  // namespace patch_embed_detail
}  // namespace VLMK_PE_NAMESPACE
}  // namespace vlmk

// Binds `T` (float, __half, __nv_bfloat16) for a PatchEmbedDtype; another value returns
// cudaErrorInvalidValue from the lambda.
#define VLMK_PE_DTYPE_SWITCH(DTYPE, ...)            \
  [&] {                                             \
    switch (DTYPE) {                                \
      case PatchEmbedDtype::kFloat32: {             \
        using T = float;                            \
        return __VA_ARGS__();                       \
      }                                             \
      case PatchEmbedDtype::kFloat16: {             \
        using T = __half;                           \
        return __VA_ARGS__();                       \
      }                                             \
      case PatchEmbedDtype::kBFloat16: {            \
        using T = __nv_bfloat16;                    \
        return __VA_ARGS__();                       \
      }                                             \
    }                                               \
    return static_cast<int>(cudaErrorInvalidValue); \
  }()
