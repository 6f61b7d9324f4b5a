// perceiver_attention backward kernels (semantics and params in perceiver_attention.h),
// FA2-style on tensor cores: dq, dk_media, dv_media, dk_latents, dv_latents of
//
//   out = softmax(scale * q [k_media ; k_latents]^T, padded media masked) [v_media ; v_latents]
//
// for the output cotangent grad_out, given the forward's out and lse. Three kernels, launched in
// order:
//   preprocess  delta = rowsum(grad_out * out)                       [B, Hq, Nl] float32
//   dk/dv       grid (ceil(Nm / 64) + ceil(Nl / 64), Hkv, B): a block owns 64 keys of one segment
//               (media blocks first) and one kv head, stages K/V once and walks every query block
//               of 32 latent rows times the query heads of the kv group (dkdv_tile_step; GQA sums
//               in registers, no atomics: deterministic). Padded media keys get dk = dv = 0
//               exactly (a select on their accumulator rows).
//   dq          grid (ceil(Nl / 64), Hq, B): a block owns 64 rows of one query head, stages Q and
//               dO once and walks the K/V tiles of 32 keys of the media segment, then the latent
//               segment (dq_tile_step), padded media keys masked.
// The tile steps, fragment loads per type and tile copies are those of image_text_attention's
// backward (attention_tiles.cuh): bf16 / fp16 on mma.m16n8k16 with fp32 accumulators (P and dS
// rounded to the input type for their products), float32 as 3xTF32 on mma.m16n8k8.
// The same source is compiled by nvcc (namespace vlmk::cuda) and, with VLMK_SIMT, as host C++ run
// by the SIMT emulator (namespace vlmk::sim, the cuda_sim backend).
//
// gpu-report: *perceiver_attention_bwd_dkdv_kernel* tensor_cores
// gpu-report: *perceiver_attention_bwd_dq_kernel* tensor_cores
// Dynamic shared memory per instantiation (checked against the code by static_asserts below):
// gpu-report: *perceiver_attention_bwd_dkdv_kernel<float,?64>* dynamic_smem=70400
// gpu-report: *perceiver_attention_bwd_dkdv_kernel<float,?80>* dynamic_smem=86784
// gpu-report: *perceiver_attention_bwd_dkdv_kernel<float,?96>* dynamic_smem=103168
// gpu-report: *perceiver_attention_bwd_dkdv_kernel<float,?128>* dynamic_smem=135936
// gpu-report: *perceiver_attention_bwd_dkdv_kernel<__half,?64>* dynamic_smem=37632
// gpu-report: *perceiver_attention_bwd_dkdv_kernel<__half,?80>* dynamic_smem=45824
// gpu-report: *perceiver_attention_bwd_dkdv_kernel<__half,?96>* dynamic_smem=54016
// gpu-report: *perceiver_attention_bwd_dkdv_kernel<__half,?128>* dynamic_smem=70400
// gpu-report: *perceiver_attention_bwd_dkdv_kernel<__nv_bfloat16,?64>* dynamic_smem=37632
// gpu-report: *perceiver_attention_bwd_dkdv_kernel<__nv_bfloat16,?80>* dynamic_smem=45824
// gpu-report: *perceiver_attention_bwd_dkdv_kernel<__nv_bfloat16,?96>* dynamic_smem=54016
// gpu-report: *perceiver_attention_bwd_dkdv_kernel<__nv_bfloat16,?128>* dynamic_smem=70400
// gpu-report: *perceiver_attention_bwd_dq_kernel<float,?64>* dynamic_smem=69632
// gpu-report: *perceiver_attention_bwd_dq_kernel<float,?80>* dynamic_smem=86016
// gpu-report: *perceiver_attention_bwd_dq_kernel<float,?96>* dynamic_smem=102400
// gpu-report: *perceiver_attention_bwd_dq_kernel<float,?128>* dynamic_smem=135168
// gpu-report: *perceiver_attention_bwd_dq_kernel<__half,?64>* dynamic_smem=36864
// gpu-report: *perceiver_attention_bwd_dq_kernel<__half,?80>* dynamic_smem=45056
// gpu-report: *perceiver_attention_bwd_dq_kernel<__half,?96>* dynamic_smem=53248
// gpu-report: *perceiver_attention_bwd_dq_kernel<__half,?128>* dynamic_smem=69632
// gpu-report: *perceiver_attention_bwd_dq_kernel<__nv_bfloat16,?64>* dynamic_smem=36864
// gpu-report: *perceiver_attention_bwd_dq_kernel<__nv_bfloat16,?80>* dynamic_smem=45056
// gpu-report: *perceiver_attention_bwd_dq_kernel<__nv_bfloat16,?96>* dynamic_smem=53248
// gpu-report: *perceiver_attention_bwd_dq_kernel<__nv_bfloat16,?128>* dynamic_smem=69632
#include <cstdint>
#include <type_traits>

#include "common/cuda_compat.cuh"
#include "common/tensor_core.cuh"
#include "cuda/attention_tiles.cuh"
#include "cuda/perceiver_attention.h"
#include "cuda/perceiver_tiles.cuh"

#if defined(VLMK_SIMT)
#define VLMK_PAB_NAMESPACE sim
#else
#define VLMK_PAB_NAMESPACE cuda
#endif

#include "cuda/image_text_attention_dispatch.cuh"

namespace vlmk {
namespace VLMK_PAB_NAMESPACE {
namespace {

using Params = PerceiverAttentionParams;
using namespace attention_tiles;

template <typename T, int kHeadDim>
using DkdvShape =
    DkdvTiles<T, kHeadDim, kPerceiverAttentionBwdBlockN, kPerceiverAttentionBwdBlockM>;
template <typename T, int kHeadDim>
using DqShape = DqTiles<T, kHeadDim, kPerceiverAttentionBlockM, kPerceiverAttentionBlockN>;

// ---- preprocess: delta = rowsum(dO * O), one warp per (b, t, h) row ----

template <typename T>
__global__ void __launch_bounds__(kThreads)
    perceiver_attention_bwd_preprocess_kernel(const __grid_constant__ Params p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= p.batch * p.num_latents * p.heads_q) return;  // whole warps leave; no barrier
  const int64_t head = row % p.heads_q;
  const int64_t t = (row / p.heads_q) % p.num_latents;
  const int64_t b = row / (p.heads_q * p.num_latents);
  const T* o = static_cast<const T*>(p.fwd_out) + b * p.out_stride_batch + t * p.out_stride_token +
               head * p.out_stride_head;
  const T* g = static_cast<const T*>(p.grad_out) + b * p.grad_stride_batch +
               t * p.grad_stride_token + head * p.grad_stride_head;
  const float sum = row_dot(o, g, static_cast<int>(p.head_dim));
  if (threadIdx.x % 32 == 0) p.delta[(b * p.heads_q + head) * p.num_latents + t] = sum;
}

// ---- dk / dv ----

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kThreads, min_blocks_per_sm<T>())
    perceiver_attention_bwd_dkdv_kernel(const __grid_constant__ Params p, const bool async) {
  using Shape = DkdvShape<T, kHeadDim>;
  constexpr int kBlockN = Shape::kBlockN, kBlockM = Shape::kBlockM, kLd = Shape::kLd;
  constexpr int kDimTiles = kHeadDim / 8;
  VLMK_DYNAMIC_SMEM(unsigned char, smem);
  T* k_s = reinterpret_cast<T*>(smem);
  T* v_s = k_s + kBlockN * kLd;
  T* q_s = v_s + kBlockN * kLd;  // [2][kBlockM][kLd]
  T* do_s = q_s + 2 * Shape::kTile;
  float* lse_s = reinterpret_cast<float*>(smem + Shape::kStatsOffset);  // [2][kBlockM]
  float* delta_s = lse_s + 2 * kBlockM;
  float* visible_s = delta_s + 2 * kBlockM;  // 1.0f: a real query row of the step

  const int num_media = static_cast<int>(p.num_media);
  const int num_latents = static_cast<int>(p.num_latents);
  const int media_blocks = (num_media + kBlockN - 1) / kBlockN;
  const bool media = static_cast<int>(blockIdx.x) < media_blocks;
  const int key0 = (media ? blockIdx.x : blockIdx.x - media_blocks) * kBlockN;
  const int keys_valid = min(kBlockN, (media ? num_media : num_latents) - key0);
  const int64_t segment_len = media ? p.num_media : p.num_latents;
  const int kv_head = blockIdx.y;
  const int64_t batch = blockIdx.z;
  const int group = static_cast<int>(p.heads_q / p.heads_kv);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;

  const int64_t out_stride = p.heads_kv * kHeadDim;  // dk, dv: contiguous [B, N, Hkv, Dh]
  const int64_t out_offset = ((batch * segment_len + key0) * p.heads_kv + kv_head) * kHeadDim;
  T* dk = static_cast<T*>(media ? p.dk_media : p.dk_latents) + out_offset;
  T* dv = static_cast<T*>(media ? p.dv_media : p.dv_latents) + out_offset;

  const T* k_src = media ? static_cast<const T*>(p.k_media) + batch * p.k_media_stride_batch +
                               key0 * p.k_media_stride_token + kv_head * p.k_media_stride_head
                         : static_cast<const T*>(p.k_latents) + batch * p.k_latents_stride_batch +
                               key0 * p.k_latents_stride_token + kv_head * p.k_latents_stride_head;
  const T* v_src = media ? static_cast<const T*>(p.v_media) + batch * p.v_media_stride_batch +
                               key0 * p.v_media_stride_token + kv_head * p.v_media_stride_head
                         : static_cast<const T*>(p.v_latents) + batch * p.v_latents_stride_batch +
                               key0 * p.v_latents_stride_token + kv_head * p.v_latents_stride_head;
  load_tile<T, kBlockN, kHeadDim>(k_s, kLd, k_src,
                                  media ? p.k_media_stride_token : p.k_latents_stride_token,
                                  keys_valid, async);
  load_tile<T, kBlockN, kHeadDim>(v_s, kLd, v_src,
                                  media ? p.v_media_stride_token : p.v_latents_stride_token,
                                  keys_valid, async);
  tc::cp_async_commit();

  // Stages step `step` (query block x head of the group) into buffer `stage`.
  auto prefetch = [&](int step, int stage) {
    const int query_block = step / group;
    const int64_t head = static_cast<int64_t>(kv_head) * group + (step - query_block * group);
    const int row0 = query_block * kBlockM;
    const int rows_valid = min(kBlockM, num_latents - row0);
    load_tile<T, kBlockM, kHeadDim>(q_s + stage * Shape::kTile, kLd,
                                    static_cast<const T*>(p.q) + batch * p.q_stride_batch +
                                        row0 * p.q_stride_token + head * p.q_stride_head,
                                    p.q_stride_token, rows_valid, async);
    load_tile<T, kBlockM, kHeadDim>(do_s + stage * Shape::kTile, kLd,
                                    static_cast<const T*>(p.grad_out) +
                                        batch * p.grad_stride_batch + row0 * p.grad_stride_token +
                                        head * p.grad_stride_head,
                                    p.grad_stride_token, rows_valid, async);
    if (threadIdx.x < kBlockM) {
      const int i = threadIdx.x;
      const bool valid = i < rows_valid;
      const int64_t stats = (batch * p.heads_q + head) * num_latents + row0 + i;
      st_shared(&lse_s[stage * kBlockM + i], valid ? p.lse[stats] * kLog2e : 0.0f);
      st_shared(&delta_s[stage * kBlockM + i], valid ? p.delta[stats] : 0.0f);
      st_shared(&visible_s[stage * kBlockM + i], valid ? 1.0f : 0.0f);
    }
  };

  FragC dk_acc[kDimTiles], dv_acc[kDimTiles];
#pragma unroll
  for (int j = 0; j < kDimTiles; ++j) {
    zero(dk_acc[j]);
    zero(dv_acc[j]);
  }
  const float scale_log2 = p.scale * kLog2e;
  const int m0 = 16 * warp;  // this warp's keys in the block
  // Keys past the segment's end (zero-filled) get P = 0: rows g and g + 8 of the warp's 16 keys.
  // Padded media keys are not masked in the loop: a key's P and dS reach only its own rows of dK
  // and dV, which the epilogue sets to 0 by a select (the padding flags held across the loop cost
  // ptxas 8 bytes of spills at Dh = 128, 16-bit, sm_90a).
  const bool key_ok[2] = {m0 + lane / 4 < keys_valid, m0 + lane / 4 + 8 < keys_valid};

  const int steps = ((num_latents + kBlockM - 1) / kBlockM) * group;
  prefetch(0, 0);
  tc::cp_async_commit();
  for (int step = 0; step < steps; ++step) {
    const int stage = step & 1;
    if (step + 1 < steps) {
      prefetch(step + 1, stage ^ 1);
      tc::cp_async_commit();
      tc::cp_async_wait<1>();  // everything but the step just issued has landed
    } else {
      tc::cp_async_wait<0>();
    }
    __syncthreads();  // every thread's copies (and stats) of this stage are visible
    dkdv_tile_step<T, kHeadDim, kBlockM, kLd>(dk_acc, dv_acc, k_s, v_s, q_s + stage * Shape::kTile,
                                              do_s + stage * Shape::kTile, lse_s + stage * kBlockM,
                                              delta_s + stage * kBlockM,
                                              visible_s + stage * kBlockM, key_ok, m0, scale_log2);
    __syncthreads();  // every warp is done with this stage before the next prefetch refills it
  }
  if (media && p.media_padding_mask != nullptr) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int key = m0 + lane / 4 + 8 * half;
      const bool padded =
          key < keys_valid &&
          p.media_padding_mask[batch * p.mask_stride_batch + (key0 + key) * p.mask_stride_token] ==
              0;
#pragma unroll
      for (int j = 0; j < kDimTiles; ++j) {
#pragma unroll
        for (int e = 2 * half; e < 2 * half + 2; ++e) {
          dk_acc[j].x[e] = padded ? 0.0f : dk_acc[j].x[e];
          dv_acc[j].x[e] = padded ? 0.0f : dv_acc[j].x[e];
        }
      }
    }
  }
  store_acc<T, kHeadDim>(dk, out_stride, dk_acc, m0, keys_valid, p.scale);
  store_acc<T, kHeadDim>(dv, out_stride, dv_acc, m0, keys_valid, 1.0f);
}

// ---- dq ----

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kThreads, min_blocks_per_sm<T>())
    perceiver_attention_bwd_dq_kernel(const __grid_constant__ Params p, const bool async) {
  using Shape = DqShape<T, kHeadDim>;
  constexpr int kBlockN = Shape::kBlockN, kBlockM = Shape::kBlockM, kLd = Shape::kLd;
  constexpr int kDimTiles = kHeadDim / 8;
  VLMK_DYNAMIC_SMEM(T, smem);
  T* q_s = smem;
  T* do_s = q_s + kBlockM * kLd;
  T* k_s = do_s + kBlockM * kLd;  // [2][kBlockN][kLd]
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
  load_tile<T, kBlockM, kHeadDim>(do_s, kLd,
                                  static_cast<const T*>(p.grad_out) + batch * p.grad_stride_batch +
                                      row0 * p.grad_stride_token + head * p.grad_stride_head,
                                  p.grad_stride_token, rows_valid, async);
  auto prefetch = [&](int tile, int stage) {
    segments.load(tile, k_s + stage * Shape::kKvTile, v_s + stage * Shape::kKvTile, kLd, async);
  };
  prefetch(0, 0);
  tc::cp_async_commit();  // with Q and dO

  // This lane's rows (g and g + 8 of the warp's 16): lse (log2 domain), delta, validity.
  float lse2[2], delta[2];
  bool row_ok[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = m0 + lane / 4 + 8 * half;
    row_ok[half] = r < rows_valid;
    const int64_t stats = (batch * p.heads_q + head) * num_latents + row0 + (row_ok[half] ? r : 0);
    lse2[half] = row_ok[half] ? p.lse[stats] * kLog2e : 0.0f;
    delta[half] = row_ok[half] ? p.delta[stats] : 0.0f;
  }
  FragC dq_acc[kDimTiles];
#pragma unroll
  for (int j = 0; j < kDimTiles; ++j) zero(dq_acc[j]);
  const float scale_log2 = p.scale * kLog2e;

  for (int tile = 0; tile < tiles; ++tile) {
    const int stage = tile & 1;
    if (tile + 1 < tiles) {
      prefetch(tile + 1, stage ^ 1);
      tc::cp_async_commit();
      tc::cp_async_wait<1>();
    } else {
      tc::cp_async_wait<0>();
    }
    __syncthreads();  // Q / dO (first tile) and this stage's K / V are visible
    const auto keys = segments.keys(tile, padding, p.mask_stride_token);
    const int keys_valid = keys.valid;
    const uint8_t* tile_padding = keys.padding;
    const int64_t mask_stride = p.mask_stride_token;
    dq_tile_step<T, kHeadDim, kBlockN, kLd>(
        dq_acc, q_s, do_s, k_s + stage * Shape::kKvTile, v_s + stage * Shape::kKvTile, m0, lse2,
        delta, scale_log2, [&](int half, int key) {
          return row_ok[half] && key < keys_valid &&
                 (tile_padding == nullptr || tile_padding[key * mask_stride] != 0);
        });
    __syncthreads();  // every warp is done with this stage before the next prefetch refills it
  }
  T* dq = static_cast<T*>(p.dq) + ((batch * num_latents + row0) * p.heads_q + head) * kHeadDim;
  store_acc<T, kHeadDim>(dq, p.heads_q * kHeadDim, dq_acc, m0, rows_valid, p.scale);
}

// The report's dynamic_smem declarations at the top of this file.
static_assert(
    DkdvShape<float, 64>::kSmemBytes == 70400 && DkdvShape<float, 80>::kSmemBytes == 86784 &&
        DkdvShape<float, 96>::kSmemBytes == 103168 && DkdvShape<float, 128>::kSmemBytes == 135936 &&
        DkdvShape<__half, 64>::kSmemBytes == 37632 && DkdvShape<__half, 80>::kSmemBytes == 45824 &&
        DkdvShape<__half, 96>::kSmemBytes == 54016 && DkdvShape<__half, 128>::kSmemBytes == 70400,
    "update the dynamic_smem lines of the dk/dv kernel");
static_assert(DqShape<float, 64>::kSmemBytes == 69632 && DqShape<float, 80>::kSmemBytes == 86016 &&
                  DqShape<float, 96>::kSmemBytes == 102400 &&
                  DqShape<float, 128>::kSmemBytes == 135168 &&
                  DqShape<__half, 64>::kSmemBytes == 36864 &&
                  DqShape<__half, 80>::kSmemBytes == 45056 &&
                  DqShape<__half, 96>::kSmemBytes == 53248 &&
                  DqShape<__half, 128>::kSmemBytes == 69632,
              "update the dynamic_smem lines of the dq kernel");

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
      aligned_16<T>(p.v_latents, {p.v_latents_stride_batch, p.v_latents_stride_token,
                                  p.v_latents_stride_head}) &&
      aligned_16<T>(p.grad_out, {p.grad_stride_batch, p.grad_stride_token, p.grad_stride_head});

  const int64_t rows = p.batch * p.num_latents * p.heads_q;
  cudaError_t status = VLMK_LAUNCH((perceiver_attention_bwd_preprocess_kernel<T>),
                                   dim3(static_cast<unsigned>((rows + kWarps - 1) / kWarps)),
                                   dim3(kThreads), 0, stream, p);
  if (status != cudaSuccess) return static_cast<int>(status);

  using Dkdv = DkdvShape<T, kHeadDim>;
  status = cudaFuncSetAttribute(perceiver_attention_bwd_dkdv_kernel<T, kHeadDim>,
                                cudaFuncAttributeMaxDynamicSharedMemorySize, Dkdv::kSmemBytes);
  if (status != cudaSuccess) return static_cast<int>(status);
  const int64_t key_blocks = (p.num_media + Dkdv::kBlockN - 1) / Dkdv::kBlockN +
                             (p.num_latents + Dkdv::kBlockN - 1) / Dkdv::kBlockN;
  status = VLMK_LAUNCH((perceiver_attention_bwd_dkdv_kernel<T, kHeadDim>),
                       dim3(static_cast<unsigned>(key_blocks), static_cast<unsigned>(p.heads_kv),
                            static_cast<unsigned>(p.batch)),
                       dim3(kThreads), Dkdv::kSmemBytes, stream, p, async);
  if (status != cudaSuccess) return static_cast<int>(status);

  using Dq = DqShape<T, kHeadDim>;
  status = cudaFuncSetAttribute(perceiver_attention_bwd_dq_kernel<T, kHeadDim>,
                                cudaFuncAttributeMaxDynamicSharedMemorySize, Dq::kSmemBytes);
  if (status != cudaSuccess) return static_cast<int>(status);
  status = VLMK_LAUNCH((perceiver_attention_bwd_dq_kernel<T, kHeadDim>),
                       dim3(static_cast<unsigned>((p.num_latents + Dq::kBlockM - 1) / Dq::kBlockM),
                            static_cast<unsigned>(p.heads_q), static_cast<unsigned>(p.batch)),
                       dim3(kThreads), Dq::kSmemBytes, stream, p, async);
  return static_cast<int>(status);
}

}  // namespace

int launch_perceiver_attention_bwd(const PerceiverAttentionParams& p, void* stream) {
  const bool sizes_ok = p.batch > 0 && p.num_latents > 0 && p.num_media >= 0 && p.heads_kv > 0 &&
                        p.heads_q > 0 && p.heads_q % p.heads_kv == 0 &&
                        p.num_latents * p.heads_q <= (int64_t{1} << 30) &&
                        p.num_media <= (int64_t{1} << 30) && p.batch <= 65535 && p.heads_q <= 65535;
  const bool pointers_ok =
      p.q && p.k_latents && p.v_latents && p.lse && p.grad_out && p.fwd_out && p.delta && p.dq &&
      p.dk_latents && p.dv_latents &&
      (p.num_media == 0 || (p.k_media && p.v_media && p.dk_media && p.dv_media));
  if (!sizes_ok || !pointers_ok) return static_cast<int>(cudaErrorInvalidValue);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  return VLMK_ITA_DTYPE_SWITCH(p.dtype, [&] {
    return VLMK_ITA_HEAD_DIM_SWITCH(p.head_dim, [&] { return launch_typed<T, kHeadDim>(p, s); });
  });
}

}  // namespace VLMK_PAB_NAMESPACE
}  // namespace vlmk
