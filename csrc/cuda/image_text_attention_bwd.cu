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
#include <initializer_list>
#include <type_traits>

#include "common/cuda_compat.cuh"
#include "common/tensor_core.cuh"
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
using tc::FragA;
using tc::FragB;
using tc::FragC;

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr float kLog2e = 1.4426950408889634f;

// Both kernels: 16-bit inputs keep two blocks per SM (smem <= 70 KB, 255 registers allowed);
// float32 needs ~135 KB of shared memory at Dh = 128, one block.
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
  // The small terms first, so that they are not lost against the large one.
  __device__ static __forceinline__ void mma(FragC& c, const A& a, const B& b) {
    tc::mma_m16n8k8_tf32(c, a.lo, b.hi, c);
    tc::mma_m16n8k8_tf32(c, a.hi, b.lo, c);
    tc::mma_m16n8k8_tf32(c, a.hi, b.hi, c);
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
  float sum = 0.0f;
  for (int d = lane; d < p.head_dim; d += 32) sum = fmaf(to_float(o[d]), to_float(g[d]), sum);
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(kFullMask, sum, offset);
  if (lane == 0) p.delta[(b * p.heads_q + head) * p.query_len + t] = sum;
}

// ---- dk / dv ----

template <typename T, int kHeadDim>
struct DkdvShape {
  static constexpr int kBlockN = kImageTextAttentionBwdBlockN;
  static constexpr int kBlockM = kImageTextAttentionBwdDkdvBlockM;
  static constexpr int kLd = kHeadDim + 16 / static_cast<int>(sizeof(T));  // +16 bytes a row
  static constexpr int kTile = kBlockM * kLd;                              // elements
  // T: K, V [kBlockN][kLd]; Q, dO [2 stages][kBlockM][kLd]; then float lse2, delta, visible
  // [2 stages][kBlockM].
  static constexpr int kStatsOffset = (2 * kBlockN * kLd + 4 * kTile) * sizeof(T);
  static constexpr int kSmemBytes = kStatsOffset + 2 * 3 * kBlockM * sizeof(float);
  static_assert(kBlockN == 16 * kWarps, "a warp owns 16 keys");
  static_assert(kBlockM % 16 == 0, "query tiles are whole n16 / k16 steps");
};

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kThreads, min_blocks_per_sm<T>())
    image_text_attention_bwd_dkdv_kernel(const Params p, bool async) {
  using Shape = DkdvShape<T, kHeadDim>;
  using Ops = TensorOps<T>;
  constexpr int kBlockN = Shape::kBlockN, kBlockM = Shape::kBlockM, kLd = Shape::kLd;
  constexpr int kK = Ops::kK;
  constexpr int kQueryTiles = kBlockM / 8;  // n8 tiles of S^T
  constexpr int kDimTiles = kHeadDim / 8;   // n8 tiles of dK, dV
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

    // S^T = K Q^T and dP^T = V dO^T for the warp's 16 keys x kBlockM queries.
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
    const float* lse_t = lse_s + stage * kBlockM;
    const float* delta_t = delta_s + stage * kBlockM;
    const float* visible_t = visible_s + stage * kBlockM;
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
    // dV += P^T dO, dK += dS^T Q (k = the step's query rows).
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
    __syncthreads();  // every warp is done with this stage before the next prefetch refills it
  }
  store_acc<T, kHeadDim>(dk, out_stride, dk_acc, m0, keys_valid, p.scale);
  store_acc<T, kHeadDim>(dv, out_stride, dv_acc, m0, keys_valid, 1.0f);
}

// ---- dq ----

template <typename T, int kHeadDim>
struct DqShape {
  static constexpr int kBlockM = kImageTextAttentionBwdDqBlockM;
  static constexpr int kBlockN = 32;  // keys per K/V tile
  static constexpr int kLd = kHeadDim + 16 / static_cast<int>(sizeof(T));
  // T: Q, dO [kBlockM][kLd]; K, V [2 stages][kBlockN][kLd].
  static constexpr int kKvTile = kBlockN * kLd;
  static constexpr int kSmemBytes = (2 * kBlockM * kLd + 4 * kKvTile) * sizeof(T);
  static_assert(kBlockM == 16 * kWarps, "a warp owns 16 query rows");
  static_assert(kBlockN % 16 == 0, "key tiles are whole n16 / k16 steps");
};

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kThreads, min_blocks_per_sm<T>())
    image_text_attention_bwd_dq_kernel(const Params p, bool async) {
  using Shape = DqShape<T, kHeadDim>;
  using Ops = TensorOps<T>;
  constexpr int kBlockN = Shape::kBlockN, kBlockM = Shape::kBlockM, kLd = Shape::kLd;
  constexpr int kK = Ops::kK;
  constexpr int kKeyTiles = kBlockN / 8;
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
        const int key = 8 * j + 2 * (lane % 4) + (e & 1);
        const int half = e / 2;
        const bool visible = sees[half] && key < keys_valid;
        const float prob = exp2f(s[j].x[e] * scale_log2 - lse2[half]);
        dp[j].x[e] = visible ? prob * (dp[j].x[e] - delta[half]) : 0.0f;
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

template <typename T>
bool aligned_16(const void* ptr, std::initializer_list<int64_t> strides) {
  if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) return false;
  for (const int64_t stride : strides) {
    if ((stride * static_cast<int64_t>(sizeof(T))) % 16 != 0) return false;
  }
  return true;
}

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
