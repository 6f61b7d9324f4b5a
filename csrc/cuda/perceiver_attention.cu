// perceiver_attention forward kernel (semantics and params in perceiver_attention.h), FA2-style
// on tensor cores.
//
// Grid (ceil(Nl / kBlockM), Hq, B), 4 warps; a block owns kBlockM = 64 latent rows of one query
// head (16 per warp). Q is staged once in shared memory; the key/value tiles of kBlockN = 32 keys
// walk the media segment, then the latent segment, each read in place from its own tensor (the
// tile after the current one is in flight by cp.async while the current one is computed; tiles
// never straddle the two segments, keys past a segment's end are zero-filled and masked). Per
// tile: forward_tile_step (attention_tiles.cuh, the online-softmax step): S = Q K^T on
// mma.m16n8k16 (bf16/fp16) or 3xTF32 m16n8k8 (float32), padded media keys masked by a select,
// running max/sum in fp32, O += P V. Epilogue: O / sum and lse.
// The same source is compiled by nvcc (namespace vlmk::cuda) and, with VLMK_SIMT, as host C++ run
// by the SIMT emulator (namespace vlmk::sim, the cuda_sim backend).
//
// gpu-report: *perceiver_attention_fwd_kernel* tensor_cores
// Dynamic shared memory per instantiation (checked against the code by a static_assert below):
// gpu-report: *perceiver_attention_fwd_kernel<float,?64>* dynamic_smem=52224
// gpu-report: *perceiver_attention_fwd_kernel<float,?80>* dynamic_smem=64512
// gpu-report: *perceiver_attention_fwd_kernel<float,?96>* dynamic_smem=76800
// gpu-report: *perceiver_attention_fwd_kernel<float,?128>* dynamic_smem=101376
// gpu-report: *perceiver_attention_fwd_kernel<__half,?64>* dynamic_smem=27648
// gpu-report: *perceiver_attention_fwd_kernel<__half,?80>* dynamic_smem=33792
// gpu-report: *perceiver_attention_fwd_kernel<__half,?96>* dynamic_smem=39936
// gpu-report: *perceiver_attention_fwd_kernel<__half,?128>* dynamic_smem=52224
// gpu-report: *perceiver_attention_fwd_kernel<__nv_bfloat16,?64>* dynamic_smem=27648
// gpu-report: *perceiver_attention_fwd_kernel<__nv_bfloat16,?80>* dynamic_smem=33792
// gpu-report: *perceiver_attention_fwd_kernel<__nv_bfloat16,?96>* dynamic_smem=39936
// gpu-report: *perceiver_attention_fwd_kernel<__nv_bfloat16,?128>* dynamic_smem=52224
#include <cstdint>
#include <type_traits>

#include "common/cuda_compat.cuh"
#include "common/tensor_core.cuh"
#include "cuda/attention_tiles.cuh"
#include "cuda/perceiver_attention.h"
#include "cuda/perceiver_tiles.cuh"

#if defined(VLMK_SIMT)
#define VLMK_PA_NAMESPACE sim
#else
#define VLMK_PA_NAMESPACE cuda
#endif

#include "cuda/image_text_attention_dispatch.cuh"

namespace vlmk {
namespace VLMK_PA_NAMESPACE {
namespace {

using Params = PerceiverAttentionParams;
using namespace attention_tiles;

constexpr float kLn2 = 0.6931471805599453f;

template <typename T, int kHeadDim>
struct ForwardShape {
  static constexpr int kBlockM = kPerceiverAttentionBlockM;
  static constexpr int kBlockN = kPerceiverAttentionBlockN;
  static constexpr int kLd = kHeadDim + 16 / static_cast<int>(sizeof(T));  // +16 bytes a row
  // T: Q [kBlockM][kLd]; K, V [2 stages][kBlockN][kLd].
  static constexpr int kKvTile = kBlockN * kLd;
  static constexpr int kSmemBytes = (kBlockM * kLd + 4 * kKvTile) * sizeof(T);
  static_assert(kBlockM == 16 * kWarps, "a warp owns 16 query rows");
};

// Register budget: 16-bit inputs two blocks per SM (smem <= 52 KB), float32 one (<= 99 KB).
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kThreads, min_blocks_per_sm<T>())
    perceiver_attention_fwd_kernel(const __grid_constant__ Params p, const bool async) {
  using Shape = ForwardShape<T, kHeadDim>;
  constexpr int kBlockM = Shape::kBlockM, kBlockN = Shape::kBlockN, kLd = Shape::kLd;
  constexpr int kDimTiles = kHeadDim / 8;
  VLMK_DYNAMIC_SMEM(T, smem);
  T* q_s = smem;
  T* k_s = q_s + kBlockM * kLd;  // [2][kBlockN][kLd]
  T* v_s = k_s + 2 * Shape::kKvTile;

  const int row0 = blockIdx.x * kBlockM;
  const int64_t head = blockIdx.y;
  const int64_t batch = blockIdx.z;
  const int64_t kv_head = head / (p.heads_q / p.heads_kv);
  const int num_latents = static_cast<int>(p.num_latents);
  const int rows_valid = min(kBlockM, num_latents - row0);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int m0 = 16 * warp;

  const PerceiverSegments<T, kBlockN, kHeadDim> segments(p, batch, kv_head);
  const uint8_t* padding =
      p.media_padding_mask ? p.media_padding_mask + batch * p.mask_stride_batch : nullptr;
  const int tiles = segments.tiles;

  load_tile<T, kBlockM, kHeadDim>(q_s, kLd,
                                  static_cast<const T*>(p.q) + batch * p.q_stride_batch +
                                      row0 * p.q_stride_token + head * p.q_stride_head,
                                  p.q_stride_token, rows_valid, async);
  // Tile `tile`: kBlockN keys of the media segment (tile < media_tiles), else of the latents.
  auto prefetch = [&](int tile, int stage) {
    segments.load(tile, k_s + stage * Shape::kKvTile, v_s + stage * Shape::kKvTile, kLd, async);
  };
  prefetch(0, 0);
  tc::cp_async_commit();  // with Q

  FragC o[kDimTiles];
#pragma unroll
  for (int j = 0; j < kDimTiles; ++j) zero(o[j]);
  float row_max[2] = {-INFINITY, -INFINITY};  // running max of the log2-domain scores
  float row_sum[2] = {0.0f, 0.0f};  // this thread's share of the running sum of exp2(s - max)
  const float scale_log2 = p.scale * kLog2e;

  for (int tile = 0; tile < tiles; ++tile) {
    const int stage = tile & 1;
    if (tile + 1 < tiles) {
      // Stage `stage ^ 1` was last read in the previous iteration, which ended with a barrier.
      prefetch(tile + 1, stage ^ 1);
      tc::cp_async_commit();
      tc::cp_async_wait<1>();  // Q and the current tile have landed; the next one in flight
    } else {
      tc::cp_async_wait<0>();
    }
    __syncthreads();  // Q (first tile) and this stage's K / V are visible to every warp
    const auto keys = segments.keys(tile, padding, p.mask_stride_token);
    const int keys_valid = keys.valid;
    const uint8_t* tile_padding = keys.padding;
    const int64_t mask_stride = p.mask_stride_token;
    forward_tile_step<T, kHeadDim, kBlockN, kLd>(
        o, row_max, row_sum, q_s, k_s + stage * Shape::kKvTile, v_s + stage * Shape::kKvTile, m0,
        scale_log2, [&](int, int key) {
          return key < keys_valid &&
                 (tile_padding == nullptr || tile_padding[key * mask_stride] != 0);
        });
    __syncthreads();  // every warp is done with this stage before the next prefetch refills it
  }

  // Epilogue: every row saw at least its latent keys, so sum > 0 (NaN when NaN reached it).
  float* lse = p.lse + (batch * p.heads_q + head) * num_latents + row0;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    float sum = row_sum[half];
    sum += __shfl_xor_sync(kFullMask, sum, 1);
    sum += __shfl_xor_sync(kFullMask, sum, 2);
    const float inv_sum = 1.0f / sum;
#pragma unroll
    for (int j = 0; j < kDimTiles; ++j) {
      o[j].x[2 * half] *= inv_sum;
      o[j].x[2 * half + 1] *= inv_sum;
    }
    const int r = m0 + lane / 4 + 8 * half;
    if (lane % 4 == 0 && r < rows_valid) lse[r] = (row_max[half] + log2f(sum)) * kLn2;
  }
  T* out = static_cast<T*>(p.out) + ((batch * num_latents + row0) * p.heads_q + head) * kHeadDim;
  store_acc<T, kHeadDim>(out, p.heads_q * kHeadDim, o, m0, rows_valid, 1.0f);
}

// The report's dynamic_smem declarations at the top of this file.
static_assert(ForwardShape<float, 64>::kSmemBytes == 52224 &&
                  ForwardShape<float, 80>::kSmemBytes == 64512 &&
                  ForwardShape<float, 96>::kSmemBytes == 76800 &&
                  ForwardShape<float, 128>::kSmemBytes == 101376 &&
                  ForwardShape<__half, 64>::kSmemBytes == 27648 &&
                  ForwardShape<__half, 80>::kSmemBytes == 33792 &&
                  ForwardShape<__half, 96>::kSmemBytes == 39936 &&
                  ForwardShape<__half, 128>::kSmemBytes == 52224,
              "update the dynamic_smem lines of the forward kernel");

template <typename T, int kHeadDim>
int launch_typed(const Params& p, cudaStream_t stream) {
  // cp.async needs 16-byte aligned rows in global memory; otherwise plain loads.
  const bool async =
      aligned_16<T>(p.q, {p.q_stride_batch, p.q_stride_token, p.q_stride_head}) &&
      aligned_16<T>(p.k_media,
                    {p.k_media_stride_batch, p.k_media_stride_token, p.k_media_stride_head}) &&
      aligned_16<T>(p.v_media,
                    {p.v_media_stride_batch, p.v_media_stride_token, p.v_media_stride_head}) &&
      aligned_16<T>(p.k_latents, {p.k_latents_stride_batch, p.k_latents_stride_token,
                                  p.k_latents_stride_head}) &&
      aligned_16<T>(p.v_latents,
                    {p.v_latents_stride_batch, p.v_latents_stride_token, p.v_latents_stride_head});
  using Shape = ForwardShape<T, kHeadDim>;
  cudaError_t status =
      cudaFuncSetAttribute(perceiver_attention_fwd_kernel<T, kHeadDim>,
                           cudaFuncAttributeMaxDynamicSharedMemorySize, Shape::kSmemBytes);
  if (status != cudaSuccess) return static_cast<int>(status);
  const dim3 grid(static_cast<unsigned>((p.num_latents + Shape::kBlockM - 1) / Shape::kBlockM),
                  static_cast<unsigned>(p.heads_q), static_cast<unsigned>(p.batch));
  status = VLMK_LAUNCH((perceiver_attention_fwd_kernel<T, kHeadDim>), grid, dim3(kThreads),
                       Shape::kSmemBytes, stream, p, async);
  return static_cast<int>(status);
}

}  // namespace

int launch_perceiver_attention_fwd(const PerceiverAttentionParams& p, void* stream) {
  const bool sizes_ok = p.batch > 0 && p.num_latents > 0 && p.num_media >= 0 && p.heads_kv > 0 &&
                        p.heads_q > 0 && p.heads_q % p.heads_kv == 0 &&
                        p.num_latents * p.heads_q <= (int64_t{1} << 30) &&
                        p.num_media <= (int64_t{1} << 30) && p.batch <= 65535 && p.heads_q <= 65535;
  const bool pointers_ok = p.q && p.k_latents && p.v_latents && p.out && p.lse &&
                           (p.num_media == 0 || (p.k_media && p.v_media));
  if (!sizes_ok || !pointers_ok) return static_cast<int>(cudaErrorInvalidValue);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  return VLMK_ITA_DTYPE_SWITCH(p.dtype, [&] {
    return VLMK_ITA_HEAD_DIM_SWITCH(p.head_dim, [&] { return launch_typed<T, kHeadDim>(p, s); });
  });
}

}  // namespace VLMK_PA_NAMESPACE
}  // namespace vlmk
