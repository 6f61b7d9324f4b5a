// image_text_attention forward kernels (semantics and params in image_text_attention.h).
//
// Work decomposition. Queries of one kv head are flattened into "slots" s = t * G + g (query t,
// query head kv_head * G + g, G = Hq / Hkv), so the K/V tiles a block stages serve every query
// head of the GQA group. A block of 4 warps takes kSlots = 16 consecutive slots (4 per warp) and
// walks the keys in tiles of kBlockN = 32 staged in shared memory as float:
//   S phase   lane n scores key n against the warp's 4 slots (float4 dot products over Dh);
//             scores are in the log2 domain (q is pre-multiplied by scale * log2(e)).
//   softmax   online, in fp32 registers: per slot a warp-uniform running max (shuffle reduce) and
//             per-lane partial sums (reduced once at the end); P goes to a warp-private buffer.
//   PV phase  lane owns columns lane + 32 c of the accumulator; acc[slot][c] += P V.
// Skipping. Before the key loop, the block tests the media chunks in windows of 128 (one per
// thread): per distinct query row of its slots a ballot gives that row's visibility bits (kept in
// shared memory for the per-row masking), and their union is split into runs of consecutive
// visible chunks. Only the keys of those runs are loaded and computed; a chunk no row of the block
// sees is never read. With `uniform`, a row that sees no chunk at all makes the whole key range
// visible for its block (that row attends to every key).
// Kernels:
//   prefill: grid (ceil(Lq * G / kSlots), Hkv, B); each block one slot tile over all keys.
//   decode:  grid (num_splits, Hkv, B); each block every slot tile of its kv head over one key
//            split, writing out/lse (one split) or a normalized partial + its log2-sum-exp2;
//   combine: one warp per query row merges the splits' partials (flash-decoding).
// The same source is compiled by nvcc (namespace vlmk::cuda) and, with VLMK_SIMT, as host C++ run
// by the SIMT emulator (namespace vlmk::sim, the cuda_sim backend). No tensor cores: a SIMT FMA
// path that the emulator runs as is. Shared memory is read and written through ld_shared /
// st_shared (plain accesses under nvcc) so that the emulator's race checker sees every access.
#include "common/cuda_compat.cuh"
#include "cuda/image_text_attention.h"

#if defined(VLMK_SIMT)
#define VLMK_ITA_NAMESPACE sim
#else
#define VLMK_ITA_NAMESPACE cuda
#endif

// Compile-time dispatch: binds the element type `T` (float, __half, __nv_bfloat16) for a dtype.
#define VLMK_ITA_DTYPE_SWITCH(DTYPE, ...)           \
  [&] {                                             \
    switch (DTYPE) {                                \
      case ImageTextAttentionDtype::kFloat32: {     \
        using T = float;                            \
        return __VA_ARGS__();                       \
      }                                             \
      case ImageTextAttentionDtype::kFloat16: {     \
        using T = __half;                           \
        return __VA_ARGS__();                       \
      }                                             \
      case ImageTextAttentionDtype::kBFloat16: {    \
        using T = __nv_bfloat16;                    \
        return __VA_ARGS__();                       \
      }                                             \
    }                                               \
    return static_cast<int>(cudaErrorInvalidValue); \
  }()

// Compile-time dispatch: binds `constexpr int kHeadDim` for the supported head dims.
#define VLMK_ITA_HEAD_DIM_SWITCH(HEAD_DIM, ...)     \
  [&] {                                             \
    switch (HEAD_DIM) {                             \
      case 64: {                                    \
        constexpr int kHeadDim = 64;                \
        return __VA_ARGS__();                       \
      }                                             \
      case 80: {                                    \
        constexpr int kHeadDim = 80;                \
        return __VA_ARGS__();                       \
      }                                             \
      case 96: {                                    \
        constexpr int kHeadDim = 96;                \
        return __VA_ARGS__();                       \
      }                                             \
      case 128: {                                   \
        constexpr int kHeadDim = 128;               \
        return __VA_ARGS__();                       \
      }                                             \
    }                                               \
    return static_cast<int>(cudaErrorInvalidValue); \
  }()

namespace vlmk {
namespace VLMK_ITA_NAMESPACE {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
// At least 4 resident blocks (16 warps) per SM: caps the attention kernels at 128 registers. Left
// to itself ptxas picks 80-96 registers for some head dims and spills a few bytes to get there.
constexpr int kMinBlocksPerSm = 4;
constexpr int kRowsPerWarp = 4;                     // slots per warp
constexpr int kSlots = kWarps * kRowsPerWarp;       // slots per block pass
constexpr int kBlockN = kImageTextAttentionBlockN;  // keys per tile: one per lane
constexpr int kWindow = kThreads;                   // media chunks tested per window
constexpr unsigned kFullMask = 0xffffffffu;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
static_assert(kBlockN == 32, "the S phase gives each lane one key of the tile");
static_assert(kSlots <= 32, "rows of a slot tile are tracked in a 32-bit mask");

using Params = ImageTextAttentionParams;

// ---- element conversions (the names work with and without __CUDA_NO_HALF_CONVERSIONS__) ----

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
struct Element;

template <>
struct Element<float> {
  static constexpr int kVec = 4;  // elements per 16-byte load
  __device__ static __forceinline__ float from_float(float x) { return x; }
  __device__ static __forceinline__ void load_vec(const float* src, float* dst) {
    const float4 x = *reinterpret_cast<const float4*>(src);
    dst[0] = x.x;
    dst[1] = x.y;
    dst[2] = x.z;
    dst[3] = x.w;
  }
};

template <>
struct Element<__half> {
  static constexpr int kVec = 8;
  __device__ static __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
  __device__ static __forceinline__ void load_vec(const __half* src, float* dst) {
    const uint4 raw = *reinterpret_cast<const uint4*>(src);
    const unsigned words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      dst[2 * i] = __half2float(__ushort_as_half(static_cast<unsigned short>(words[i] & 0xffffu)));
      dst[2 * i + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(words[i] >> 16)));
    }
  }
};

template <>
struct Element<__nv_bfloat16> {
  static constexpr int kVec = 8;
  __device__ static __forceinline__ __nv_bfloat16 from_float(float x) {
    return __float2bfloat16_rn(x);
  }
  __device__ static __forceinline__ void load_vec(const __nv_bfloat16* src, float* dst) {
    const uint4 raw = *reinterpret_cast<const uint4*>(src);
    const unsigned words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // bf16 -> fp32 is a shift into the high half
      dst[2 * i] = __uint_as_float(words[i] << 16);
      dst[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
    }
  }
};

// Loads Element<T>::kVec elements at `src` (zeros when !valid), multiplies them by `multiplier`
// and stores them as floats at `dst` (16-byte aligned). `vector_loads`: src is 16-byte aligned.
template <typename T>
__device__ __forceinline__ void stage_vector(float* dst, const T* src, bool valid,
                                             bool vector_loads, float multiplier) {
  constexpr int kVec = Element<T>::kVec;
  float x[kVec];
  if (!valid) {
#pragma unroll
    for (int i = 0; i < kVec; ++i) x[i] = 0.0f;
  } else if (vector_loads) {
    Element<T>::load_vec(src, x);
  } else {
#pragma unroll
    for (int i = 0; i < kVec; ++i) x[i] = to_float(src[i]);
  }
#pragma unroll
  for (int i = 0; i < kVec; i += 4) {
    st_shared(reinterpret_cast<float4*>(dst + i),
              make_float4(x[i] * multiplier, x[i + 1] * multiplier, x[i + 2] * multiplier,
                          x[i + 3] * multiplier));
  }
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2)
    x = fmaxf(x, __shfl_xor_sync(kFullMask, x, offset));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}

template <int kHeadDim>
struct alignas(16) SharedStorage {
  float q[kSlots][kHeadDim];               // the slots' queries, times scale * log2(e)
  float k[kBlockN][kHeadDim + 4];          // K tile; +4 floats: conflict-free float4 rows
  float v[kBlockN][kHeadDim];              // V tile
  float p[kWarps][kRowsPerWarp][kBlockN];  // probabilities of the tile, warp-private
  unsigned row_bits[kSlots][kWarps];       // chunk window visibility per distinct query row
  unsigned union_bits[kWarps];             // ... and its union over the rows
};

// The first bit at or after `pos` of the window's union_bits that equals `set` (kWindow if none).
// All threads read the same shared words, so every thread finds the same runs.
__device__ __forceinline__ int next_bit(const unsigned* words, int pos, bool set) {
  for (int w = pos >> 5; w < kWarps; ++w) {
    const unsigned bits = ld_shared(&words[w]);
    unsigned word = set ? bits : ~bits;
    if (w == (pos >> 5)) word &= kFullMask << (pos & 31);
    if (word != 0u) return w * 32 + __ffs(static_cast<int>(word)) - 1;
  }
  return kWindow;
}

// Attention of slots [slot_begin, slot_begin + kSlots) of (batch, kv_head) over the visible keys
// of [key_begin, key_end). split < 0: writes out and lse; else the split's partials. Indices of
// slots, keys and chunks fit in int (the launcher checks), which keeps 64-bit divisions (calls on
// the GPU) out of the kernel; memory offsets are int64.
template <typename T, int kHeadDim>
__device__ __forceinline__ void attend_slot_tile(const Params& p, SharedStorage<kHeadDim>& sm,
                                                 bool vector_loads, int batch, int kv_head,
                                                 int slot_begin, int key_begin, int key_end,
                                                 int split) {
  constexpr int kVec = Element<T>::kVec;
  constexpr int kVectorsPerRow = kHeadDim / kVec;
  constexpr int kColsPerLane = (kHeadDim + 31) / 32;
  static_assert(kHeadDim % kVec == 0 && kHeadDim % 4 == 0, "head dim must fill whole vectors");

  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int group = static_cast<int>(p.heads_q / p.heads_kv);
  const int media_len = static_cast<int>(p.media_len);
  const int slot_end = min(slot_begin + kSlots, static_cast<int>(p.query_len) * group);
  const int t_first = slot_begin / group;
  const int num_rows = (slot_end - 1) / group - t_first + 1;
  const uint8_t* mask = p.media_mask + batch * p.mask_stride_batch + t_first * p.mask_stride_query;

  // This warp's slots: validity and query row (relative to t_first).
  bool slot_valid[kRowsPerWarp];
  int row_local[kRowsPerWarp];
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int slot = slot_begin + warp * kRowsPerWarp + i;
    slot_valid[i] = slot < slot_end;
    row_local[i] = slot_valid[i] ? slot / group - t_first : 0;
  }

  __syncthreads();  // the previous slot tile of this block is done with shared memory
  {
    const T* q = static_cast<const T*>(p.q) + batch * p.q_stride_batch;
    const float q_multiplier = p.scale * kLog2e;
    for (int i = threadIdx.x; i < kSlots * kVectorsPerRow; i += kThreads) {
      const int r = i / kVectorsPerRow;
      const int d = (i % kVectorsPerRow) * kVec;
      const int slot = slot_begin + r;
      const bool valid = slot < slot_end;
      const int t = valid ? slot / group : 0;
      const int head = kv_head * group + (valid ? slot - t * group : 0);
      const T* src = q + t * p.q_stride_query + head * p.q_stride_head + d;
      stage_vector(&sm.q[r][d], src, valid, vector_loads, q_multiplier);
    }
  }

  // Uniform mode: the rows of this tile that see no chunk at all (bit r: row t_first + r).
  unsigned empty_rows = 0;
  if (p.uniform) {
    for (int r = 0; r < num_rows; ++r) {
      bool seen = false;
      for (int chunk = threadIdx.x; chunk < p.num_chunks && !seen; chunk += kThreads) {
        seen = mask[r * p.mask_stride_query + chunk * p.mask_stride_chunk] != 0;
      }
      if (!__syncthreads_or(seen)) empty_rows |= 1u << r;
    }
  }

  float acc[kRowsPerWarp][kColsPerLane];
  float row_max[kRowsPerWarp];  // running max of the log2-domain scores (warp-uniform)
  float row_sum[kRowsPerWarp];  // this lane's share of the running sum of exp2(score - max)
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    row_max[i] = -INFINITY;
    row_sum[i] = 0.0f;
#pragma unroll
    for (int c = 0; c < kColsPerLane; ++c) acc[i][c] = 0.0f;
  }

  const T* k_base =
      static_cast<const T*>(p.k) + batch * p.k_stride_batch + kv_head * p.k_stride_head;
  const T* v_base =
      static_cast<const T*>(p.v) + batch * p.v_stride_batch + kv_head * p.v_stride_head;
  const int chunk_begin = key_begin / media_len;
  const int chunk_end = key_end > key_begin ? (key_end - 1) / media_len + 1 : chunk_begin;

  for (int window = chunk_begin; window < chunk_end; window += kWindow) {
    // Visibility of chunk `window + threadIdx.x` per query row, and for the tile as a whole.
    const int chunk = window + threadIdx.x;
    const bool in_range = chunk < chunk_end;
    bool any_row = false;
    for (int r = 0; r < num_rows; ++r) {
      const bool visible =
          in_range && mask[r * p.mask_stride_query + chunk * p.mask_stride_chunk] != 0;
      const unsigned bits = __ballot_sync(kFullMask, visible);
      if (lane == 0) st_shared(&sm.row_bits[r][warp], bits);
      any_row = any_row || visible;
    }
    if (empty_rows != 0u) any_row = in_range;  // a row that sees nothing attends to every key
    const unsigned union_bits = __ballot_sync(kFullMask, any_row);
    if (lane == 0) st_shared(&sm.union_bits[warp], union_bits);
    __syncthreads();  // row_bits and union_bits complete

    for (int run = next_bit(sm.union_bits, 0, true); run < kWindow;) {
      const int run_stop = next_bit(sm.union_bits, run, false);
      const int run_key_begin = max(key_begin, (window + run) * media_len);
      const int run_key_end = min(key_end, (window + run_stop) * media_len);
      for (int tile = run_key_begin; tile < run_key_end; tile += kBlockN) {
        const int tile_end = min(tile + kBlockN, run_key_end);

        __syncthreads();  // every warp is done with the previous K/V tile
        for (int i = threadIdx.x; i < kBlockN * kVectorsPerRow; i += kThreads) {
          const int n = i / kVectorsPerRow;
          const int d = (i % kVectorsPerRow) * kVec;
          const bool valid = tile + n < tile_end;  // rows past the run are zeros, never garbage
          const int key = valid ? tile + n : 0;
          stage_vector(&sm.k[n][d], k_base + key * p.k_stride_key + d, valid, vector_loads, 1.0f);
          stage_vector(&sm.v[n][d], v_base + key * p.v_stride_key + d, valid, vector_loads, 1.0f);
        }
        __syncthreads();  // K/V tile staged
        // A warp without slots (the tail of the last slot tile, or decode with fewer than 16
        // slots) only helps to stage; it still meets every barrier.
        if (!slot_valid[0]) continue;

        // S phase: lane scores key `tile + lane` against the warp's slots.
        float score[kRowsPerWarp];
#pragma unroll
        for (int i = 0; i < kRowsPerWarp; ++i) score[i] = 0.0f;
#pragma unroll 2
        for (int d = 0; d < kHeadDim; d += 4) {
          const float4 kx = ld_shared(reinterpret_cast<const float4*>(&sm.k[lane][d]));
#pragma unroll
          for (int i = 0; i < kRowsPerWarp; ++i) {
            const float4 qx =
                ld_shared(reinterpret_cast<const float4*>(&sm.q[warp * kRowsPerWarp + i][d]));
            score[i] = fmaf(qx.x, kx.x, score[i]);
            score[i] = fmaf(qx.y, kx.y, score[i]);
            score[i] = fmaf(qx.z, kx.z, score[i]);
            score[i] = fmaf(qx.w, kx.w, score[i]);
          }
        }

        // Per-row masking and the online softmax update.
        const bool key_in = tile + lane < tile_end;
        const int bit = key_in ? (tile + lane) / media_len - window : 0;
#pragma unroll
        for (int i = 0; i < kRowsPerWarp; ++i) {
          const int r = row_local[i];
          const bool visible = key_in && slot_valid[i] &&
                               (((empty_rows >> r) & 1u) != 0u ||
                                ((ld_shared(&sm.row_bits[r][bit >> 5]) >> (bit & 31)) & 1u) != 0u);
          const float s = visible ? score[i] : -INFINITY;
          const float new_max = fmaxf(row_max[i], warp_max(s));
          const float safe_max = new_max == -INFINITY ? 0.0f : new_max;  // no (-inf) - (-inf)
          const float prob = exp2f(s - safe_max);
          const float rescale = exp2f(row_max[i] - safe_max);
          row_max[i] = new_max;
          row_sum[i] = row_sum[i] * rescale + prob;
#pragma unroll
          for (int c = 0; c < kColsPerLane; ++c) acc[i][c] *= rescale;
          st_shared(&sm.p[warp][i][lane], prob);
        }
        __syncwarp();  // the warp's probabilities are visible to all its lanes

        // PV phase: lane accumulates columns lane + 32 c.
#pragma unroll 1
        for (int n = 0; n < kBlockN; n += 4) {
          float4 prob[kRowsPerWarp];
#pragma unroll
          for (int i = 0; i < kRowsPerWarp; ++i) {
            prob[i] = ld_shared(reinterpret_cast<const float4*>(&sm.p[warp][i][n]));
          }
#pragma unroll
          for (int c = 0; c < kColsPerLane; ++c) {
            const int col = c * 32 + lane;
            if (kHeadDim % 32 == 0 || col < kHeadDim) {
              const float v0 = ld_shared(&sm.v[n][col]), v1 = ld_shared(&sm.v[n + 1][col]);
              const float v2 = ld_shared(&sm.v[n + 2][col]), v3 = ld_shared(&sm.v[n + 3][col]);
#pragma unroll
              for (int i = 0; i < kRowsPerWarp; ++i) {
                acc[i][c] = fmaf(prob[i].x, v0, acc[i][c]);
                acc[i][c] = fmaf(prob[i].y, v1, acc[i][c]);
                acc[i][c] = fmaf(prob[i].z, v2, acc[i][c]);
                acc[i][c] = fmaf(prob[i].w, v3, acc[i][c]);
              }
            }
          }
        }
      }
      run = next_bit(sm.union_bits, run_stop, true);
    }
    __syncthreads();  // every thread has read this window's bits before the next one is written
  }

  // Epilogue: normalize, write out + lse (or the split's partials).
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const float sum = warp_sum(row_sum[i]);
    if (!slot_valid[i]) continue;  // warp-uniform
    // sum == 0: the row saw nothing (0, -inf). A NaN sum (NaN or inf - inf among the visible
    // scores) writes NaN out and lse, as SDPA does, and the combine keeps it.
    const float inv_sum = sum != 0.0f ? 1.0f / sum : 0.0f;
    const float lse2 = sum != 0.0f ? row_max[i] + log2f(sum) : -INFINITY;  // log2 domain
    const int t = t_first + row_local[i];
    const int head = kv_head * group + (slot_begin + warp * kRowsPerWarp + i - t * group);
    const int64_t row = (static_cast<int64_t>(batch) * p.query_len + t) * p.heads_q + head;
    if (split < 0) {
      T* out = static_cast<T*>(p.out) + row * kHeadDim;
#pragma unroll
      for (int c = 0; c < kColsPerLane; ++c) {
        const int col = c * 32 + lane;
        if (kHeadDim % 32 == 0 || col < kHeadDim) {
          out[col] = Element<T>::from_float(acc[i][c] * inv_sum);
        }
      }
      if (lane == 0) {
        p.lse[(static_cast<int64_t>(batch) * p.heads_q + head) * p.query_len + t] = lse2 * kLn2;
      }
    } else {
      float* out = p.partial_out + (row * p.num_splits + split) * kHeadDim;
#pragma unroll
      for (int c = 0; c < kColsPerLane; ++c) {
        const int col = c * 32 + lane;
        if (kHeadDim % 32 == 0 || col < kHeadDim) out[col] = acc[i][c] * inv_sum;
      }
      if (lane == 0) p.partial_lse[row * p.num_splits + split] = lse2;
    }
  }
}

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    image_text_attention_prefill_kernel(const __grid_constant__ Params p, const bool vector_loads) {
  VLMK_SHARED(SharedStorage<kHeadDim>, smem);
  attend_slot_tile<T, kHeadDim>(p, smem, vector_loads, blockIdx.z, blockIdx.y, blockIdx.x * kSlots,
                                0, static_cast<int>(p.key_len), -1);
}

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    image_text_attention_decode_kernel(const __grid_constant__ Params p, const bool vector_loads) {
  VLMK_SHARED(SharedStorage<kHeadDim>, smem);
  const int split = blockIdx.x;
  const int key_begin = split * static_cast<int>(p.split_len);
  const int key_end = min(key_begin + static_cast<int>(p.split_len), static_cast<int>(p.key_len));
  const int slots = static_cast<int>(p.query_len * (p.heads_q / p.heads_kv));
  for (int slot_begin = 0; slot_begin < slots; slot_begin += kSlots) {
    attend_slot_tile<T, kHeadDim>(p, smem, vector_loads, blockIdx.z, blockIdx.y, slot_begin,
                                  key_begin, key_end, p.num_splits > 1 ? split : -1);
  }
}

// out[row] = sum_s 2^(lse_s - lse) partial_out[row, s], lse = log2 sum_s 2^lse_s: one warp per row.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    image_text_attention_combine_kernel(const __grid_constant__ Params p) {
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= p.batch * p.query_len * p.heads_q) return;  // whole warps leave
  const int64_t splits = p.num_splits;
  const float* split_lse = p.partial_lse + row * splits;

  // A NaN split (it saw NaN) must make the row NaN: fmaxf would drop it, so NaN wins here.
  float max_lse = -INFINITY;
  for (int64_t s = lane; s < splits; s += 32) {
    const float x = split_lse[s];
    max_lse = (x > max_lse || x != x) ? x : max_lse;
  }
  const bool poisoned = __any_sync(kFullMask, max_lse != max_lse);  // before fmaxf drops it
  max_lse = poisoned ? NAN : warp_max(max_lse);
  float sum = 0.0f;
  if (max_lse != -INFINITY) {
    for (int64_t s = lane; s < splits; s += 32) sum += exp2f(split_lse[s] - max_lse);
  }
  sum = warp_sum(sum);
  const float lse2 = max_lse == -INFINITY ? -INFINITY : max_lse + log2f(sum);

  const float* partial = p.partial_out + row * splits * p.head_dim;
  T* out = static_cast<T*>(p.out) + row * p.head_dim;
  for (int64_t col = lane; col < p.head_dim; col += 32) {
    float value = 0.0f;
    if (lse2 != -INFINITY) {
      for (int64_t s = 0; s < splits; ++s) {
        value = fmaf(exp2f(split_lse[s] - lse2), partial[s * p.head_dim + col], value);
      }
    }
    out[col] = Element<T>::from_float(value);
  }
  if (lane == 0) {
    const int64_t head = row % p.heads_q;
    const int64_t t = (row / p.heads_q) % p.query_len;
    const int64_t batch = row / (p.heads_q * p.query_len);
    p.lse[(batch * p.heads_q + head) * p.query_len + t] = lse2 * kLn2;
  }
}

// q, k and v can be read 16 bytes at a time: aligned base pointers and strides.
template <typename T>
bool vector_loads_possible(const Params& p) {
  constexpr int64_t kVec = Element<T>::kVec;
  const auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  const int64_t strides[] = {p.q_stride_batch, p.q_stride_query, p.q_stride_head,
                             p.k_stride_batch, p.k_stride_key,   p.k_stride_head,
                             p.v_stride_batch, p.v_stride_key,   p.v_stride_head};
  for (const int64_t stride : strides) {
    if (stride % kVec != 0) return false;
  }
  return aligned(p.q) && aligned(p.k) && aligned(p.v);
}

template <typename T, int kHeadDim>
int launch_typed(const Params& p, cudaStream_t stream) {
  const bool vector_loads = vector_loads_possible<T>(p);
  const int64_t slots = p.query_len * (p.heads_q / p.heads_kv);
  cudaError_t status = cudaSuccess;
  if (!image_text_attention_uses_decode(p)) {
    const int64_t tiles = (slots + kSlots - 1) / kSlots;
    if (tiles > 0x7fffffff) return static_cast<int>(cudaErrorInvalidConfiguration);
    const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(p.heads_kv),
                    static_cast<unsigned>(p.batch));
    status = VLMK_LAUNCH((image_text_attention_prefill_kernel<T, kHeadDim>), grid, dim3(kThreads),
                         0, stream, p, vector_loads);
    return static_cast<int>(status);
  }
  const dim3 grid(static_cast<unsigned>(p.num_splits), static_cast<unsigned>(p.heads_kv),
                  static_cast<unsigned>(p.batch));
  status = VLMK_LAUNCH((image_text_attention_decode_kernel<T, kHeadDim>), grid, dim3(kThreads), 0,
                       stream, p, vector_loads);
  if (status != cudaSuccess || p.num_splits == 1) return static_cast<int>(status);
  const int64_t rows = p.batch * p.query_len * p.heads_q;
  const int64_t blocks = (rows + kWarps - 1) / kWarps;
  if (blocks > 0x7fffffff) return static_cast<int>(cudaErrorInvalidConfiguration);
  status = VLMK_LAUNCH((image_text_attention_combine_kernel<T>),
                       dim3(static_cast<unsigned>(blocks)), dim3(kThreads), 0, stream, p);
  return static_cast<int>(status);
}

}  // namespace

int launch_image_text_attention_fwd(const ImageTextAttentionParams& params, void* stream) {
  const Params& p = params;
  if (p.batch < 0 || p.query_len < 0 || p.key_len < 0 || p.heads_q < 0 || p.heads_kv <= 0 ||
      p.heads_q % p.heads_kv != 0 || p.media_len < 1 || p.num_chunks < 0 ||
      p.key_len != p.num_chunks * p.media_len || p.q_stride_dim != 1 || p.k_stride_dim != 1 ||
      p.v_stride_dim != 1 || !image_text_attention_head_dim_supported(p.head_dim)) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  if (p.batch == 0 || p.query_len == 0 || p.heads_q == 0) return 0;
  // Slot, key and chunk indices are int in the kernels (with room for a split / window past).
  constexpr int64_t kIndexLimit = int64_t{1} << 30;
  if (p.query_len * p.heads_q > kIndexLimit || p.key_len > kIndexLimit) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  if (p.batch > 65535 || p.heads_kv > 65535) {
    return static_cast<int>(cudaErrorInvalidConfiguration);
  }
  if (image_text_attention_uses_decode(p)) {
    if (p.num_splits < 1 || p.num_splits > kImageTextAttentionMaxSplits || p.split_len < 1 ||
        p.split_len % kBlockN != 0 || p.num_splits * p.split_len < p.key_len) {
      return static_cast<int>(cudaErrorInvalidValue);
    }
    if (p.num_splits > 1 && (p.partial_out == nullptr || p.partial_lse == nullptr)) {
      return static_cast<int>(cudaErrorInvalidValue);
    }
  }
  const cudaStream_t cuda_stream = static_cast<cudaStream_t>(stream);
  return VLMK_ITA_DTYPE_SWITCH(p.dtype, [&] {
    return VLMK_ITA_HEAD_DIM_SWITCH(p.head_dim,
                                    [&] { return launch_typed<T, kHeadDim>(p, cuda_stream); });
  });
}

}  // namespace VLMK_ITA_NAMESPACE
}  // namespace vlmk
