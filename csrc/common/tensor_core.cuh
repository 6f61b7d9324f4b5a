// tensor_core.cuh — the CUDA kernels' tensor-core building blocks (torch-free), namespace vlmk::tc.
//
// Under nvcc they are the PTX instructions (sm_80+; they run on sm_90a too): mma.sync,
// ldmatrix, cp.async. Under VLMK_SIMT they are the SIMT emulator's warp-collective emulations
// (simt/tensor_core.h) that follow the PTX ISA fragment layouts exactly, so a layout or
// synchronization bug fails under the emulator as it would on a GPU.
//
// API
//   struct FragA { uint32_t x[4]; };  m16n8k16: 8 x 16-bit (a0..a7, two per register, the
//                                     lower-numbered element in the low half); m16n8k8 tf32:
//                                     4 x tf32 (a0..a3)
//   struct FragB { uint32_t x[2]; };  m16n8k16: 4 x 16-bit (b0..b3); m16n8k8 tf32: 2 x tf32
//   struct FragC { float x[4]; };     fp32 accumulator c0..c3
//   mma_m16n8k16_bf16(d, a, b, c)     d = a*b + c, A 16x16 row-major, B 16x8 "col" (k-major per
//   mma_m16n8k16_f16(d, a, b, c)      column), fp32 accumulate; d may alias c
//   mma_m16n8k8_tf32(d, a, b, c)      A 16x8, B 8x8; uses a.x[0..3], b.x[0..1]
//   to_tf32(x)                        cvt.rna.tf32.f32 (round to nearest, ties away)
//   pack_bf16(lo, hi), pack_f16(lo, hi)  two floats -> one register (round to nearest even),
//                                     lo in bits 0..15
//   ldmatrix_x1/_x2/_x4(r..., row)    ldmatrix.sync.aligned.m8n8.x{1,2,4}.shared.b16: each lane
//   ldmatrix_x1/_x2/_x4_trans(...)    passes the shared address of the 16-byte row it supplies
//                                     (x1: lanes 0-7 give rows 0-7 of matrix 0; x2: lanes 0-15;
//                                     x4: lanes 8i..8i+7 give the rows of matrix i; the other
//                                     lanes' addresses are ignored); rows 16-byte aligned
//   cp_async_16(dst, src, valid)      cp.async.cg.shared.global, 16 bytes (both 16-byte aligned);
//                                     !valid: the 16 bytes are zero-filled, src is not read
//   cp_async_commit()                 cp.async.commit_group
//   cp_async_wait<N>()                cp.async.wait_group N: all but the N most recent committed
//                                     groups have landed (N = 0: everything)
//   Under the emulator the functions take extra defaulted (file, line) arguments for messages.
//
// Fragment layouts (PTX ISA "Matrix Fragments for mma.m16n8k16 / m16n8k8", ldmatrix), for lane
// l: g = l >> 2 (groupID), t = l % 4 (threadID_in_group). (r, c) = (row, column); for B, (k, n).
//
//   operand          register   elements (low half, high half)      matrix
//   ---------------  ---------  ----------------------------------  -----------------
//   A m16n8k16       x[0]       (g,   2t)   (g,   2t+1)             16 x 16 (m x k)
//     bf16 / f16     x[1]       (g+8, 2t)   (g+8, 2t+1)
//                    x[2]       (g,   2t+8) (g,   2t+9)
//                    x[3]       (g+8, 2t+8) (g+8, 2t+9)
//   B m16n8k16       x[0]       (2t,   g)   (2t+1, g)               16 x 8 (k x n)
//                    x[1]       (2t+8, g)   (2t+9, g)
//   A m16n8k8 tf32   x[0..3]    (g, t)  (g+8, t)  (g, t+4)  (g+8, t+4)   one per register
//   B m16n8k8 tf32   x[0..1]    (t, g)  (t+4, g)
//   C / D (both)     x[0..3]    (g, 2t)  (g, 2t+1)  (g+8, 2t)  (g+8, 2t+1)
//   ldmatrix r[i]    matrix i   (g, 2t)  (g, 2t+1)   of the 8x8 matrix as stored (row = the
//   .trans           matrix i   (2t, g)  (2t+1, g)   16-byte row a lane supplied)
//
//   So for m16n8k16: A from a row-major [m][k] tile is ldmatrix_x4 with lane l giving row
//   (l % 16), column 8 * (l / 16) (matrices: rows 0-7/k 0-7, rows 8-15/k 0-7, rows 0-7/k 8-15,
//   rows 8-15/k 8-15 -> x[0..3]); B stored [n][k] (K contiguous) is ldmatrix_x2 with lanes 0-7
//   giving n = l, k 0..7 and lanes 8-15 n = l - 8, k 8..15; B stored [k][n] (N contiguous) is
//   ldmatrix_x2_trans with lanes 0-15 giving row k = l.
//
// What the emulation guarantees (VLMK_SIMT, see simt/tensor_core.h)
//   - mma / ldmatrix are warp collectives: all 32 lanes must reach the same instruction (a
//     partial warp, an exited lane or divergence fails the launch); every lane gets exactly the
//     registers the ISA gives it, computed from the registers every lane brought.
//   - mma: bf16/f16 products exact, added to c in k order in fp32 (fmaf); tf32 operands lose
//     their low 13 mantissa bits (truncation, as the tensor core reads them). Results match a
//     GPU to fp32 rounding of the sum, not bit for bit.
//   - ldmatrix reads shared memory through the race checker (SIMT_RACECHECK=1) as reads by the
//     lanes that supplied the rows; rows outside shared memory or misaligned fail the launch.
//     mma / ldmatrix are rendezvous, not memory barriers: they order no shared-memory accesses
//     between lanes (use __syncwarp / __syncthreads), so the checker reports what PTX leaves
//     unordered.
//   - cp.async is asynchronous: the bytes land only at the cp_async_wait<N> that retires their
//     group, recorded as a shared-memory write of that thread at the wait; __syncthreads does
//     not complete them. A missing wait reads the 0xff poison (NaN); a missing __syncthreads
//     between a wait and another thread's read is a race the checker reports.
#pragma once

#include <stdint.h>

#include "common/cuda_compat.cuh"

#if defined(VLMK_SIMT)
#include "simt/tensor_core.h"
#endif

namespace vlmk {
namespace tc {

struct FragA {
  uint32_t x[4];
};
struct FragB {
  uint32_t x[2];
};
struct FragC {
  float x[4];
};

#if !defined(VLMK_SIMT)

__device__ __forceinline__ void mma_m16n8k16_bf16(FragC& d, const FragA& a, const FragB& b,
                                                  const FragC& c) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%10, %11, %12, %13};\n"
      : "=f"(d.x[0]), "=f"(d.x[1]), "=f"(d.x[2]), "=f"(d.x[3])
      : "r"(a.x[0]), "r"(a.x[1]), "r"(a.x[2]), "r"(a.x[3]), "r"(b.x[0]), "r"(b.x[1]), "f"(c.x[0]),
        "f"(c.x[1]), "f"(c.x[2]), "f"(c.x[3]));
}

__device__ __forceinline__ void mma_m16n8k16_f16(FragC& d, const FragA& a, const FragB& b,
                                                 const FragC& c) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%10, %11, %12, %13};\n"
      : "=f"(d.x[0]), "=f"(d.x[1]), "=f"(d.x[2]), "=f"(d.x[3])
      : "r"(a.x[0]), "r"(a.x[1]), "r"(a.x[2]), "r"(a.x[3]), "r"(b.x[0]), "r"(b.x[1]), "f"(c.x[0]),
        "f"(c.x[1]), "f"(c.x[2]), "f"(c.x[3]));
}

__device__ __forceinline__ void mma_m16n8k8_tf32(FragC& d, const FragA& a, const FragB& b,
                                                 const FragC& c) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%10, %11, %12, %13};\n"
      : "=f"(d.x[0]), "=f"(d.x[1]), "=f"(d.x[2]), "=f"(d.x[3])
      : "r"(a.x[0]), "r"(a.x[1]), "r"(a.x[2]), "r"(a.x[3]), "r"(b.x[0]), "r"(b.x[1]), "f"(c.x[0]),
        "f"(c.x[1]), "f"(c.x[2]), "f"(c.x[3]));
}

__device__ __forceinline__ uint32_t to_tf32(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return r;
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x = lo (low half)
  return *reinterpret_cast<const uint32_t*>(&v);
}

__device__ __forceinline__ uint32_t pack_f16(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldmatrix_x1(uint32_t& r0, const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n"
               : "=r"(r0)
               : "r"(smem_address(row))
               : "memory");
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t& r0, uint32_t& r1, const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r0), "=r"(r1)
               : "r"(smem_address(row))
               : "memory");
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3,
                                            const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(smem_address(row))
               : "memory");
}
__device__ __forceinline__ void ldmatrix_x1_trans(uint32_t& r0, const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n"
               : "=r"(r0)
               : "r"(smem_address(row))
               : "memory");
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t& r0, uint32_t& r1, const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r0), "=r"(r1)
               : "r"(smem_address(row))
               : "memory");
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t& r0, uint32_t& r1, uint32_t& r2,
                                                  uint32_t& r3, const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(smem_address(row))
               : "memory");
}

__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src,
                                            bool valid = true) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_address(smem_dst)),
               "l"(gmem_src), "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

#else  // VLMK_SIMT: the emulator's warp collectives (simt/tensor_core.h)

inline void mma_m16n8k16_bf16(FragC& d, const FragA& a, const FragB& b, const FragC& c,
                              const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::simt::tc::mma< ::simt::tc::kMmaBf16>(d.x, a.x, b.x, c.x, "mma_m16n8k16_bf16()", file, line);
}
inline void mma_m16n8k16_f16(FragC& d, const FragA& a, const FragB& b, const FragC& c,
                             const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::simt::tc::mma< ::simt::tc::kMmaF16>(d.x, a.x, b.x, c.x, "mma_m16n8k16_f16()", file, line);
}
inline void mma_m16n8k8_tf32(FragC& d, const FragA& a, const FragB& b, const FragC& c,
                             const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::simt::tc::mma< ::simt::tc::kMmaTf32>(d.x, a.x, b.x, c.x, "mma_m16n8k8_tf32()", file, line);
}

inline uint32_t to_tf32(float x) { return ::simt::tc::to_tf32(x); }

inline uint32_t pack_bf16(float lo, float hi) {
  return uint32_t(::simt::detail::float_to_bf16_bits(lo)) |
         (uint32_t(::simt::detail::float_to_bf16_bits(hi)) << 16);
}
inline uint32_t pack_f16(float lo, float hi) {
  return uint32_t(::simt::detail::float_to_half_bits(lo)) |
         (uint32_t(::simt::detail::float_to_half_bits(hi)) << 16);
}

inline void ldmatrix_x1(uint32_t& r0, const void* row, const char* file = __builtin_FILE(),
                        int line = __builtin_LINE()) {
  uint32_t r[1];
  ::simt::tc::ldmatrix<1, false>(r, row, file, line);
  r0 = r[0];
}
inline void ldmatrix_x2(uint32_t& r0, uint32_t& r1, const void* row,
                        const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  uint32_t r[2];
  ::simt::tc::ldmatrix<2, false>(r, row, file, line);
  r0 = r[0];
  r1 = r[1];
}
inline void ldmatrix_x4(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3, const void* row,
                        const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  uint32_t r[4];
  ::simt::tc::ldmatrix<4, false>(r, row, file, line);
  r0 = r[0];
  r1 = r[1];
  r2 = r[2];
  r3 = r[3];
}
inline void ldmatrix_x1_trans(uint32_t& r0, const void* row, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
  uint32_t r[1];
  ::simt::tc::ldmatrix<1, true>(r, row, file, line);
  r0 = r[0];
}
inline void ldmatrix_x2_trans(uint32_t& r0, uint32_t& r1, const void* row,
                              const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  uint32_t r[2];
  ::simt::tc::ldmatrix<2, true>(r, row, file, line);
  r0 = r[0];
  r1 = r[1];
}
inline void ldmatrix_x4_trans(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3,
                              const void* row, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
  uint32_t r[4];
  ::simt::tc::ldmatrix<4, true>(r, row, file, line);
  r0 = r[0];
  r1 = r[1];
  r2 = r[2];
  r3 = r[3];
}

inline void cp_async_16(void* smem_dst, const void* gmem_src, bool valid = true,
                        const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::simt::tc::cp_async(smem_dst, gmem_src, 16, valid, file, line);
}
inline void cp_async_commit() { ::simt::tc::cp_async_commit(); }
template <int N>
inline void cp_async_wait(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  static_assert(N >= 0, "cp.async.wait_group takes N >= 0");
  ::simt::tc::cp_async_wait(N, file, line);
}

#endif  // VLMK_SIMT

}  // namespace tc
}  // namespace vlmk
