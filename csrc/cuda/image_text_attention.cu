// image_text_attention forward kernels (semantics and params in image_text_attention.h),
// FA2-style on tensor cores.
//
// Work decomposition. Queries of one kv head are flattened into "slots" s = t * G + g (query t,
// query head kv_head * G + g, G = Hq / Hkv), so the K/V tiles a block stages serve every query
// head of the GQA group. A block of 4 warps takes kSlots = 64 consecutive slots, 16 per warp (one
// m16 row tile). Per warp and K/V tile of kBlockN keys (32 for bf16/fp16, 8 for float32):
//   Q         in registers for the whole key loop: A fragments (bf16/fp16) or the raw float32
//             values of the tf32 A fragments (split into hi/lo per use), loaded once from global.
//   K/V       kBlockN x Dh tiles in shared memory in the input dtype, double-buffered: the tile
//             after the current one is in flight (cp.async 16 B, zero-fill past the run) while
//             the current one is computed. Rows are padded by 16 B so that ldmatrix (and the
//             float32 scalar fragment loads) are free of bank conflicts.
//   S = QK^T  mma m16n8k16 (K B-fragments by ldmatrix.x4) or 3xTF32 m16n8k8; scaled by
//             scale * log2(e) in fp32 (scores in the log2 domain).
//   mask      per-row visibility bits of the key's chunk, on the accumulator fragments: a key the
//             row may not see becomes -inf by a select (never an add: NaN in a key another row of
//             the block sees must not leak into this row).
//   softmax   online on the fragments: a thread holds rows g and g + 8 of the warp's tile; row max
//             across the 4-lane quad by two xor shuffles, the row sum kept per thread and reduced
//             once at the end.
//   O += PV   P converted in registers to 16-bit A fragments (the m16n8k16 C layout of two n8
//             tiles is the A layout of one k16 step), V B-fragments by ldmatrix.x4.trans; float32:
//             P stays fp32, 3xTF32 with the k index permuted (see pv_tf32).
// float32 inputs: 3xTF32 (a*b ~ ah*bh + ah*bl + al*bh with ah = tf32(a), al = tf32(a - ah)), which
// keeps fp32-level accuracy (errors measured in tests/test_image_text_attention_cuda_sim.py and
// the README); plain 1xTF32 (~1e-3 relative) fails the fp32 tolerance of DESIGN §6 and is not
// offered. The 3xTF32 step itself: common/mma_ops.cuh, shared with patch_embed.
// Skipping. Before the key loop, the block tests the media chunks in windows of 128 (one per
// thread): per distinct query row of its slots a ballot gives that row's visibility bits (kept in
// shared memory for the per-row masking), and their union is split into runs of consecutive
// visible chunks. Only the keys of those runs are loaded and computed (tiles of a run; keys past
// the run's end are zero-filled, never read); a chunk no row of the block sees is never read. With
// `uniform`, a row that sees no chunk at all makes the whole key range visible for its block.
// Kernels:
//   prefill: grid (ceil(Lq * G / kSlots), Hkv, B); each block one slot tile over all keys.
//   decode:  grid (num_splits, Hkv * slot tiles, B); each block one slot tile (the GQA group's
//            rows of all Lq <= 16 queries: one tile up to G = 4); it counts the visible key tiles
//            T of its rows (schedule only) and takes tiles
//            [split * T / S, (split + 1) * T / S), writing out/lse (one split) or a normalized
//            partial + its log2-sum-exp2;
//   combine: one warp per query row merges the splits' partials (flash-decoding).
// The same source is compiled by nvcc (namespace vlmk::cuda) and, with VLMK_SIMT, as host C++ run
// by the SIMT emulator (namespace vlmk::sim, the cuda_sim backend), whose mma / ldmatrix /
// cp.async follow the PTX fragment layouts lane by lane (common/tensor_core.cuh). Shared memory is
// read and written through ld_shared / st_shared / ldmatrix / cp.async so that the emulator's race
// checker sees every access.
// gpu-report: *image_text_attention_prefill_kernel* tensor_cores
// gpu-report: *image_text_attention_decode_kernel* tensor_cores
#include <cstdint>
#include <type_traits>

#include "common/cuda_compat.cuh"
#include "common/mma_ops.cuh"
#include "common/tensor_core.cuh"
#include "cuda/image_text_attention.h"

#if defined(VLMK_SIMT)
#define VLMK_ITA_NAMESPACE sim
#else
#define VLMK_ITA_NAMESPACE cuda
#endif

#include "cuda/image_text_attention_dispatch.cuh"

namespace vlmk {
namespace VLMK_ITA_NAMESPACE {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
// Registers (ptxas, sm_90a / sm_80): 133-203 for bf16/fp16, 152-243 for float32 (3xTF32), zero
// spills; 2 blocks per SM caps them at 255, and shared memory (<= 35 KB per block) allows 6.
constexpr int kMinBlocksPerSm = 2;
constexpr int kRowsPerWarp = 16;               // one m16 row tile per warp
constexpr int kSlots = kWarps * kRowsPerWarp;  // slots per block pass
constexpr int kWindow = kThreads;              // media chunks tested per window
constexpr int kWindowWords = kWindow / 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

using Params = ImageTextAttentionParams;
using tc::FragA;
using tc::FragB;
using tc::FragC;

// ---- element types ----

template <typename T>
struct Element;

template <>
struct Element<float> {
  // Keys per tile: one n8 tile. With 16 keys, Q's fp32 fragments (Dh/2 registers), O (Dh/2)
  // and the 3xTF32 operand splits spilled 16-56 bytes at Dh=128 (255 registers).
  static constexpr int kBlockN = 8;
  static constexpr int kPad = 4;  // row padding in elements (16 B)
  __device__ static __forceinline__ float from_float(float x) { return x; }
};

template <>
struct Element<__half> {
  static constexpr int kBlockN = kImageTextAttentionBlockN;  // 34 KB at Dh 128
  static constexpr int kPad = 8;
  __device__ static __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
};

template <>
struct Element<__nv_bfloat16> {
  static constexpr int kBlockN = kImageTextAttentionBlockN;
  static constexpr int kPad = 8;
  __device__ static __forceinline__ __nv_bfloat16 from_float(float x) {
    return __float2bfloat16_rn(x);
  }
};

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    return tc::pack_bf16(lo, hi);
  } else {
    return tc::pack_f16(lo, hi);
  }
}

template <typename T, int kHeadDim>
struct SharedStorage {
  static constexpr int kBlockN = Element<T>::kBlockN;
  static constexpr int kRow = kHeadDim + Element<T>::kPad;  // padded row, elements
  alignas(16) T k[2][kBlockN][kRow];                        // K tiles, double-buffered
  alignas(16) T v[2][kBlockN][kRow];                        // V tiles
  unsigned row_bits[kSlots][kWindowWords];  // chunk window visibility per distinct query row
  unsigned union_bits[kWindowWords];        // ... and its union over the rows
};

// The first bit at or after `pos` of the window's union_bits that equals `set` (kWindow if none).
// All threads read the same shared words, so every thread finds the same runs.
__device__ __forceinline__ int next_bit(const unsigned* words, int pos, bool set) {
  for (int w = pos >> 5; w < kWindowWords; ++w) {
    const unsigned bits = ld_shared(&words[w]);
    unsigned word = set ? bits : ~bits;
    if (w == (pos >> 5)) word &= kFullMask << (pos & 31);
    if (word != 0u) return w * 32 + __ffs(static_cast<int>(word)) - 1;
  }
  return kWindow;
}

// A K/V tile of the current window: keys [begin, end) of the run that ends at run_end, whose
// chunk bits stop at run_stop (window-relative). Tiles of a run start at the run's first key.
struct TileCursor {
  int begin = 0;
  int end = 0;
  int run_end = 0;
  int run_stop = 0;
};

// Moves to the next tile of the window (false when the window has none left).
template <int kBlockN>
__device__ __forceinline__ bool next_tile(TileCursor& c, const unsigned* union_bits, int window,
                                          int key_begin, int key_end, int media_len) {
  if (c.end < c.run_end) {
    c.begin = c.end;
    c.end = min(c.begin + kBlockN, c.run_end);
    return true;
  }
  for (;;) {
    const int run = next_bit(union_bits, c.run_stop, true);
    if (run >= kWindow) return false;
    c.run_stop = next_bit(union_bits, run, false);
    const int run_begin = max(key_begin, (window + run) * media_len);
    c.run_end = min(key_end, (window + c.run_stop) * media_len);
    if (run_begin < c.run_end) {
      c.begin = run_begin;
      c.end = min(run_begin + kBlockN, c.run_end);
      return true;
    }
  }
}

// Block-wide: the visibility bits of chunks [window, window + kWindow) per query row of the slot
// tile into row_bits, and their union into union_bits (every chunk in range when a row is empty
// under `uniform`). Ends with a barrier; the caller must have passed a barrier since the last
// reads of the bits.
__device__ __forceinline__ void build_window(const Params& p, unsigned (*row_bits)[kWindowWords],
                                             unsigned* union_bits, const uint8_t* mask,
                                             int num_rows, int window, int chunk_end,
                                             bool any_empty_row) {
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int chunk = window + threadIdx.x;
  const bool in_range = chunk < chunk_end;
  bool any_row = false;
  for (int r = 0; r < num_rows; ++r) {
    const bool visible =
        in_range && mask[r * p.mask_stride_query + chunk * p.mask_stride_chunk] != 0;
    const unsigned bits = __ballot_sync(kFullMask, visible);
    if (lane == 0) st_shared(&row_bits[r][warp], bits);
    any_row = any_row || visible;
  }
  if (any_empty_row) any_row = in_range;  // a row that sees nothing attends to every key
  const unsigned bits = __ballot_sync(kFullMask, any_row);
  if (lane == 0) st_shared(&union_bits[warp], bits);
  __syncthreads();  // row_bits and union_bits complete
}

// Issues the copies of keys [c.begin, c.end) of K and V into stage `stage` (rows past c.end are
// zero-filled without a read) and commits them as one group. Without 16-byte alignment the copy
// is synchronous (element loads), still followed by an (empty) commit so group counting holds.
template <typename T, int kHeadDim>
__device__ __forceinline__ void load_tile(SharedStorage<T, kHeadDim>& sm, int stage,
                                          const TileCursor& c, const T* k_base, const T* v_base,
                                          int64_t k_stride, int64_t v_stride, bool vector_loads) {
  constexpr int kBlockN = Element<T>::kBlockN;
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  constexpr int kVectorsPerRow = kHeadDim / kVec;
  static_assert(kHeadDim % kVec == 0, "head dim must fill whole 16-byte vectors");
  for (int i = threadIdx.x; i < kBlockN * kVectorsPerRow; i += kThreads) {
    const int n = i / kVectorsPerRow;
    const int d = (i % kVectorsPerRow) * kVec;
    const bool valid = c.begin + n < c.end;  // rows past the run are zeros, never read
    const int key = valid ? c.begin + n : c.begin;
    const T* k_src = k_base + key * k_stride + d;
    const T* v_src = v_base + key * v_stride + d;
    if (vector_loads) {
      tc::cp_async_16(&sm.k[stage][n][d], k_src, valid);
      tc::cp_async_16(&sm.v[stage][n][d], v_src, valid);
    } else {
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        st_shared(&sm.k[stage][n][d + e], valid ? k_src[e] : Element<T>::from_float(0.0f));
        st_shared(&sm.v[stage][n][d + e], valid ? v_src[e] : Element<T>::from_float(0.0f));
      }
    }
  }
  tc::cp_async_commit();
}

// The warp's Q rows in registers. 16-bit: m16n8k16 A fragments per 16-dim k step. float32: the
// fp32 values of the m16n8k8 A fragments per 8-dim k step (split into tf32 hi/lo at each use).
template <typename T, int kHeadDim>
struct QFragments {
  static constexpr int kSteps = kHeadDim / 16;
  FragA a[kSteps];
};
template <int kHeadDim>
struct QFragments<float, kHeadDim> {
  static constexpr int kSteps = kHeadDim / 8;
  float a[kSteps][4];
};

// Loads rows g and g + 8 of the warp's tile (null: a row past the slot tile, zeros).
template <typename T, int kHeadDim>
__device__ __forceinline__ void load_q(QFragments<T, kHeadDim>& q, const T* row0, const T* row1) {
  const int t4 = threadIdx.x % 4;
  if constexpr (std::is_same<T, float>::value) {
    // m16n8k8 tf32 A: a0 (g, t), a1 (g + 8, t), a2 (g, t + 4), a3 (g + 8, t + 4).
#pragma unroll
    for (int s = 0; s < q.kSteps; ++s) {
      const int d = 8 * s + t4;
      q.a[s][0] = row0 ? row0[d] : 0.0f;
      q.a[s][1] = row1 ? row1[d] : 0.0f;
      q.a[s][2] = row0 ? row0[d + 4] : 0.0f;
      q.a[s][3] = row1 ? row1[d + 4] : 0.0f;
    }
  } else {
    // m16n8k16 A: x0 (g, 2t..2t+1), x1 (g + 8, 2t..), x2 (g, 2t+8..), x3 (g + 8, 2t+8..). Raw
    // 16-bit loads: q may be only 2-byte aligned (strided views).
    const auto pair = [](const T* row, int d) -> uint32_t {
      if (row == nullptr) return 0u;
      const uint16_t* bits = reinterpret_cast<const uint16_t*>(row + d);
      return static_cast<uint32_t>(bits[0]) | (static_cast<uint32_t>(bits[1]) << 16);
    };
#pragma unroll
    for (int s = 0; s < q.kSteps; ++s) {
      const int d = 16 * s + 2 * t4;
      q.a[s].x[0] = pair(row0, d);
      q.a[s].x[1] = pair(row1, d);
      q.a[s].x[2] = pair(row0, d + 8);
      q.a[s].x[3] = pair(row1, d + 8);
    }
  }
}

// S[j] = Q K_j^T for the n8 key tiles j of the stage's K tile.
template <typename T, int kHeadDim>
__device__ __forceinline__ void compute_scores(FragC (&s)[Element<T>::kBlockN / 8],
                                               QFragments<T, kHeadDim>& q,
                                               const SharedStorage<T, kHeadDim>& sm, int stage) {
  constexpr int kTilesN = Element<T>::kBlockN / 8;
  const int lane = threadIdx.x % 32;
  const int g = lane / 4, t4 = lane % 4;
#pragma unroll
  for (int j = 0; j < kTilesN; ++j) {
#pragma unroll
    for (int i = 0; i < 4; ++i) s[j].x[i] = 0.0f;
  }
  if constexpr (std::is_same<T, float>::value) {
    // m16n8k8 tf32 B (k = dim, n = key): b0 (k t, n g), b1 (k t + 4, n g) = K[key g][dim ...].
#pragma unroll
    for (int ks = 0; ks < q.kSteps; ++ks) {
#if !defined(VLMK_SIMT)
      // Left alone, ptxas hoists the tf32 hi/lo split of Q out of the key loop (2 x Dh/2
      // registers next to the Dh/2 of O): 255 registers and 184 bytes of spills at Dh=128.
      // Hiding Q's value from it at each use costs 3 ALU ops per element per 16-key tile.
#pragma unroll
      for (int i = 0; i < 4; ++i) asm volatile("" : "+f"(q.a[ks][i]));
#endif
#pragma unroll
      for (int j = 0; j < kTilesN; ++j) {
        const float* row = &sm.k[stage][8 * j + g][8 * ks + t4];
        const float b[2] = {ld_shared(row), ld_shared(row + 4)};
        tc::mma_m16n8k8_3xtf32(s[j], q.a[ks], b);
      }
    }
  } else {
    // ldmatrix.x4: lanes 8m..8m+7 address the rows of matrix m = (n8 tile 2jp + m / 2, dims
    // 16 ks + 8 (m % 2)); register m is then b0/b1 of those n8 tiles.
    const int m = lane / 8;
#pragma unroll
    for (int ks = 0; ks < q.kSteps; ++ks) {
#pragma unroll
      for (int jp = 0; jp < kTilesN / 2; ++jp) {
        FragB b0, b1;
        const T* row = &sm.k[stage][8 * (2 * jp + m / 2) + lane % 8][16 * ks + 8 * (m % 2)];
        tc::ldmatrix_x4(b0.x[0], b0.x[1], b1.x[0], b1.x[1], row);
        tc::mma_m16n8k16<T>(s[2 * jp], q.a[ks], b0);
        tc::mma_m16n8k16<T>(s[2 * jp + 1], q.a[ks], b1);
      }
    }
  }
}

// O += P V for the stage's V tile; p holds the probabilities in the C layout of compute_scores.
template <typename T, int kHeadDim>
__device__ __forceinline__ void accumulate_pv(FragC (&o)[kHeadDim / 8],
                                              const FragC (&p)[Element<T>::kBlockN / 8],
                                              const SharedStorage<T, kHeadDim>& sm, int stage) {
  constexpr int kTilesN = Element<T>::kBlockN / 8;
  const int lane = threadIdx.x % 32;
  const int g = lane / 4, t4 = lane % 4;
  if constexpr (std::is_same<T, float>::value) {
    // k step = the 8 keys of n8 tile j. A thread holds P at keys 2t, 2t + 1 (C layout), the tf32
    // A layout wants keys t, t + 4: the k index is a dummy of the sum, so it is permuted (A's
    // k = t <-> key 2t, k = t + 4 <-> key 2t + 1) identically in B: b0 = V[2t][g],
    // b1 = V[2t + 1][g].
#pragma unroll
    for (int j = 0; j < kTilesN; ++j) {
      const float a[4] = {p[j].x[0], p[j].x[2], p[j].x[1], p[j].x[3]};
#pragma unroll
      for (int n = 0; n < kHeadDim / 8; ++n) {
        const float b[2] = {ld_shared(&sm.v[stage][8 * j + 2 * t4][8 * n + g]),
                            ld_shared(&sm.v[stage][8 * j + 2 * t4 + 1][8 * n + g])};
        tc::mma_m16n8k8_3xtf32(o[n], a, b);
      }
    }
  } else {
    // k16 step ks covers n8 score tiles 2ks and 2ks + 1: their C fragments are exactly the A
    // fragment (x0 = rows g cols 2t.., x1 = row g + 8, x2/x3 = the second n8 tile).
    const int m = lane / 8;
#pragma unroll
    for (int ks = 0; ks < kTilesN / 2; ++ks) {
      FragA a;
      a.x[0] = pack2<T>(p[2 * ks].x[0], p[2 * ks].x[1]);
      a.x[1] = pack2<T>(p[2 * ks].x[2], p[2 * ks].x[3]);
      a.x[2] = pack2<T>(p[2 * ks + 1].x[0], p[2 * ks + 1].x[1]);
      a.x[3] = pack2<T>(p[2 * ks + 1].x[2], p[2 * ks + 1].x[3]);
      // ldmatrix.x4.trans: matrix m = keys 16 ks + 8 (m % 2) .. + 7, dims 8 (2 np + m / 2) .. + 7;
      // transposed, register m is b0 (m even) / b1 (m odd) of dim tile 2 np + m / 2.
#pragma unroll
      for (int np = 0; np < kHeadDim / 16; ++np) {
        FragB b0, b1;
        const T* row = &sm.v[stage][16 * ks + 8 * (m % 2) + lane % 8][8 * (2 * np + m / 2)];
        tc::ldmatrix_x4_trans(b0.x[0], b0.x[1], b1.x[0], b1.x[1], row);
        tc::mma_m16n8k16<T>(o[2 * np], a, b0);
        tc::mma_m16n8k16<T>(o[2 * np + 1], a, b1);
      }
    }
  }
}

// Attention of slots [slot_begin, slot_begin + kSlots) of (batch, kv_head) over the visible keys.
// split < 0: all visible tiles, writes out and lse. Else the split's share of the visible tiles
// (of num_splits); with num_splits == 1 it still writes out/lse, else the split's partials.
// Indices of slots, keys and chunks fit in int (the launcher checks), which keeps 64-bit
// divisions (calls on the GPU) out of the kernel; memory offsets are int64.
template <typename T, int kHeadDim>
__device__ __forceinline__ void attend_slot_tile(const Params& p, SharedStorage<T, kHeadDim>& sm,
                                                 bool vector_loads, int batch, int kv_head,
                                                 int slot_begin, int split) {
  constexpr int kBlockN = Element<T>::kBlockN;
  constexpr int kTilesN = kBlockN / 8;
  constexpr int kTilesD = kHeadDim / 8;
  static_assert((kBlockN % 16 == 0 || std::is_same<T, float>::value) && kHeadDim % 16 == 0,
                "whole k16 steps");

  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int g = lane / 4, t4 = lane % 4;
  const int group = static_cast<int>(p.heads_q / p.heads_kv);
  const int media_len = static_cast<int>(p.media_len);
  const int key_len = static_cast<int>(p.key_len);
  const int slot_end = min(slot_begin + kSlots, static_cast<int>(p.query_len) * group);
  const int t_first = slot_begin / group;
  const int num_rows = (slot_end - 1) / group - t_first + 1;
  const uint8_t* mask = p.media_mask + batch * p.mask_stride_batch + t_first * p.mask_stride_query;

  // This thread's two rows (g and g + 8 of the warp's m16 tile): validity, query, head.
  bool row_valid[2];
  int row_local[2];  // query row relative to t_first
  int row_head[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int slot = slot_begin + warp * kRowsPerWarp + g + 8 * i;
    row_valid[i] = slot < slot_end;
    const int t = row_valid[i] ? slot / group : t_first;
    row_local[i] = t - t_first;
    row_head[i] = kv_head * group + (row_valid[i] ? slot - t * group : 0);
  }
  const bool warp_active = slot_begin + warp * kRowsPerWarp < slot_end;  // warp-uniform

  QFragments<T, kHeadDim> q;
  {
    const T* q_base = static_cast<const T*>(p.q) + batch * p.q_stride_batch;
    const T* rows[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      rows[i] = row_valid[i] ? q_base + (t_first + row_local[i]) * p.q_stride_query +
                                   row_head[i] * p.q_stride_head
                             : nullptr;
    }
    load_q<T, kHeadDim>(q, rows[0], rows[1]);
  }

  __syncthreads();  // the previous slot tile of this block is done with shared memory

  // Uniform mode: the rows of this tile that see no chunk at all (bit r: row t_first + r).
  uint64_t empty_rows = 0;
  if (p.uniform) {
    for (int r = 0; r < num_rows; ++r) {
      bool seen = false;
      for (int chunk = threadIdx.x; chunk < p.num_chunks && !seen; chunk += kThreads) {
        seen = mask[r * p.mask_stride_query + chunk * p.mask_stride_chunk] != 0;
      }
      if (!__syncthreads_or(seen)) empty_rows |= uint64_t{1} << r;
    }
  }
  bool row_empty[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) row_empty[i] = ((empty_rows >> row_local[i]) & 1u) != 0u;

  const int chunk_end = static_cast<int>(p.num_chunks);
  // Decode: this split's range [tile_lo, tile_hi) of the block's visible tiles, counted on the
  // schedule alone (no key is read).
  int64_t tile_lo = 0, tile_hi = INT64_MAX;
  if (split >= 0) {
    int64_t visible_tiles = 0;
    for (int window = 0; window < chunk_end; window += kWindow) {
      build_window(p, sm.row_bits, sm.union_bits, mask, num_rows, window, chunk_end,
                   empty_rows != 0u);
      TileCursor c;
      while (next_tile<kBlockN>(c, sm.union_bits, window, 0, key_len, media_len)) {
        // Whole runs at once: tiles of the run from here.
        visible_tiles += (c.run_end - c.begin + kBlockN - 1) / kBlockN;
        c.end = c.run_end;
      }
      __syncthreads();  // every thread has read the bits before the next window is written
    }
    tile_lo = split * visible_tiles / p.num_splits;
    tile_hi = (split + 1) * visible_tiles / p.num_splits;
  }

  FragC o[kTilesD];
#pragma unroll
  for (int n = 0; n < kTilesD; ++n) {
#pragma unroll
    for (int i = 0; i < 4; ++i) o[n].x[i] = 0.0f;
  }
  float row_max[2] = {-INFINITY, -INFINITY};  // running max of the log2-domain scores
  float row_sum[2] = {0.0f, 0.0f};  // this thread's share of the running sum of exp2(s - max)
  const float scale_log2 = p.scale * kLog2e;

  const T* k_base =
      static_cast<const T*>(p.k) + batch * p.k_stride_batch + kv_head * p.k_stride_head;
  const T* v_base =
      static_cast<const T*>(p.v) + batch * p.v_stride_batch + kv_head * p.v_stride_head;
  int64_t tile_index = 0;  // visible tiles passed so far (decode ranges)

  for (int window = 0; window < chunk_end && tile_index < tile_hi; window += kWindow) {
    build_window(p, sm.row_bits, sm.union_bits, mask, num_rows, window, chunk_end,
                 empty_rows != 0u);
    // Tiles of this window inside [tile_lo, tile_hi), in order.
    const auto advance = [&](TileCursor& c) {
      while (tile_index < tile_hi &&
             next_tile<kBlockN>(c, sm.union_bits, window, 0, key_len, media_len)) {
        if (tile_index++ >= tile_lo) return true;
      }
      return false;
    };
    TileCursor current;
    bool have = advance(current);
    if (have) {
      load_tile<T, kHeadDim>(sm, 0, current, k_base, v_base, p.k_stride_key, p.v_stride_key,
                             vector_loads);
    }
    for (int stage = 0; have; stage ^= 1) {
      TileCursor next = current;
      const bool have_next = advance(next);
      if (have_next) {
        // Stage `stage ^ 1` was last read in the previous iteration, which ended with a barrier.
        load_tile<T, kHeadDim>(sm, stage ^ 1, next, k_base, v_base, p.k_stride_key, p.v_stride_key,
                               vector_loads);
        tc::cp_async_wait<1>();  // the current tile's group has landed; the next one in flight
      } else {
        tc::cp_async_wait<0>();
      }
      __syncthreads();  // the current tile is visible to every warp

      // A warp without slots (the tail of the last slot tile, or decode with few slots) only
      // helps to stage; it still meets every barrier.
      if (warp_active) {
        FragC s[kTilesN];
        compute_scores<T, kHeadDim>(s, q, sm, stage);

        // Per-row masking on the fragments: element (row g + 8 i, key 8 j + 2 t + e) is x[2 i + e].
        bool key_seen[2][kTilesN][2];
#pragma unroll
        for (int j = 0; j < kTilesN; ++j) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int key = current.begin + 8 * j + 2 * t4 + e;
            const bool key_in = key < current.end;
            const int bit = key_in ? key / media_len - window : 0;
#pragma unroll
            for (int i = 0; i < 2; ++i) {
              key_seen[i][j][e] =
                  key_in && row_valid[i] &&
                  (row_empty[i] ||
                   ((ld_shared(&sm.row_bits[row_local[i]][bit >> 5]) >> (bit & 31)) & 1u) != 0u);
            }
          }
        }

        // Online softmax update per row.
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          float tile_max = -INFINITY;
#pragma unroll
          for (int j = 0; j < kTilesN; ++j) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              float& x = s[j].x[2 * i + e];
              x = key_seen[i][j][e] ? x * scale_log2 : -INFINITY;
              tile_max = fmaxf(tile_max, x);
            }
          }
          tile_max = fmaxf(tile_max, __shfl_xor_sync(kFullMask, tile_max, 1));
          tile_max = fmaxf(tile_max, __shfl_xor_sync(kFullMask, tile_max, 2));
          const float new_max = fmaxf(row_max[i], tile_max);
          const float safe_max = new_max == -INFINITY ? 0.0f : new_max;  // no (-inf) - (-inf)
          const float rescale = exp2f(row_max[i] - safe_max);
          row_max[i] = new_max;
          float sum = 0.0f;
#pragma unroll
          for (int j = 0; j < kTilesN; ++j) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              float& x = s[j].x[2 * i + e];
              x = exp2f(x - safe_max);
              sum += x;
            }
          }
          row_sum[i] = row_sum[i] * rescale + sum;
#pragma unroll
          for (int n = 0; n < kTilesD; ++n) {
            o[n].x[2 * i] *= rescale;
            o[n].x[2 * i + 1] *= rescale;
          }
        }
        accumulate_pv<T, kHeadDim>(o, s, sm, stage);
      }
      __syncthreads();  // every warp is done with this stage before it is refilled
      current = next;
      have = have_next;
    }
    __syncthreads();  // every thread has read this window's bits before the next one is written
  }

  // Epilogue: normalize, write out + lse (or the split's partials).
  const bool partial = split >= 0 && p.num_splits > 1;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    float sum = row_sum[i];
    sum += __shfl_xor_sync(kFullMask, sum, 1);
    sum += __shfl_xor_sync(kFullMask, sum, 2);
    if (!row_valid[i]) continue;
    // sum == 0: the row saw nothing: exactly 0 and lse -inf (even if a NaN value of a key the
    // row may not see reached its accumulator as 0 * NaN). A NaN sum (NaN or inf - inf among the
    // visible scores) writes NaN out and lse, as SDPA does, and the combine keeps it.
    const bool empty = sum == 0.0f;
    const float inv_sum = 1.0f / sum;
    const float lse2 = empty ? -INFINITY : row_max[i] + log2f(sum);  // log2 domain
    const int t = t_first + row_local[i];
    const int head = row_head[i];
    const int64_t row = (static_cast<int64_t>(batch) * p.query_len + t) * p.heads_q + head;
    if (!partial) {
      T* out = static_cast<T*>(p.out) + row * kHeadDim;
#pragma unroll
      for (int n = 0; n < kTilesD; ++n) {
        const int col = 8 * n + 2 * t4;
        out[col] = Element<T>::from_float(empty ? 0.0f : o[n].x[2 * i] * inv_sum);
        out[col + 1] = Element<T>::from_float(empty ? 0.0f : o[n].x[2 * i + 1] * inv_sum);
      }
      if (t4 == 0) {
        p.lse[(static_cast<int64_t>(batch) * p.heads_q + head) * p.query_len + t] = lse2 * kLn2;
      }
    } else {
      float* out = p.partial_out + (row * p.num_splits + split) * kHeadDim;
#pragma unroll
      for (int n = 0; n < kTilesD; ++n) {
        const int col = 8 * n + 2 * t4;
        out[col] = empty ? 0.0f : o[n].x[2 * i] * inv_sum;
        out[col + 1] = empty ? 0.0f : o[n].x[2 * i + 1] * inv_sum;
      }
      if (t4 == 0) p.partial_lse[row * p.num_splits + split] = lse2;
    }
  }
}

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    image_text_attention_prefill_kernel(const __grid_constant__ Params p, const bool vector_loads) {
  using Storage = SharedStorage<T, kHeadDim>;
  VLMK_SHARED(Storage, smem);
  attend_slot_tile<T, kHeadDim>(p, smem, vector_loads, blockIdx.z, blockIdx.y, blockIdx.x * kSlots,
                                -1);
}

// One slot tile per block (blockIdx.y = kv_head * slot_tiles + tile): a loop over the slot tiles
// inside the block kept more state live and made the float32 decode kernels spill.
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    image_text_attention_decode_kernel(const __grid_constant__ Params p, const bool vector_loads,
                                       const int slot_tiles) {
  using Storage = SharedStorage<T, kHeadDim>;
  VLMK_SHARED(Storage, smem);
  const int kv_head = blockIdx.y / slot_tiles;
  const int slot_begin = (blockIdx.y - kv_head * slot_tiles) * kSlots;
  attend_slot_tile<T, kHeadDim>(p, smem, vector_loads, blockIdx.z, kv_head, slot_begin, blockIdx.x);
}

// warp-wide reductions for the combine kernel
__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    x = fmaxf(x, __shfl_xor_sync(kFullMask, x, offset));
  }
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
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
  constexpr int64_t kVec = 16 / static_cast<int64_t>(sizeof(T));
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
  const int64_t slot_tiles = (slots + kSlots - 1) / kSlots;  // <= 16 * G / 64 + 1
  if (p.heads_kv * slot_tiles > 65535) return static_cast<int>(cudaErrorInvalidConfiguration);
  const dim3 grid(static_cast<unsigned>(p.num_splits),
                  static_cast<unsigned>(p.heads_kv * slot_tiles), static_cast<unsigned>(p.batch));
  status = VLMK_LAUNCH((image_text_attention_decode_kernel<T, kHeadDim>), grid, dim3(kThreads), 0,
                       stream, p, vector_loads, static_cast<int>(slot_tiles));
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
    if (p.num_splits < 1 || p.num_splits > kImageTextAttentionMaxSplits) {
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
