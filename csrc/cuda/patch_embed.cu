// patch_embed forward kernel (semantics and params in patch_embed.h): the implicit GEMM
// out[B*N, D] = X[B*N, K] W^T on tensor cores with the patch gather in the A-tile load and bias +
// CLS + pos_embed in the epilogue.
//
// Grid (ceil(B*N / 64), ceil(D / 64)), 4 warps; GEMM rows are output tokens (a CLS row reads no
// pixel: its A row is zero), so the output is written row-major in one pass. Per reduction step of
// 32 features, double-buffered (patch_embed_tiles.cuh):
//   A  [64 tokens][32 features]: gathered from the image with the normalization fused
//      (x * scale[c] + shift[c], uint8 included), converted to the weight's dtype; staged in
//      registers (PatchGather: the loads of step s + 1 are issued before step s's MMAs, stored to
//      shared memory after them);
//   B  [64 D][32 features] of the weight ([D, K], K contiguous): cp.async 16 B when K and the
//      pointer allow it (zero-fill past K / D), else element copies;
//   mma m16n8k16 (bf16 / fp16; ldmatrix.x4 for both operands) or 3xTF32 m16n8k8 (float32).
// Epilogue in float32: + bias + pos[token] (CLS row: cls + pos[0]), one rounding to the weight's
// dtype.
// gpu-report: *patch_embed_fwd_kernel* tensor_cores
#include <cstdint>

#include "cuda/patch_embed_tiles.cuh"

namespace vlmk {
namespace VLMK_PE_NAMESPACE {
namespace {

using namespace patch_embed_detail;

template <typename T>
struct FwdStorage {
  static constexpr int kRowA = TileRow<T, kDepth>;
  static constexpr int kRowB = TileRow<T, kDepth>;
  alignas(16) T a[2][kRows][kRowA];  // tokens x features
  alignas(16) T b[2][kCols][kRowB];  // D x features (n-major)
};

template <typename T>
__global__ void __launch_bounds__(kThreads)
    patch_embed_fwd_kernel(const __grid_constant__ PatchEmbedParams p, const bool weight_vector) {
  using Storage = FwdStorage<T>;
  VLMK_SHARED(Storage, sm);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t rows_total = p.image.batch * p.tokens;
  const int64_t row_begin = static_cast<int64_t>(blockIdx.x) * kRows;
  const int col_begin = blockIdx.y * kCols;
  const int dim = static_cast<int>(p.dim);
  const int features = static_cast<int>(p.image.features);
  const int cls_rows = p.cls != nullptr ? 1 : 0;
  const T* weight = static_cast<const T*>(p.weight);

  FragC acc[kTilesN];
  zero(acc);
  const auto weight_row = [&](int64_t d) -> int64_t { return d < dim ? d * features : -1; };
  PatchGather<kRows, kDepth> gather;
  pipelined_steps(
      (features + kDepth - 1) / kDepth,
      [&](int stage, int step) {
        copy_tile<T, kCols, kDepth>(&sm.b[stage][0][0], Storage::kRowB, weight, weight_row,
                                    col_begin, step * kDepth, features, weight_vector);
        tc::cp_async_commit();
        gather.load(p.image, p.tokens, cls_rows, row_begin, rows_total, step * kDepth, features);
      },
      [&](int stage) { gather.store(&sm.a[stage][0][0], Storage::kRowA); },
      [&](int stage) {
        warp_tile_mma<T, false, false>(acc, &sm.a[stage][0][0], Storage::kRowA, &sm.b[stage][0][0],
                                       Storage::kRowB, 16 * warp);
      });

  // Accumulator element (row g + 8 h, column 8 j + 2 t + e) is acc[j].x[2 h + e].
  const int g = lane / 4, t = lane % 4;
  const T* bias = static_cast<const T*>(p.bias);
  const T* cls = static_cast<const T*>(p.cls);
  const T* pos = static_cast<const T*>(p.pos);
  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t row = row_begin + 16 * warp + g + 8 * h;
    if (row >= rows_total) continue;
    const int64_t token = row % p.tokens;
    const bool is_cls = token < cls_rows;
#pragma unroll
    for (int j = 0; j < kTilesN; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = col_begin + 8 * j + 2 * t + e;
        if (col >= dim) continue;
        float value = is_cls ? to_float(cls[col]) : acc[j].x[2 * h + e];
        if (bias != nullptr && !is_cls) value += to_float(bias[col]);
        if (pos != nullptr) value += to_float(pos[token * dim + col]);
        out[row * dim + col] = from_float<T>(value);
      }
    }
  }
}

template <typename T>
int launch_typed(const PatchEmbedParams& p, cudaStream_t stream) {
  const int64_t features = p.image.features;
  const bool weight_vector = vectorizable(p.weight, features, sizeof(T));
  const int64_t row_blocks = (p.image.batch * p.tokens + kRows - 1) / kRows;
  const int64_t col_blocks = (p.dim + kCols - 1) / kCols;
  if (row_blocks > 0x7fffffff || col_blocks > 65535) {
    return static_cast<int>(cudaErrorInvalidConfiguration);
  }
  const dim3 grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>(col_blocks));
  return static_cast<int>(
      VLMK_LAUNCH((patch_embed_fwd_kernel<T>), grid, dim3(kThreads), 0, stream, p, weight_vector));
}

}  // namespace

int launch_patch_embed_fwd(const PatchEmbedParams& params, void* stream) {
  const PatchEmbedParams& p = params;
  const PatchEmbedPixels& g = p.image;
  if (g.batch < 0 || g.channels < 0 || g.patch < 1 || g.patches_w < 0 || g.patches_per_image < 0 ||
      g.features != g.channels * g.patch * g.patch || p.dim < 0 ||
      p.tokens != g.patches_per_image + (p.cls != nullptr ? 1 : 0) ||
      (g.scale == nullptr) != (g.shift == nullptr) ||
      (g.pixel_dtype == PatchEmbedPixelDtype::kUInt8 && g.scale == nullptr)) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  // Features, columns and the token index within an image are int in the kernel.
  constexpr int64_t kIndexLimit = int64_t{1} << 30;
  if (g.features > kIndexLimit || p.dim > kIndexLimit) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  if (g.batch == 0 || p.tokens == 0 || p.dim == 0) return 0;
  const cudaStream_t cuda_stream = static_cast<cudaStream_t>(stream);
  return VLMK_PE_DTYPE_SWITCH(p.dtype, [&] { return launch_typed<T>(p, cuda_stream); });
}

}  // namespace VLMK_PE_NAMESPACE
}  // namespace vlmk
