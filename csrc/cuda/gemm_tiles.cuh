// Tensor-core GEMM tile machinery shared by the implicit-GEMM kernels (patch_embed,
// concat_project): element conversions, the shared-memory tile copies, the warp's 16 x 64
// tensor-core tile product and the double-buffered main loop.
//
// Every GEMM here is a block of 4 warps computing a 64 x 64 output tile, warp w owning rows
// [16 w, 16 w + 16) and all 64 columns (8 n8 accumulators), over reduction steps of 32. Operand
// tiles live in shared memory in one of two layouts per operand, read by ldmatrix (16-bit types)
// or by scalar loads of the m16n8k8 tf32 fragments (float32, 3xTF32):
//   A "row-major"   [m][k] (k contiguous): ldmatrix.x4
//   A "transposed"  [k][m] (m contiguous): ldmatrix.x4.trans
//   B "n-major"     [n][k] (k contiguous): ldmatrix.x4 (two n8 tiles)
//   B "k-major"     [k][n] (n contiguous): ldmatrix.x4.trans (two n8 tiles)
// Rows are padded (TileRow) so that those reads are free of bank conflicts: 16 bytes for the
// ldmatrix rows; for float32 a row stride of 4 (mod 32) words where lanes g step along rows and 8
// (mod 32) where lanes t do.
//
// The same source compiles for the GPU (namespace vlmk::cuda) and, with VLMK_SIMT defined, for the
// SIMT emulator (vlmk::sim).
#pragma once

#include <cstdint>
#include <type_traits>

#include "common/cuda_compat.cuh"
#include "common/mma_ops.cuh"
#include "common/tensor_core.cuh"

#if defined(VLMK_SIMT)
#define VLMK_GEMM_NAMESPACE sim
#else
#define VLMK_GEMM_NAMESPACE cuda
#endif

namespace vlmk {
namespace VLMK_GEMM_NAMESPACE {
namespace gemm_tiles {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kRows = 64;           // output rows per block
constexpr int kCols = 64;           // output columns per block
constexpr int kDepth = 32;          // reduction step
constexpr int kTilesN = kCols / 8;  // n8 accumulators per warp
static_assert(kRows == 16 * kWarps, "one m16 row tile per warp");

using tc::FragA;
using tc::FragB;
using tc::FragC;

// ---- element types ----

template <typename T>
__device__ __forceinline__ T from_float(float x) {
  if constexpr (std::is_same<T, float>::value) {
    return x;
  } else if constexpr (std::is_same<T, __half>::value) {
    return __float2half_rn(x);
  } else {
    return __float2bfloat16_rn(x);
  }
}

template <typename T>
__device__ __forceinline__ float to_float(T x) {
  if constexpr (std::is_same<T, float>::value) {
    return x;
  } else if constexpr (std::is_same<T, __half>::value) {
    return __half2float(x);
  } else {
    return __bfloat162float(x);
  }
}

// Padded row length (elements) of a shared tile with `kWidth` columns (see the file comment).
template <typename T, int kWidth>
constexpr int TileRow = kWidth + ((sizeof(T) == 4 && kWidth % 64 == 32) ? 4 : 8);

// Copies rows of a row-major global matrix into the shared tile [kTileRows][kTileCols]:
// tile row j is src + row_offset(row_begin + j) (a negative offset: a zero row), columns
// col_begin.. (zeros at col_end and past). vector: cp.async 16 bytes (src and the offsets
// 16-byte aligned, col_end a multiple of the vector); else element loads and stores. The caller
// commits the group.
template <typename T, int kTileRows, int kTileCols, typename RowOffset>
__device__ __forceinline__ void copy_tile(T* tile, int stride, const T* src,
                                          const RowOffset& row_offset, int64_t row_begin,
                                          int col_begin, int col_end, bool vector) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  static_assert(kTileCols % kVec == 0, "tile rows must fill whole 16-byte vectors");
  if (vector) {
    constexpr int kVectorsPerRow = kTileCols / kVec;
    for (int e = threadIdx.x; e < kTileRows * kVectorsPerRow; e += kThreads) {
      const int j = e / kVectorsPerRow;
      const int col = (e - j * kVectorsPerRow) * kVec;
      const int64_t offset = row_offset(row_begin + j);
      const bool valid = offset >= 0 && col_begin + col < col_end;
      const T* from = valid ? src + offset + col_begin + col : src;  // not read when !valid
      tc::cp_async_16(&tile[j * stride + col], from, valid);
    }
  } else {
    for (int e = threadIdx.x; e < kTileRows * kTileCols; e += kThreads) {
      const int j = e / kTileCols;
      const int col = e - j * kTileCols;
      const int64_t offset = row_offset(row_begin + j);
      const bool valid = offset >= 0 && col_begin + col < col_end;
      st_shared(&tile[j * stride + col], valid ? src[offset + col_begin + col] : from_float<T>(0));
    }
  }
}

// acc[j] (rows m0.., columns 8 j..) += A[m0:m0+16, 0:kDepth] B[0:kDepth, 0:64] for the warp.
// kATransposed: A stored [k][m], else [m][k]; kBKMajor: B stored [k][n], else [n][k].
template <typename T, bool kATransposed, bool kBKMajor>
__device__ __forceinline__ void warp_tile_mma(FragC (&acc)[kTilesN], const T* a, int a_stride,
                                              const T* b, int b_stride, int m0) {
  const int lane = threadIdx.x % 32;
  if constexpr (std::is_same<T, float>::value) {
    // m16n8k8 tf32: A a0 (g, t), a1 (g+8, t), a2 (g, t+4), a3 (g+8, t+4); B b0 (t, g), b1 (t+4, g).
    const int g = lane / 4, t = lane % 4;
    const auto a_at = [&](int m, int k) {
      return kATransposed ? ld_shared(&a[k * a_stride + m]) : ld_shared(&a[m * a_stride + k]);
    };
    const auto b_at = [&](int k, int n) {
      return kBKMajor ? ld_shared(&b[k * b_stride + n]) : ld_shared(&b[n * b_stride + k]);
    };
#pragma unroll
    for (int k0 = 0; k0 < kDepth; k0 += 8) {
      const float af[4] = {a_at(m0 + g, k0 + t), a_at(m0 + g + 8, k0 + t), a_at(m0 + g, k0 + t + 4),
                           a_at(m0 + g + 8, k0 + t + 4)};
#pragma unroll
      for (int j = 0; j < kTilesN; ++j) {
        const float bf[2] = {b_at(k0 + t, 8 * j + g), b_at(k0 + t + 4, 8 * j + g)};
        tc::mma_m16n8k8_3xtf32(acc[j], af, bf);
      }
    }
  } else {
    // ldmatrix.x4: lane l supplies a row of matrix i = l / 8, row r = l % 8 within it.
    const int i = lane / 8, r = lane % 8;
#pragma unroll
    for (int k0 = 0; k0 < kDepth; k0 += 16) {
      FragA af;
      if constexpr (kATransposed) {  // matrices (m 0-7, k 0-7), (m 8-15, k 0-7), (m 0-7, k 8-15),
                                     // ..
        tc::ldmatrix_x4_trans(af.x[0], af.x[1], af.x[2], af.x[3],
                              &a[(k0 + r + 8 * (i / 2)) * a_stride + m0 + 8 * (i % 2)]);
      } else {
        tc::ldmatrix_x4(af.x[0], af.x[1], af.x[2], af.x[3],
                        &a[(m0 + lane % 16) * a_stride + k0 + 8 * (lane / 16)]);
      }
#pragma unroll
      for (int j = 0; j < kTilesN; j += 2) {
        // Matrices (n 0-7, k 0-7), (n 0-7, k 8-15) of n8 tile j, then the same of tile j + 1.
        FragB b0, b1;
        if constexpr (kBKMajor) {
          tc::ldmatrix_x4_trans(b0.x[0], b0.x[1], b1.x[0], b1.x[1],
                                &b[(k0 + r + 8 * (i % 2)) * b_stride + 8 * j + 8 * (i / 2)]);
        } else {
          tc::ldmatrix_x4(b0.x[0], b0.x[1], b1.x[0], b1.x[1],
                          &b[(8 * j + r + 8 * (i / 2)) * b_stride + k0 + 8 * (i % 2)]);
        }
        tc::mma_m16n8k16<T>(acc[j], af, b0);
        tc::mma_m16n8k16<T>(acc[j + 1], af, b1);
      }
    }
  }
}

// The double-buffered main loop over `steps` reduction steps. issue(stage, step) starts step's
// loads: the cp.async copies into the shared stage, committed as exactly one group, and any
// register-staged loads; finish(stage) writes the register-staged part into the stage;
// compute(stage) reads it. Step s + 1 is issued before step s is computed and finished after it.
template <typename Issue, typename Finish, typename Compute>
__device__ __forceinline__ void pipelined_steps(int steps, const Issue& issue, const Finish& finish,
                                                const Compute& compute) {
  if (steps <= 0) return;
  issue(0, 0);
  finish(0);
  for (int step = 0; step < steps; ++step) {
    const int stage = step & 1;
    const bool has_next = step + 1 < steps;
    if (has_next) {
      // Stage `stage ^ 1` was last read in the previous step, which ended with a barrier.
      issue(stage ^ 1, step + 1);
      tc::cp_async_wait<1>();  // this step's group has landed; the next one is in flight
    } else {
      tc::cp_async_wait<0>();
    }
    __syncthreads();  // the stage (copies and plain stores of every thread) is visible
    compute(stage);
    if (has_next) finish(stage ^ 1);  // no warp reads stage ^ 1 during this step
    __syncthreads();                  // every warp is done with the stage before it is refilled
  }
}

__device__ __forceinline__ void zero(FragC (&acc)[kTilesN]) {
#pragma unroll
  for (int j = 0; j < kTilesN; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[j].x[e] = 0.0f;
  }
}

// 16-byte vector copies possible from `ptr` with rows of `row_elements` elements of `bytes` each.
inline bool vectorizable(const void* ptr, int64_t row_elements, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && (row_elements * bytes) % 16 == 0;
}

}  // namespace gemm_tiles
}  // namespace VLMK_GEMM_NAMESPACE
}  // namespace vlmk
