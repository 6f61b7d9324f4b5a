// image_text_attention backward kernels, FA2-style on tensor cores (semantics, params and the
// kernel split in image_text_attention_bwd.h).
//
// Notation: P = exp2(S * scale * log2(e) - lse * log2(e)) on visible (row, key) pairs, else 0;
// dP = dO V^T; dS = P * (dP - delta); dV = P^T dO; dK = scale * dS^T Q; dQ = scale * dS K.
// Masking is a select, never a multiply, so NaN in a key/value a row does not see cannot reach
// that row's P or dS (a chunk that no row of a block sees is not even loaded: the schedules).
//
// dk/dv kernel: grid (M * ceil(media_len / kBlockN), Hkv, B), 4 warps. The block's kBlockN = 64
//   keys lie in one chunk (tiles start at the chunk's first key, the last one is zero-filled past
//   the chunk's end); warp w owns keys 16w..16w+15, i.e. the m16 rows of dK^T-side products:
//     S^T  = K Q^T     A: K rows (ldmatrix.x4 from smem), B: Q as [n=query][k=d] (ldmatrix.x4)
//     dP^T = V dO^T    A: V rows, B: dO as [n][k]
//     dV  += P^T dO    A: P^T from the S^T accumulators in registers, B: dO [k=query][n=d]
//                      through ldmatrix.x4.trans
//     dK  += dS^T Q    A: dS^T from registers, B: Q through ldmatrix.x4.trans
//   K and V are staged once; the Q / dO tiles (kBlockM = 32 rows of one query head) and the
//   rows' lse, delta and visibility of the chunk are double-buffered: step s + 1 is in flight
//   (cp.async) while step s computes. Steps = (query blocks that see the chunk) x (query heads
//   of the kv group), so dK and dV sum the group's heads in registers and are written once.
// dq kernel: grid (ceil(Lq / kBlockM), Hq, B), 4 warps, kBlockM = 64 rows (16 per warp) of one
//   query head; Q and dO staged once, K/V tiles of kBlockN = 32 keys double-buffered over the
//   scheduled chunks' tiles:
//     S  = Q K^T       A: Q (ldmatrix.x4), B: K as [n=key][k=d] (ldmatrix.x4)
//     dP = dO V^T      A: dO, B: V as [n][k]
//     dQ += dS K       A: dS from registers, B: K [k=key][n=d] through ldmatrix.x4.trans
// preprocess: one warp per (b, t, h) row: delta = sum_d dO * O in fp32.
// The tile steps (dkdv_tile_step, dq_tile_step), the fragment loads / MMAs per type (TensorOps)
// and the tile copies live in attention_tiles.cuh, shared with perceiver_attention.
// Precision: bf16 / fp16 inputs on mma.m16n8k16 with fp32 accumulators, P and dS rounded to the
// input dtype for their products (as FlashAttention-2 and our Triton backward do). float32 inputs
// on mma.m16n8k8 tf32 as 3xTF32 (hi = tf32(x), lo = tf32(x - hi), a b ~ ah bh + ah bl + al bh),
// fp32-level accuracy; their fragments are loaded by scalar shared loads (ldmatrix moves 16-bit
// elements) and P / dS reach the A layout of m16n8k8 by quad shuffles.
// Shared memory rows are padded by 16 bytes: ldmatrix rows of consecutive lanes then fall in
// different banks (row pitch an odd number of 16-byte units), and the float32 g/t-pattern loads
// are conflict-free. Shared memory is touched only through cp.async / ldmatrix / ld_shared /
// st_shared, so the emulator's race checker sees every access.
// The same source is compiled by nvcc (namespace vlmk::cuda) and, with VLMK_SIMT, as host C++ run
// by the SIMT emulator (namespace vlmk::sim, the cuda_sim backend).
//
// gpu-report: *image_text_attention_bwd_dkdv_kernel* tensor_cores
// gpu-report: *image_text_attention_bwd_dq_kernel* tensor_cores
// Dynamic shared memory per instantiation (checked against the code by static_asserts below):
// gpu-report: *image_text_attention_bwd_dkdv_kernel<float,?64>* dynamic_smem=70400
// gpu-report: *image_text_attention_bwd_dkdv_kernel<float,?80>* dynamic_smem=86784
// gpu-report: *image_text_attention_bwd_dkdv_kernel<float,?96>* dynamic_smem=103168
// gpu-report: *image_text_attention_bwd_dkdv_kernel<float,?128>* dynamic_smem=135936
// gpu-report: *image_text_attention_bwd_dkdv_kernel<__half,?64>* dynamic_smem=37632
// gpu-report: *image_text_attention_bwd_dkdv_kernel<__half,?80>* dynamic_smem=45824
// gpu-report: *image_text_attention_bwd_dkdv_kernel<__half,?96>* dynamic_smem=54016
// gpu-report: *image_text_attention_bwd_dkdv_kernel<__half,?128>* dynamic_smem=70400
// gpu-report: *image_text_attention_bwd_dkdv_kernel<__nv_bfloat16,?64>* dynamic_smem=37632
// gpu-report: *image_text_attention_bwd_dkdv_kernel<__nv_bfloat16,?80>* dynamic_smem=45824
// gpu-report: *image_text_attention_bwd_dkdv_kernel<__nv_bfloat16,?96>* dynamic_smem=54016
// gpu-report: *image_text_attention_bwd_dkdv_kernel<__nv_bfloat16,?128>* dynamic_smem=70400
// gpu-report: *image_text_attention_bwd_dq_kernel<float,?64>* dynamic_smem=69632
// gpu-report: *image_text_attention_bwd_dq_kernel<float,?80>* dynamic_smem=86016
// gpu-report: *image_text_attention_bwd_dq_kernel<float,?96>* dynamic_smem=102400
// gpu-report: *image_text_attention_bwd_dq_kernel<float,?128>* dynamic_smem=135168
// gpu-report: *image_text_attention_bwd_dq_kernel<__half,?64>* dynamic_smem=36864
// gpu-report: *image_text_attention_bwd_dq_kernel<__half,?80>* dynamic_smem=45056
// gpu-report: *image_text_attention_bwd_dq_kernel<__half,?96>* dynamic_smem=53248
// gpu-report: *image_text_attention_bwd_dq_kernel<__half,?128>* dynamic_smem=69632
// gpu-report: *image_text_attention_bwd_dq_kernel<__nv_bfloat16,?64>* dynamic_smem=36864
// gpu-report: *image_text_attention_bwd_dq_kernel<__nv_bfloat16,?80>* dynamic_smem=45056
// gpu-report: *image_text_attention_bwd_dq_kernel<__nv_bfloat16,?96>* dynamic_smem=53248
// gpu-report: *image_text_attention_bwd_dq_kernel<__nv_bfloat16,?128>* dynamic_smem=69632
#include <cstdint>
#include <type_traits>

#include "common/cuda_compat.cuh"
#include "common/tensor_core.cuh"
#include "cuda/attention_tiles.cuh"
#include "cuda/image_text_attention_bwd.h"

#if defined(VLMK_SIMT)
#define VLMK_ITAB_NAMESPACE sim
#else
#define VLMK_ITAB_NAMESPACE cuda
#endif

#include "cuda/image_text_attention_dispatch.cuh"

namespace vlmk {
namespace VLMK_ITAB_NAMESPACE {
namespace {

using Params = ImageTextAttentionBwdParams;
using namespace attention_tiles;

// ---- preprocess: delta = rowsum(dO * O) ----

template <typename T>
__global__ void __launch_bounds__(kThreads)
    image_text_attention_bwd_preprocess_kernel(const Params p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int64_t rows = p.batch * p.query_len * p.heads_q;
  if (row >= rows) return;  // whole warps leave; no barrier follows
  const int lane = threadIdx.x % 32;
  const int64_t head = row % p.heads_q;
  const int64_t t = (row / p.heads_q) % p.query_len;
  const int64_t b = row / (p.heads_q * p.query_len);
  const T* o = static_cast<const T*>(p.out) + b * p.out_stride_batch + t * p.out_stride_query +
               head * p.out_stride_head;
  const T* g = static_cast<const T*>(p.grad_out) + b * p.grad_stride_batch +
               t * p.grad_stride_query + head * p.grad_stride_head;
  const float sum = row_dot(o, g, static_cast<int>(p.head_dim));
  if (lane == 0) p.delta[(b * p.heads_q + head) * p.query_len + t] = sum;
}

// ---- dk / dv ----

template <typename T, int kHeadDim>
using DkdvShape =
    DkdvTiles<T, kHeadDim, kImageTextAttentionBwdBlockN, kImageTextAttentionBwdDkdvBlockM>;

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kThreads, min_blocks_per_sm<T>())
    image_text_attention_bwd_dkdv_kernel(const Params p, bool async) {
  using Shape = DkdvShape<T, kHeadDim>;
  constexpr int kBlockN = Shape::kBlockN, kBlockM = Shape::kBlockM, kLd = Shape::kLd;
  constexpr int kDimTiles = kHeadDim / 8;  // n8 tiles of dK, dV
  VLMK_DYNAMIC_SMEM(unsigned char, smem);
  T* k_s = reinterpret_cast<T*>(smem);
  T* v_s = k_s + kBlockN * kLd;
  T* q_s = v_s + kBlockN * kLd;  // [2][kBlockM][kLd]
  T* do_s = q_s + 2 * Shape::kTile;
  float* lse_s = reinterpret_cast<float*>(smem + Shape::kStatsOffset);  // [2][kBlockM]
  float* delta_s = lse_s + 2 * kBlockM;
  float* visible_s = delta_s + 2 * kBlockM;  // 1.0f: the row sees this chunk

  const int media_len = static_cast<int>(p.media_len);
  const int tiles_per_chunk = (media_len + kBlockN - 1) / kBlockN;
  const int chunk = blockIdx.x / tiles_per_chunk;
  const int key_in_chunk = (blockIdx.x % tiles_per_chunk) * kBlockN;
  const int keys_valid = min(kBlockN, media_len - key_in_chunk);
  const int64_t key0 = static_cast<int64_t>(chunk) * media_len + key_in_chunk;
  const int kv_head = blockIdx.y;
  const int64_t batch = blockIdx.z;
  const int group = static_cast<int>(p.heads_q / p.heads_kv);
  const int query_len = static_cast<int>(p.query_len);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;

  const int64_t out_stride = p.heads_kv * kHeadDim;  // dk, dv: contiguous [B, Lk, Hkv, Dh]
  const int64_t out_offset = ((batch * p.key_len + key0) * p.heads_kv + kv_head) * kHeadDim;
  T* dk = static_cast<T*>(p.dk) + out_offset;
  T* dv = static_cast<T*>(p.dv) + out_offset;

  const int64_t schedule = batch * p.num_chunks + chunk;
  const int count = p.qb_count[schedule];
  if (count == 0) {  // no query sees the chunk: its keys are not even loaded
    zero_rows<T, kHeadDim>(dk, out_stride, keys_valid);
    zero_rows<T, kHeadDim>(dv, out_stride, keys_valid);
    return;
  }
  const int32_t* qb_ids = p.qb_ids + schedule * p.num_query_blocks_dkdv;
  const uint8_t* mask_chunk =
      p.media_mask + batch * p.mask_stride_batch + chunk * p.mask_stride_chunk;

  load_tile<T, kBlockN, kHeadDim>(k_s, kLd,
                                  static_cast<const T*>(p.k) + batch * p.k_stride_batch +
                                      key0 * p.k_stride_key + kv_head * p.k_stride_head,
                                  p.k_stride_key, keys_valid, async);
  load_tile<T, kBlockN, kHeadDim>(v_s, kLd,
                                  static_cast<const T*>(p.v) + batch * p.v_stride_batch +
                                      key0 * p.v_stride_key + kv_head * p.v_stride_head,
                                  p.v_stride_key, keys_valid, async);
  tc::cp_async_commit();

  // Stages step `step` (query block x head of the group) into buffer `stage`.
  auto prefetch = [&](int step, int stage) {
    const int slot = step / group;
    const int64_t head = static_cast<int64_t>(kv_head) * group + (step - slot * group);
    const int row0 = qb_ids[slot] * kBlockM;
    const int rows_valid = min(kBlockM, query_len - row0);
    load_tile<T, kBlockM, kHeadDim>(q_s + stage * Shape::kTile, kLd,
                                    static_cast<const T*>(p.q) + batch * p.q_stride_batch +
                                        row0 * p.q_stride_query + head * p.q_stride_head,
                                    p.q_stride_query, rows_valid, async);
    load_tile<T, kBlockM, kHeadDim>(do_s + stage * Shape::kTile, kLd,
                                    static_cast<const T*>(p.grad_out) +
                                        batch * p.grad_stride_batch + row0 * p.grad_stride_query +
                                        head * p.grad_stride_head,
                                    p.grad_stride_query, rows_valid, async);
    if (threadIdx.x < kBlockM) {
      const int i = threadIdx.x;
      const bool valid = i < rows_valid;
      const int64_t stats = ((batch * p.heads_q + head) * query_len + row0 + i);
      const bool sees = valid && mask_chunk[(row0 + i) * p.mask_stride_query] != 0;
      st_shared(&lse_s[stage * kBlockM + i], sees ? p.lse[stats] * kLog2e : 0.0f);
      st_shared(&delta_s[stage * kBlockM + i], sees ? p.delta[stats] : 0.0f);
      st_shared(&visible_s[stage * kBlockM + i], sees ? 1.0f : 0.0f);
    }
  };

  FragC dk_acc[kDimTiles], dv_acc[kDimTiles];
#pragma unroll
  for (int j = 0; j < kDimTiles; ++j) {
    zero(dk_acc[j]);
    zero(dv_acc[j]);
  }
  const float scale_log2 = p.scale * kLog2e;
  const int m0 = 16 * warp;  // this warp's keys in the tile
  // Keys past the chunk's end (zero-filled) get P = 0: rows g and g + 8 of the warp's tile.
  const bool key_ok[2] = {m0 + lane / 4 < keys_valid, m0 + lane / 4 + 8 < keys_valid};

  const int steps = count * group;
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
    const T* q_tile = q_s + stage * Shape::kTile;
    const T* do_tile = do_s + stage * Shape::kTile;

    dkdv_tile_step<T, kHeadDim, kBlockM, kLd>(dk_acc, dv_acc, k_s, v_s, q_tile, do_tile,
                                              lse_s + stage * kBlockM, delta_s + stage * kBlockM,
                                              visible_s + stage * kBlockM, key_ok, m0, scale_log2);
    __syncthreads();  // every warp is done with this stage before the next prefetch refills it
  }
  store_acc<T, kHeadDim>(dk, out_stride, dk_acc, m0, keys_valid, p.scale);
  store_acc<T, kHeadDim>(dv, out_stride, dv_acc, m0, keys_valid, 1.0f);
}

// ---- dq ----

template <typename T, int kHeadDim>
using DqShape = DqTiles<T, kHeadDim, kImageTextAttentionBwdDqBlockM, 32>;

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kThreads, min_blocks_per_sm<T>())
    image_text_attention_bwd_dq_kernel(const Params p, bool async) {
  using Shape = DqShape<T, kHeadDim>;
  constexpr int kBlockN = Shape::kBlockN, kBlockM = Shape::kBlockM, kLd = Shape::kLd;
  constexpr int kDimTiles = kHeadDim / 8;
  VLMK_DYNAMIC_SMEM(T, smem);
  T* q_s = smem;
  T* do_s = q_s + kBlockM * kLd;
  T* k_s = do_s + kBlockM * kLd;  // [2][kBlockN][kLd]
  T* v_s = k_s + 2 * Shape::kKvTile;

  const int query_block = blockIdx.x;
  const int64_t head = blockIdx.y;
  const int64_t batch = blockIdx.z;
  const int64_t kv_head = head / (p.heads_q / p.heads_kv);
  const int query_len = static_cast<int>(p.query_len);
  const int media_len = static_cast<int>(p.media_len);
  const int row0 = query_block * kBlockM;
  const int rows_valid = min(kBlockM, query_len - row0);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int m0 = 16 * warp;

  T* dq = static_cast<T*>(p.dq) + ((batch * query_len + row0) * p.heads_q + head) * kHeadDim;
  const int64_t dq_stride = p.heads_q * kHeadDim;
  const int64_t schedule = batch * p.num_query_blocks_dq + query_block;
  const int count = p.chunk_count[schedule];
  if (count == 0) {  // no row of the block sees anything: dq = 0
    zero_rows<T, kHeadDim>(dq, dq_stride, rows_valid);
    return;
  }
  const int32_t* chunk_ids = p.chunk_ids + schedule * p.num_chunks;
  const int tiles_per_chunk = (media_len + kBlockN - 1) / kBlockN;
  const int tiles = count * tiles_per_chunk;
  const T* k_base =
      static_cast<const T*>(p.k) + batch * p.k_stride_batch + kv_head * p.k_stride_head;
  const T* v_base =
      static_cast<const T*>(p.v) + batch * p.v_stride_batch + kv_head * p.v_stride_head;

  load_tile<T, kBlockM, kHeadDim>(q_s, kLd,
                                  static_cast<const T*>(p.q) + batch * p.q_stride_batch +
                                      row0 * p.q_stride_query + head * p.q_stride_head,
                                  p.q_stride_query, rows_valid, async);
  load_tile<T, kBlockM, kHeadDim>(do_s, kLd,
                                  static_cast<const T*>(p.grad_out) + batch * p.grad_stride_batch +
                                      row0 * p.grad_stride_query + head * p.grad_stride_head,
                                  p.grad_stride_query, rows_valid, async);
  auto prefetch = [&](int tile, int stage) {
    const int slot = tile / tiles_per_chunk;
    const int in_chunk = (tile - slot * tiles_per_chunk) * kBlockN;
    const int64_t key = static_cast<int64_t>(chunk_ids[slot]) * media_len + in_chunk;
    const int keys_valid = min(kBlockN, media_len - in_chunk);
    load_tile<T, kBlockN, kHeadDim>(k_s + stage * Shape::kKvTile, kLd,
                                    k_base + key * p.k_stride_key, p.k_stride_key, keys_valid,
                                    async);
    load_tile<T, kBlockN, kHeadDim>(v_s + stage * Shape::kKvTile, kLd,
                                    v_base + key * p.v_stride_key, p.v_stride_key, keys_valid,
                                    async);
  };
  prefetch(0, 0);
  tc::cp_async_commit();

  // This lane's rows (g and g + 8 of the warp's 16): lse (log2 domain), delta, mask row.
  float lse2[2], delta[2];
  const uint8_t* mask_row[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = m0 + lane / 4 + 8 * half;
    const bool valid = r < rows_valid;
    const int64_t stats = (batch * p.heads_q + head) * query_len + row0 + (valid ? r : 0);
    lse2[half] = valid ? p.lse[stats] * kLog2e : 0.0f;
    delta[half] = valid ? p.delta[stats] : 0.0f;
    mask_row[half] =
        valid ? p.media_mask + batch * p.mask_stride_batch + (row0 + r) * p.mask_stride_query
              : nullptr;
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
    const T* k_tile = k_s + stage * Shape::kKvTile;
    const T* v_tile = v_s + stage * Shape::kKvTile;
    const int slot = tile / tiles_per_chunk;
    const int chunk = chunk_ids[slot];
    const int keys_valid = min(kBlockN, media_len - (tile - slot * tiles_per_chunk) * kBlockN);
    bool sees[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      sees[half] = mask_row[half] != nullptr && mask_row[half][chunk * p.mask_stride_chunk] != 0;
    }
    dq_tile_step<T, kHeadDim, kBlockN, kLd>(
        dq_acc, q_s, do_s, k_tile, v_tile, m0, lse2, delta, scale_log2,
        [&](int half, int key) { return sees[half] && key < keys_valid; });
    __syncthreads();  // every warp is done with this stage before the next prefetch refills it
  }
  store_acc<T, kHeadDim>(dq, dq_stride, dq_acc, m0, rows_valid, p.scale);
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
int launch(const Params& p, cudaStream_t stream) {
  // cp.async needs 16-byte aligned rows in global memory; otherwise plain loads.
  const bool async =
      aligned_16<T>(p.q, {p.q_stride_batch, p.q_stride_query, p.q_stride_head}) &&
      aligned_16<T>(p.k, {p.k_stride_batch, p.k_stride_key, p.k_stride_head}) &&
      aligned_16<T>(p.v, {p.v_stride_batch, p.v_stride_key, p.v_stride_head}) &&
      aligned_16<T>(p.grad_out, {p.grad_stride_batch, p.grad_stride_query, p.grad_stride_head});

  const int64_t rows = p.batch * p.query_len * p.heads_q;
  cudaError_t status = VLMK_LAUNCH((image_text_attention_bwd_preprocess_kernel<T>),
                                   dim3(static_cast<unsigned>((rows + kWarps - 1) / kWarps)),
                                   dim3(kThreads), 0, stream, p);
  if (status != cudaSuccess) return static_cast<int>(status);

  using Dkdv = DkdvShape<T, kHeadDim>;
  status = cudaFuncSetAttribute(image_text_attention_bwd_dkdv_kernel<T, kHeadDim>,
                                cudaFuncAttributeMaxDynamicSharedMemorySize, Dkdv::kSmemBytes);
  if (status != cudaSuccess) return static_cast<int>(status);
  const int64_t tiles_per_chunk = (p.media_len + Dkdv::kBlockN - 1) / Dkdv::kBlockN;
  status = VLMK_LAUNCH((image_text_attention_bwd_dkdv_kernel<T, kHeadDim>),
                       dim3(static_cast<unsigned>(p.num_chunks * tiles_per_chunk),
                            static_cast<unsigned>(p.heads_kv), static_cast<unsigned>(p.batch)),
                       dim3(kThreads), Dkdv::kSmemBytes, stream, p, async);
  if (status != cudaSuccess) return static_cast<int>(status);

  using Dq = DqShape<T, kHeadDim>;
  status = cudaFuncSetAttribute(image_text_attention_bwd_dq_kernel<T, kHeadDim>,
                                cudaFuncAttributeMaxDynamicSharedMemorySize, Dq::kSmemBytes);
  if (status != cudaSuccess) return static_cast<int>(status);
  status = VLMK_LAUNCH((image_text_attention_bwd_dq_kernel<T, kHeadDim>),
                       dim3(static_cast<unsigned>(p.num_query_blocks_dq),
                            static_cast<unsigned>(p.heads_q), static_cast<unsigned>(p.batch)),
                       dim3(kThreads), Dq::kSmemBytes, stream, p, async);
  return static_cast<int>(status);
}

}  // namespace

int launch_image_text_attention_bwd(const Params& p, void* stream) {
  const bool sizes_ok =
      p.batch > 0 && p.query_len > 0 && p.key_len > 0 && p.heads_kv > 0 && p.heads_q > 0 &&
      p.heads_q % p.heads_kv == 0 && p.media_len > 0 && p.key_len == p.num_chunks * p.media_len &&
      p.query_len * p.heads_q <= (int64_t{1} << 30) && p.key_len <= (int64_t{1} << 30) &&
      p.batch <= 65535 && p.heads_q <= 65535 &&
      p.num_query_blocks_dq ==
          (p.query_len + kImageTextAttentionBwdDqBlockM - 1) / kImageTextAttentionBwdDqBlockM &&
      p.num_query_blocks_dkdv ==
          (p.query_len + kImageTextAttentionBwdDkdvBlockM - 1) / kImageTextAttentionBwdDkdvBlockM;
  if (!sizes_ok) return static_cast<int>(cudaErrorInvalidValue);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  return VLMK_ITA_DTYPE_SWITCH(p.dtype, [&] {
    return VLMK_ITA_HEAD_DIM_SWITCH(p.head_dim, [&] { return launch<T, kHeadDim>(p, s); });
  });
}

}  // namespace VLMK_ITAB_NAMESPACE
}  // namespace vlmk
