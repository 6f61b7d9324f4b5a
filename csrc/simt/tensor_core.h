// The SIMT emulator's tensor-core instructions: mma.sync (m16n8k16 bf16/f16, m16n8k8 tf32, fp32
// accumulate), ldmatrix (x1/x2/x4, .trans) and cp.async (16 bytes, commit/wait groups). Kernels
// use them through common/tensor_core.cuh (vlmk::tc), which maps to the PTX instructions under
// nvcc and to these functions under VLMK_SIMT.
//
// - mma and ldmatrix are warp collectives on the emulator's warp rendezvous (the mechanism of
//   __shfl_sync): every lane of the warp must arrive (.sync.aligned: all 32 lanes, none exited,
//   the same instruction); the lane that completes the group rebuilds the whole matrices from
//   each lane's registers with the PTX ISA fragment layout, computes, and hands every lane
//   exactly the registers the ISA gives it. A fragment-layout bug gives a wrong answer here as
//   on a GPU. Their .sync makes the lanes wait for each other, but it is no memory barrier
//   (PTX: ldmatrix is a weak memory operation): for SIMT_RACECHECK they order nothing, unlike
//   __syncwarp (and the emulator's shuffles) - a shared-memory write of one lane and an access
//   of another lane with only an mma / ldmatrix between them is a race.
// - ldmatrix reads each 16-byte row through the race checker as a read by the lane that
//   supplied the row's address: a row another lane wrote with no __syncwarp/__syncthreads in
//   between is a race. Rows must be 16-byte aligned and lie in the block's shared memory.
// - mma numerics: bf16/f16 products are exact in fp32; the 16 (8 for tf32) products of a dot
//   product are added to c in k order with fp32 fmaf. tf32 operands: the low 13 mantissa bits of
//   each 32-bit register are ignored (truncated), as the tensor core does; to_tf32 rounds to
//   nearest, ties away (cvt.rna.tf32.f32). Hardware adds the products with its own internal
//   order/precision: results agree to fp32 rounding, not bit for bit.
// - cp.async is asynchronous: a copy is queued on its thread (the 16 source bytes are read at
//   issue, zeros when !valid); the bytes land in shared memory only at the cp_async_wait<N> that
//   retires the copy's group (wait<0> lands every pending copy, committed or not), as a
//   shared-memory write of that thread at the wait for the race checker. __syncthreads does not
//   complete copies. A missing wait reads the 0xff poison (NaN).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "simt/half.h"
#include "simt/runtime.h"

namespace simt {
namespace tc {

// Collective kinds (the `size` field of a custom collective: lanes that disagree are reported).
enum Kind : uint8_t {
  kMmaBf16 = 1,
  kMmaF16 = 2,
  kMmaTf32 = 3,
  kLdmatrix = 8,  // + (count - 1) + 4 * trans: 8..15
};

inline const char* kind_name(uint8_t kind) {
  switch (kind) {
    case kMmaBf16:
      return "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32";
    case kMmaF16:
      return "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32";
    case kMmaTf32:
      return "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32";
    default:
      return "ldmatrix.sync.aligned.m8n8.shared.b16";
  }
}

// .sync.aligned: the whole warp (32 lanes, none exited) at the same instruction.
inline bool check_full_warp(detail::BlockRunner& r, detail::Fiber* lanes, uint32_t group,
                            unsigned warp) {
  const detail::Fiber& first = lanes[__builtin_ctz(group)];
  if (group != 0xffffffffu) {
    r.fail(
        cudaErrorLaunchFailure,
        detail::cat(first.site.what, " at ", first.site.file, ":", first.site.line, ": warp ", warp,
                    " reached it with lanes missing (every lane of the warp must execute "
                    "a .sync.aligned tensor-core instruction; a partial warp, an exited lane "
                    "or a mask other than 0xffffffff is undefined behaviour on a GPU)"));
    return false;
  }
  for (unsigned l = 0; l < 32; ++l) {
    if (!detail::same_site(lanes[l].site, first.site)) {
      r.fail(cudaErrorLaunchFailure,
             detail::cat("warp ", warp, ": lanes met at different ", first.site.what,
                         " instructions (", first.site.file, ":", first.site.line, " and ",
                         lanes[l].site.file, ":", lanes[l].site.line,
                         "): .aligned requires every lane to execute the same one"));
      return false;
    }
  }
  return true;
}

// ---- mma ------------------------------------------------------------------------------------

struct MmaLane {
  uint32_t a[4];
  uint32_t b[2];
  float c[4];
  float d[4];
};

inline float bf16_lo(uint32_t r) { return detail::bf16_bits_to_float(uint16_t(r & 0xffffu)); }
inline float bf16_hi(uint32_t r) { return detail::bf16_bits_to_float(uint16_t(r >> 16)); }
inline float f16_lo(uint32_t r) { return detail::half_bits_to_float(uint16_t(r & 0xffffu)); }
inline float f16_hi(uint32_t r) { return detail::half_bits_to_float(uint16_t(r >> 16)); }
inline float tf32_value(uint32_t r) { return detail::bits_float(r & 0xffffe000u); }

template <uint8_t kKind>
void mma_collective(detail::BlockRunner& r, detail::Fiber* lanes, uint32_t group, unsigned warp) {
  if (!check_full_warp(r, lanes, group, warp)) return;
  constexpr int K = kKind == kMmaTf32 ? 8 : 16;
  float A[16][16];
  float B[16][8];
  float C[16][8];
  for (int l = 0; l < 32; ++l) {
    const MmaLane& p = *static_cast<const MmaLane*>(lanes[l].payload);
    const int g = l >> 2;
    const int t = l & 3;
    if (kKind == kMmaTf32) {
      // A 16x8: a0 (g, t), a1 (g+8, t), a2 (g, t+4), a3 (g+8, t+4); B 8x8: b0 (t, g), b1 (t+4, g)
      A[g][t] = tf32_value(p.a[0]);
      A[g + 8][t] = tf32_value(p.a[1]);
      A[g][t + 4] = tf32_value(p.a[2]);
      A[g + 8][t + 4] = tf32_value(p.a[3]);
      B[t][g] = tf32_value(p.b[0]);
      B[t + 4][g] = tf32_value(p.b[1]);
    } else {
      // A 16x16: x[0] = a0,a1 (g, 2t..2t+1), x[1] = a2,a3 (g+8, 2t..), x[2] = a4,a5 (g, 2t+8..),
      // x[3] = a6,a7 (g+8, 2t+8..); B 16x8: x[0] = b0,b1 (k 2t..2t+1, n g), x[1] = b2,b3 (2t+8..)
      auto lo = kKind == kMmaBf16 ? bf16_lo : f16_lo;
      auto hi = kKind == kMmaBf16 ? bf16_hi : f16_hi;
      const int rows[4] = {g, g + 8, g, g + 8};
      const int cols[4] = {2 * t, 2 * t, 2 * t + 8, 2 * t + 8};
      for (int i = 0; i < 4; ++i) {
        A[rows[i]][cols[i]] = lo(p.a[i]);
        A[rows[i]][cols[i] + 1] = hi(p.a[i]);
      }
      B[2 * t][g] = lo(p.b[0]);
      B[2 * t + 1][g] = hi(p.b[0]);
      B[2 * t + 8][g] = lo(p.b[1]);
      B[2 * t + 9][g] = hi(p.b[1]);
    }
    // C 16x8: c0,c1 (g, 2t..2t+1), c2,c3 (g+8, 2t..2t+1)
    C[g][2 * t] = p.c[0];
    C[g][2 * t + 1] = p.c[1];
    C[g + 8][2 * t] = p.c[2];
    C[g + 8][2 * t + 1] = p.c[3];
  }
  float D[16][8];
  for (int m = 0; m < 16; ++m) {
    for (int n = 0; n < 8; ++n) {
      float acc = C[m][n];
      for (int k = 0; k < K; ++k) acc = std::fmaf(A[m][k], B[k][n], acc);
      D[m][n] = acc;
    }
  }
  for (int l = 0; l < 32; ++l) {
    MmaLane& p = *static_cast<MmaLane*>(lanes[l].payload);
    const int g = l >> 2;
    const int t = l & 3;
    p.d[0] = D[g][2 * t];
    p.d[1] = D[g][2 * t + 1];
    p.d[2] = D[g + 8][2 * t];
    p.d[3] = D[g + 8][2 * t + 1];
  }
}

template <uint8_t kKind>
inline void mma(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4],
                const char* what, const char* file, int line) {
  detail::BlockRunner& r = detail::active(what);
  MmaLane p;
  std::memcpy(p.a, a, sizeof(p.a));
  std::memcpy(p.b, b, sizeof(p.b));
  std::memcpy(p.c, c, sizeof(p.c));
  r.warp_custom(&mma_collective<kKind>, kKind, &p, 0xffffffffu, {what, file, line});
  std::memcpy(d, p.d, sizeof(p.d));  // d may alias c
}

// ---- ldmatrix -------------------------------------------------------------------------------

struct LdmatrixLane {
  const void* row;
  uint32_t r[4];
};

template <int kCount, bool kTrans>
void ldmatrix_collective(detail::BlockRunner& r, detail::Fiber* lanes, uint32_t group,
                         unsigned warp) {
  if (!check_full_warp(r, lanes, group, warp)) return;
  uint16_t M[4][8][8];  // [matrix][row][column] as stored in shared memory
  for (int i = 0; i < kCount; ++i) {
    for (int row = 0; row < 8; ++row) {
      const detail::Fiber& f = lanes[8 * i + row];
      const void* p = static_cast<const LdmatrixLane*>(f.payload)->row;
      if (!r.in_shared_memory(p, 16)) {
        r.fail(cudaErrorIllegalAddress,
               detail::cat(r.thread_string(f), " (lane ", 8 * i + row, ") gives ldmatrix row ", row,
                           " of matrix ", i, " at ", detail::BlockRunner::hex_pointer(p),
                           ", not 16 bytes of the block's shared memory, at ", f.site.file, ":",
                           f.site.line));
        return;
      }
      if (reinterpret_cast<uintptr_t>(p) % 16 != 0) {
        r.fail(cudaErrorMisalignedAddress,
               detail::cat(r.thread_string(f), " (lane ", 8 * i + row, ") gives ldmatrix row ", row,
                           " of matrix ", i, " at ", detail::BlockRunner::hex_pointer(p),
                           ", not 16-byte aligned, at ", f.site.file, ":", f.site.line));
        return;
      }
      if (r.racecheck()) r.shared_access(p, 16, false, f.site.file, f.site.line, &f);
      std::memcpy(M[i][row], p, 16);
    }
  }
  for (int l = 0; l < 32; ++l) {
    LdmatrixLane& out = *static_cast<LdmatrixLane*>(lanes[l].payload);
    const int g = l >> 2;
    const int t = l & 3;
    for (int i = 0; i < kCount; ++i) {
      // Lane l holds row l/4, columns 2(l%4), 2(l%4)+1; .trans: the transposed matrix.
      const uint16_t lo = kTrans ? M[i][2 * t][g] : M[i][g][2 * t];
      const uint16_t hi = kTrans ? M[i][2 * t + 1][g] : M[i][g][2 * t + 1];
      out.r[i] = uint32_t(lo) | (uint32_t(hi) << 16);
    }
  }
}

template <int kCount, bool kTrans>
inline void ldmatrix(uint32_t* regs, const void* row, const char* file, int line) {
  const char* what = kTrans ? "ldmatrix .trans" : "ldmatrix";
  detail::BlockRunner& r = detail::active(what);
  LdmatrixLane p;
  p.row = row;
  r.warp_custom(&ldmatrix_collective<kCount, kTrans>,
                uint8_t(kLdmatrix + (kCount - 1) + (kTrans ? 4 : 0)), &p, 0xffffffffu,
                {what, file, line});
  for (int i = 0; i < kCount; ++i) regs[i] = p.r[i];
}

// ---- cp.async -------------------------------------------------------------------------------

inline void cp_async(void* dst, const void* src, size_t bytes, bool valid, const char* file,
                     int line) {
  detail::active("cp.async")
      .async_copy(dst, src, bytes, valid, {"cp.async.cg.shared.global", file, line});
}

inline void cp_async_commit() { detail::active("cp.async.commit_group").async_commit(); }

inline void cp_async_wait(int n, const char* file, int line) {
  detail::active("cp.async.wait_group").async_wait(n, {"cp.async.wait_group", file, line});
}

// ---- conversions ----------------------------------------------------------------------------

// cvt.rna.tf32.f32: round to nearest, ties away from zero, to 10 mantissa bits (the low 13 bits
// of the result are zero). NaN stays NaN, infinities stay.
inline uint32_t to_tf32(float x) {
  const uint32_t u = detail::float_bits(x);
  if ((u & 0x7f800000u) == 0x7f800000u) {
    return (u & 0x007fffffu) != 0 ? (u | 0x00400000u) & 0xffffe000u : u;  // NaN / inf
  }
  return (u + 0x1000u) & 0xffffe000u;  // a carry into the exponent is the right rounding
}

}  // namespace tc
}  // namespace simt
