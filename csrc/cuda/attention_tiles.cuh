// attention_tiles.cuh — the tile pieces the FA2-style attention kernels share (torch-free):
// image_text_attention's backward and perceiver_attention's forward and backward.
//
//   TensorOps<T>          per input type, the fragment loads and MMA of one k step: mma.m16n8k16
//                         with ldmatrix for bf16 / fp16, 3xTF32 on mma.m16n8k8 for float32
//   load_tile             a [rows, Dh] global tile into padded shared rows (cp.async or plain)
//   store_acc / zero_rows a warp's 16 x Dh accumulator to global / zeroed rows
//   aligned_16            (host) whether a tensor's rows allow 16-byte cp.async
//   DkdvTiles / DqTiles   the shared-memory plans of a dk/dv block and a dq block
//   row_dot               delta = sum_d dO * O of one row, by one warp (backward preprocess)
//   forward_tile_step     the online-softmax step of one K/V tile: S = Q K^T, mask, running max
//                         and sum, O += P V
//   dq_tile_step          dS = P (dO V^T - delta) on a K/V tile, dQ += dS K
//   dkdv_tile_step        on a Q/dO tile: S^T = K Q^T, dP^T = V dO^T, dV += P^T dO, dK += dS^T Q
// Every kernel built on them is a block of 4 warps, each warp owning 16 rows (the m16 tile) of
// the block's row tile; shared tiles are row-major with a row pitch `kLd` = Dh + 16 bytes (so
// that ldmatrix rows of consecutive lanes fall in different banks). Masking is a select, never a
// multiply, so NaN in a key a row may not see cannot reach that row's P or dS. Scores are in the
// log2 domain (scale * log2(e) folded in, exp2).
// The same source compiles for the GPU (namespace vlmk::cuda) and, with VLMK_SIMT defined, for the
// SIMT emulator (vlmk::sim); shared memory is touched only through cp.async / ldmatrix /
// ld_shared / st_shared so that the emulator's race checker sees every access.
#pragma once

#include <cfloat>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "common/cuda_compat.cuh"
#include "common/tensor_core.cuh"

#if defined(VLMK_SIMT)
#define VLMK_ATTN_NAMESPACE sim
#else
#define VLMK_ATTN_NAMESPACE cuda
#endif

namespace vlmk {
namespace VLMK_ATTN_NAMESPACE {
namespace attention_tiles {

using tc::FragA;
using tc::FragB;
using tc::FragC;

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr float kLog2e = 1.4426950408889634f;

// The backward kernels: 16-bit inputs keep two blocks per SM (smem <= 70 KB, 255 registers
// allowed); float32 needs ~135 KB of shared memory at Dh = 128, one block.
template <typename T>
constexpr int min_blocks_per_sm() {
  return sizeof(T) == 2 ? 2 : 1;
}

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// ---- tensor-core operations per input type ----
//
// A tiles are 16 (m) x kK, B tiles kK x 8 (n), loaded two n8 tiles at a time (B2). Shared tiles
// are row-major with a row pitch of `ld` elements:
//   load_a(s, ld, m0, k0)          A from rows m0.. of a [m][k] tile
//   load_b2(s, ld, n0, k0)         B of n tiles n0 and n0 + 8 from an [n][k] tile (K^T-style)
//   load_b2_trans(s, ld, k0, n0)   B of n tiles n0 and n0 + 8 from a [k][n] tile
//   a_from_c(c)                    the A fragment of the k step made of accumulator tiles c[..]
//                                  (16-bit: c[0], c[1]; tf32: c[0]) of a 16-row result
//   mma(c, a, b)                   c += a b
template <typename T>
struct TensorOps {  // __half and __nv_bfloat16: mma.m16n8k16, fragments by ldmatrix
  static constexpr int kK = 16;
  struct A {
    FragA f;
  };
  struct B {
    FragB f;
  };

  __device__ static __forceinline__ A load_a(const T* s, int ld, int m0, int k0) {
    const int lane = threadIdx.x % 32;
    A a;
    tc::ldmatrix_x4(a.f.x[0], a.f.x[1], a.f.x[2], a.f.x[3],
                    s + (m0 + lane % 16) * ld + k0 + 8 * (lane / 16));
    return a;
  }
  __device__ static __forceinline__ void load_b2(B (&b)[2], const T* s, int ld, int n0, int k0) {
    // Matrix i (lanes 8i..8i+7): rows n0 + 8 (i / 2).., columns k0 + 8 (i % 2)..
    const int lane = threadIdx.x % 32;
    const int i = lane / 8;
    tc::ldmatrix_x4(b[0].f.x[0], b[0].f.x[1], b[1].f.x[0], b[1].f.x[1],
                    s + (n0 + lane % 8 + 8 * (i / 2)) * ld + k0 + 8 * (i % 2));
  }
  __device__ static __forceinline__ void load_b2_trans(B (&b)[2], const T* s, int ld, int k0,
                                                       int n0) {
    // Matrix i: rows k0 + 8 (i % 2).., columns n0 + 8 (i / 2)..; .trans gives lane (g, t) the
    // elements (k 2t, 2t+1; n g): the B layout.
    const int lane = threadIdx.x % 32;
    tc::ldmatrix_x4_trans(b[0].f.x[0], b[0].f.x[1], b[1].f.x[0], b[1].f.x[1],
                          s + (k0 + lane % 16) * ld + n0 + 8 * (lane / 16));
  }
  __device__ static __forceinline__ uint32_t pack(float lo, float hi) {
    if constexpr (std::is_same<T, __half>::value) {
      return tc::pack_f16(lo, hi);
    } else {
      return tc::pack_bf16(lo, hi);
    }
  }
  // The m16n8k16 C layout of n tiles j, j + 1 is the A layout of one k16 step.
  __device__ static __forceinline__ A a_from_c(const FragC* c) {
    A a;
    a.f.x[0] = pack(c[0].x[0], c[0].x[1]);
    a.f.x[1] = pack(c[0].x[2], c[0].x[3]);
    a.f.x[2] = pack(c[1].x[0], c[1].x[1]);
    a.f.x[3] = pack(c[1].x[2], c[1].x[3]);
    return a;
  }
  // 16-bit operands have no hi / lo split: the forward's guarded form is the plain one.
  __device__ static __forceinline__ void mma_guarded(FragC& c, const A& a, const B& b) {
    mma(c, a, b);
  }
  __device__ static __forceinline__ void mma(FragC& c, const A& a, const B& b) {
    if constexpr (std::is_same<T, __half>::value) {
      tc::mma_m16n8k16_f16(c, a.f, b.f, c);
    } else {
      tc::mma_m16n8k16_bf16(c, a.f, b.f, c);
    }
  }
};

template <>
struct TensorOps<float> {  // 3xTF32 on mma.m16n8k8
  static constexpr int kK = 8;
  struct A {
    FragA hi, lo;
  };
  struct B {
    FragB hi, lo;
  };

  __device__ static __forceinline__ void split(float x, uint32_t& hi, uint32_t& lo) {
    hi = tc::to_tf32(x);
    lo = tc::to_tf32(x - __uint_as_float(hi));
  }
  __device__ static __forceinline__ A make_a(float x0, float x1, float x2, float x3) {
    A a;
    split(x0, a.hi.x[0], a.lo.x[0]);
    split(x1, a.hi.x[1], a.lo.x[1]);
    split(x2, a.hi.x[2], a.lo.x[2]);
    split(x3, a.hi.x[3], a.lo.x[3]);
    return a;
  }
  // tf32 A 16x8: x[0] (g, t), x[1] (g+8, t), x[2] (g, t+4), x[3] (g+8, t+4).
  __device__ static __forceinline__ A load_a(const float* s, int ld, int m0, int k0) {
    const int lane = threadIdx.x % 32;
    const float* p = s + (m0 + lane / 4) * ld + k0 + lane % 4;
    return make_a(ld_shared(p), ld_shared(p + 8 * ld), ld_shared(p + 4), ld_shared(p + 8 * ld + 4));
  }
  // tf32 B 8x8: x[0] (k t, n g), x[1] (k t+4, n g).
  __device__ static __forceinline__ void load_b2(B (&b)[2], const float* s, int ld, int n0,
                                                 int k0) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const float* p = s + (n0 + 8 * j + lane / 4) * ld + k0 + lane % 4;
      split(ld_shared(p), b[j].hi.x[0], b[j].lo.x[0]);
      split(ld_shared(p + 4), b[j].hi.x[1], b[j].lo.x[1]);
    }
  }
  __device__ static __forceinline__ void load_b2_trans(B (&b)[2], const float* s, int ld, int k0,
                                                       int n0) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const float* p = s + (k0 + lane % 4) * ld + n0 + 8 * j + lane / 4;
      split(ld_shared(p), b[j].hi.x[0], b[j].lo.x[0]);
      split(ld_shared(p + 4 * ld), b[j].hi.x[1], b[j].lo.x[1]);
    }
  }
  // C element (g', 2t' + e) sits in lane 4g' + t', register e (rows g' + 8: register 2 + e).
  // A wants (g, t) and (g, t + 4): lanes 4g + t/2 and 4g + 2 + t/2, register t % 2.
  __device__ static __forceinline__ A a_from_c(const FragC* c) {
    const int lane = threadIdx.x % 32;
    const int src = (lane & ~3) + (lane & 3) / 2;
    const bool odd = (lane & 1) != 0;
    float lo_cols[4], hi_cols[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      lo_cols[e] = __shfl_sync(kFullMask, c[0].x[e], src);
      hi_cols[e] = __shfl_sync(kFullMask, c[0].x[e], src + 2);
    }
    return make_a(odd ? lo_cols[1] : lo_cols[0], odd ? lo_cols[3] : lo_cols[2],
                  odd ? hi_cols[1] : hi_cols[0], odd ? hi_cols[3] : hi_cols[2]);
  }
  // The small terms first, so that they are not lost against the large one. With an inf operand
  // x - hi is NaN (and a_lo * inf + a_hi * inf can be inf - inf): NaN where float32 gives +-inf.
  // The backward steps use this form (mma_guarded spilled 4-232 B in the float32 backward kernels
  // at Dh 96 / 128, at 255 registers).
  __device__ static __forceinline__ void mma(FragC& c, const A& a, const B& b) {
    tc::mma_m16n8k8_tf32(c, a.lo, b.hi, c);
    tc::mma_m16n8k8_tf32(c, a.hi, b.lo, c);
    tc::mma_m16n8k8_tf32(c, a.hi, b.hi, c);
  }
  // The forward's form: the two small terms in their own accumulator, added clamped to +-FLT_MAX
  // (a NaN of them dropped), so an inf input gives the float32 result; the inf (or NaN) operand
  // also reaches the hi * hi product (mma_m16n8k8_3xtf32 in common/mma_ops.cuh does the same).
  __device__ static __forceinline__ void mma_guarded(FragC& c, const A& a, const B& b) {
    FragC small;
    zero_fragment(small);
    tc::mma_m16n8k8_tf32(small, a.lo, b.hi, small);
    tc::mma_m16n8k8_tf32(small, a.hi, b.lo, small);
    tc::mma_m16n8k8_tf32(c, a.hi, b.hi, c);
#pragma unroll
    for (int e = 0; e < 4; ++e) c.x[e] += fminf(fmaxf(small.x[e], -FLT_MAX), FLT_MAX);
  }
  __device__ static __forceinline__ void zero_fragment(FragC& c) {
#pragma unroll
    for (int e = 0; e < 4; ++e) c.x[e] = 0.0f;
  }
};

__device__ __forceinline__ void zero(FragC& c) {
#pragma unroll
  for (int e = 0; e < 4; ++e) c.x[e] = 0.0f;
}

// Copies rows [0, rows_valid) of a [kRows, kHeadDim] global tile (row pitch `stride` elements,
// unit stride along Dh) to shared memory (row pitch `ld`); rows past rows_valid become zeros.
// `async`: cp.async of 16-byte pieces (the caller commits and waits); else plain loads (inputs
// not 16-byte aligned) stored through st_shared.
template <typename T, int kRows, int kHeadDim>
__device__ __forceinline__ void load_tile(T* s, int ld, const T* g, int64_t stride, int rows_valid,
                                          bool async) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  constexpr int kPieces = kHeadDim / kVec;
  static_assert(kHeadDim % kVec == 0, "a row is whole 16-byte pieces");
  for (int i = threadIdx.x; i < kRows * kPieces; i += kThreads) {
    const int r = i / kPieces;
    const int d = (i % kPieces) * kVec;
    const bool valid = r < rows_valid;
    if (async) {
      tc::cp_async_16(s + r * ld + d, valid ? g + r * stride + d : g, valid);
    } else {
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        st_shared(s + r * ld + d + e, valid ? g[r * stride + d + e] : from_float<T>(0.0f));
      }
    }
  }
}

// Stores a warp's 16 x kHeadDim accumulator (rows m0.., n tiles of 8 columns) times `multiplier`
// to a contiguous row-major global tile with row pitch `stride`, rows < rows_valid only.
template <typename T, int kHeadDim>
__device__ __forceinline__ void store_acc(T* g, int64_t stride, const FragC (&acc)[kHeadDim / 8],
                                          int m0, int rows_valid, float multiplier) {
  const int lane = threadIdx.x % 32;
  const int r0 = m0 + lane / 4;
#pragma unroll
  for (int j = 0; j < kHeadDim / 8; ++j) {
    const int col = 8 * j + 2 * (lane % 4);
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = r0 + 8 * half;
      if (r < rows_valid) {
        g[r * stride + col] = from_float<T>(acc[j].x[2 * half] * multiplier);
        g[r * stride + col + 1] = from_float<T>(acc[j].x[2 * half + 1] * multiplier);
      }
    }
  }
}

// Zeros rows [0, rows) of a contiguous-row global tile with row pitch `stride`.
template <typename T, int kHeadDim>
__device__ __forceinline__ void zero_rows(T* g, int64_t stride, int rows) {
  for (int i = threadIdx.x; i < rows * kHeadDim; i += kThreads) {
    g[(i / kHeadDim) * stride + i % kHeadDim] = from_float<T>(0.0f);
  }
}

// Shared-memory plan of a dk/dv block: kBlockN keys (16 per warp), Q / dO steps of kBlockM rows.
// T: K, V [kBlockN][kLd]; Q, dO [2 stages][kBlockM][kLd]; then float lse2, delta, visible
// [2 stages][kBlockM].
template <typename T, int kHeadDim, int kBlockN_, int kBlockM_>
struct DkdvTiles {
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kLd = kHeadDim + 16 / static_cast<int>(sizeof(T));  // +16 bytes a row
  static constexpr int kTile = kBlockM * kLd;                              // elements
  static constexpr int kStatsOffset = (2 * kBlockN * kLd + 4 * kTile) * sizeof(T);
  static constexpr int kSmemBytes = kStatsOffset + 2 * 3 * kBlockM * sizeof(float);
  static_assert(kBlockN == 16 * kWarps, "a warp owns 16 keys");
  static_assert(kBlockM % 16 == 0, "query tiles are whole n16 / k16 steps");
};

// Shared-memory plan of a dq block (kBlockM rows, 16 per warp; K/V tiles of kBlockN keys).
// T: Q, dO [kBlockM][kLd]; K, V [2 stages][kBlockN][kLd].
template <typename T, int kHeadDim, int kBlockM_, int kBlockN_>
struct DqTiles {
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kLd = kHeadDim + 16 / static_cast<int>(sizeof(T));
  static constexpr int kKvTile = kBlockN * kLd;
  static constexpr int kSmemBytes = (2 * kBlockM * kLd + 4 * kKvTile) * sizeof(T);
  static_assert(kBlockM == 16 * kWarps, "a warp owns 16 query rows");
  static_assert(kBlockN % 16 == 0, "key tiles are whole n16 / k16 steps");
};

// Host: rows of a tensor at `ptr` with these element strides can be copied by 16-byte cp.async
// (the base pointer and every stride 16-byte aligned).
template <typename T>
inline bool aligned_16(const void* ptr, std::initializer_list<int64_t> strides) {
  if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) return false;
  for (const int64_t stride : strides) {
    if ((stride * static_cast<int64_t>(sizeof(T))) % 16 != 0) return false;
  }
  return true;
}

// delta = sum_d o[d] * grad_out[d] in fp32, by the 32 lanes of a warp (every lane gets it).
template <typename T>
__device__ __forceinline__ float row_dot(const T* o, const T* grad_out, int head_dim) {
  const int lane = threadIdx.x % 32;
  float sum = 0.0f;
  for (int d = lane; d < head_dim; d += 32) sum = fmaf(to_float(o[d]), to_float(grad_out[d]), sum);
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(kFullMask, sum, offset);
  return sum;
}

// One K/V tile of kBlockN keys for the warp's 16 query rows (m0.. of q_s): S = Q K^T, scores
// scaled into the log2 domain, masked by `visible(half, key)` (half 0: row g, 1: row g + 8 of the
// warp's tile; key: index in the tile), the running max / sum (this thread's share of each row's
// sum; reduced across the quad only at the end) rescaled, and O += P V with P in the input type
// (16-bit) or fp32 (3xTF32). A row that has seen only masked keys keeps max -inf and sum 0.
template <typename T, int kHeadDim, int kBlockN, int kLd, typename Visible>
__device__ __forceinline__ void forward_tile_step(FragC (&o)[kHeadDim / 8], float (&row_max)[2],
                                                  float (&row_sum)[2], const T* q_s,
                                                  const T* k_tile, const T* v_tile, int m0,
                                                  float scale_log2, Visible&& visible) {
  using Ops = TensorOps<T>;
  constexpr int kK = Ops::kK;
  constexpr int kKeyTiles = kBlockN / 8;
  static_assert(kBlockN % 16 == 0 && kHeadDim % 16 == 0, "whole n16 / k16 steps");
  const int lane = threadIdx.x % 32;
  FragC s[kKeyTiles];
#pragma unroll
  for (int j = 0; j < kKeyTiles; ++j) zero(s[j]);
#pragma unroll
  for (int kd = 0; kd < kHeadDim; kd += kK) {
    const typename Ops::A qa = Ops::load_a(q_s, kLd, m0, kd);
#pragma unroll
    for (int j = 0; j < kKeyTiles; j += 2) {
      typename Ops::B b[2];
      Ops::load_b2(b, k_tile, kLd, 8 * j, kd);
      Ops::mma_guarded(s[j], qa, b[0]);
      Ops::mma_guarded(s[j + 1], qa, b[1]);
    }
  }
  // C element e of n8 tile j: row g + 8 (e / 2), key 8 j + 2 t + (e % 2).
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    float tile_max = -INFINITY;
#pragma unroll
    for (int j = 0; j < kKeyTiles; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float& x = s[j].x[2 * half + e];
        x = visible(half, 8 * j + 2 * (lane % 4) + e) ? x * scale_log2 : -INFINITY;
        tile_max = fmaxf(tile_max, x);
      }
    }
    tile_max = fmaxf(tile_max, __shfl_xor_sync(kFullMask, tile_max, 1));
    tile_max = fmaxf(tile_max, __shfl_xor_sync(kFullMask, tile_max, 2));
    const float new_max = fmaxf(row_max[half], tile_max);
    const float safe_max = new_max == -INFINITY ? 0.0f : new_max;  // no (-inf) - (-inf)
    const float rescale = exp2f(row_max[half] - safe_max);
    row_max[half] = new_max;
    float sum = 0.0f;
#pragma unroll
    for (int j = 0; j < kKeyTiles; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float& x = s[j].x[2 * half + e];
        x = exp2f(x - safe_max);
        sum += x;
      }
    }
    row_sum[half] = row_sum[half] * rescale + sum;
#pragma unroll
    for (int n = 0; n < kHeadDim / 8; ++n) {
      o[n].x[2 * half] *= rescale;
      o[n].x[2 * half + 1] *= rescale;
    }
  }
  // O += P V (k = the tile's keys).
#pragma unroll
  for (int kk = 0; kk < kBlockN; kk += kK) {
    const typename Ops::A pa = Ops::a_from_c(&s[kk / 8]);
#pragma unroll
    for (int dn = 0; dn < kHeadDim; dn += 16) {
      typename Ops::B b[2];
      Ops::load_b2_trans(b, v_tile, kLd, kk, dn);
      Ops::mma_guarded(o[dn / 8], pa, b[0]);
      Ops::mma_guarded(o[dn / 8 + 1], pa, b[1]);
    }
  }
}

// dq pass, one K/V tile of kBlockN keys for the warp's 16 rows (m0.. of q_s / do_s): S = Q K^T,
// dP = dO V^T, dS = P (dP - delta) where `visible(half, key)` else 0, dQ += dS K (unscaled; the
// caller multiplies by the softmax scale at the store). lse2: the rows' lse in the log2 domain.
template <typename T, int kHeadDim, int kBlockN, int kLd, typename Visible>
__device__ __forceinline__ void dq_tile_step(FragC (&dq_acc)[kHeadDim / 8], const T* q_s,
                                             const T* do_s, const T* k_tile, const T* v_tile,
                                             int m0, const float (&lse2)[2],
                                             const float (&delta)[2], float scale_log2,
                                             Visible&& visible) {
  using Ops = TensorOps<T>;
  constexpr int kK = Ops::kK;
  constexpr int kKeyTiles = kBlockN / 8;
  static_assert(kBlockN % 16 == 0, "key tiles are whole n16 / k16 steps");
  const int lane = threadIdx.x % 32;
  FragC s[kKeyTiles], dp[kKeyTiles];
#pragma unroll
  for (int j = 0; j < kKeyTiles; ++j) {
    zero(s[j]);
    zero(dp[j]);
  }
#pragma unroll
  for (int kd = 0; kd < kHeadDim; kd += kK) {
    const typename Ops::A qa = Ops::load_a(q_s, kLd, m0, kd);
    const typename Ops::A oa = Ops::load_a(do_s, kLd, m0, kd);
#pragma unroll
    for (int j = 0; j < kKeyTiles; j += 2) {
      typename Ops::B b[2];
      Ops::load_b2(b, k_tile, kLd, 8 * j, kd);
      Ops::mma(s[j], qa, b[0]);
      Ops::mma(s[j + 1], qa, b[1]);
      Ops::load_b2(b, v_tile, kLd, 8 * j, kd);
      Ops::mma(dp[j], oa, b[0]);
      Ops::mma(dp[j + 1], oa, b[1]);
    }
  }
#pragma unroll
  for (int j = 0; j < kKeyTiles; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int half = e / 2;
      const bool sees = visible(half, 8 * j + 2 * (lane % 4) + (e & 1));
      const float prob = exp2f(s[j].x[e] * scale_log2 - lse2[half]);
      dp[j].x[e] = sees ? prob * (dp[j].x[e] - delta[half]) : 0.0f;
    }
  }
  // dQ += dS K (k = the tile's keys).
#pragma unroll
  for (int kk = 0; kk < kBlockN; kk += kK) {
    const typename Ops::A dsa = Ops::a_from_c(&dp[kk / 8]);
#pragma unroll
    for (int dn = 0; dn < kHeadDim; dn += 16) {
      typename Ops::B b[2];
      Ops::load_b2_trans(b, k_tile, kLd, kk, dn);
      Ops::mma(dq_acc[dn / 8], dsa, b[0]);
      Ops::mma(dq_acc[dn / 8 + 1], dsa, b[1]);
    }
  }
}

// dk/dv pass, one Q/dO tile of kBlockM query rows against the warp's 16 keys (m0.. of k_s / v_s):
// S^T = K Q^T, dP^T = V dO^T, P^T and dS^T where the key is usable (key_ok, rows g and g + 8 of
// the warp's keys) and the query row sees it (visible_t[row] != 0), dV += P^T dO, dK += dS^T Q
// (unscaled). lse_t / delta_t / visible_t: the tile rows' log2-domain lse, delta and visibility,
// in shared memory.
template <typename T, int kHeadDim, int kBlockM, int kLd>
__device__ __forceinline__ void dkdv_tile_step(FragC (&dk_acc)[kHeadDim / 8],
                                               FragC (&dv_acc)[kHeadDim / 8], const T* k_s,
                                               const T* v_s, const T* q_tile, const T* do_tile,
                                               const float* lse_t, const float* delta_t,
                                               const float* visible_t, const bool (&key_ok)[2],
                                               int m0, float scale_log2) {
  using Ops = TensorOps<T>;
  constexpr int kK = Ops::kK;
  constexpr int kQueryTiles = kBlockM / 8;  // n8 tiles of S^T
  static_assert(kBlockM % 16 == 0, "query tiles are whole n16 / k16 steps");
  const int lane = threadIdx.x % 32;
  FragC s[kQueryTiles], dp[kQueryTiles];
#pragma unroll
  for (int j = 0; j < kQueryTiles; ++j) {
    zero(s[j]);
    zero(dp[j]);
  }
#pragma unroll
  for (int kd = 0; kd < kHeadDim; kd += kK) {
    const typename Ops::A ka = Ops::load_a(k_s, kLd, m0, kd);
    const typename Ops::A va = Ops::load_a(v_s, kLd, m0, kd);
#pragma unroll
    for (int j = 0; j < kQueryTiles; j += 2) {
      typename Ops::B b[2];
      Ops::load_b2(b, q_tile, kLd, 8 * j, kd);
      Ops::mma(s[j], ka, b[0]);
      Ops::mma(s[j + 1], ka, b[1]);
      Ops::load_b2(b, do_tile, kLd, 8 * j, kd);
      Ops::mma(dp[j], va, b[0]);
      Ops::mma(dp[j + 1], va, b[1]);
    }
  }
  // P^T and dS^T in place (s, dp), by select: an invisible (row, key) is 0 whatever S holds.
#pragma unroll
  for (int j = 0; j < kQueryTiles; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int col = 8 * j + 2 * (lane % 4) + (e & 1);
      const bool visible = key_ok[e / 2] && ld_shared(&visible_t[col]) != 0.0f;
      const float prob = exp2f(s[j].x[e] * scale_log2 - ld_shared(&lse_t[col]));
      s[j].x[e] = visible ? prob : 0.0f;
      dp[j].x[e] = visible ? prob * (dp[j].x[e] - ld_shared(&delta_t[col])) : 0.0f;
    }
  }
  // dV += P^T dO, dK += dS^T Q (k = the tile's query rows).
#pragma unroll
  for (int kq = 0; kq < kBlockM; kq += kK) {
    const typename Ops::A pa = Ops::a_from_c(&s[kq / 8]);
    const typename Ops::A dsa = Ops::a_from_c(&dp[kq / 8]);
#pragma unroll
    for (int dn = 0; dn < kHeadDim; dn += 16) {
      typename Ops::B b[2];
      Ops::load_b2_trans(b, do_tile, kLd, kq, dn);
      Ops::mma(dv_acc[dn / 8], pa, b[0]);
      Ops::mma(dv_acc[dn / 8 + 1], pa, b[1]);
      Ops::load_b2_trans(b, q_tile, kLd, kq, dn);
      Ops::mma(dk_acc[dn / 8], dsa, b[0]);
      Ops::mma(dk_acc[dn / 8 + 1], dsa, b[1]);
    }
  }
}

}  // namespace attention_tiles
}  // namespace VLMK_ATTN_NAMESPACE
}  // namespace vlmk
