// Test kernels of common/tensor_core.cuh, portable: test_tensor_core.cpp runs them under the SIMT
// emulator, tensor_core_nvcc.cu compiles them with nvcc for sm_80 and sm_90a (the cubins are
// disassembled to check for HMMA / LDSM / LDGSTS instructions).
#pragma once

#include "common/tensor_core.cuh"

namespace tck {

using vlmk::tc::FragA;
using vlmk::tc::FragB;
using vlmk::tc::FragC;

// Planted faults.
enum Fault {
  kNoFault = 0,
  kSwapA12 = 1,      // a.x[1] and a.x[2] swapped (a transposed A fragment)
  kWrongBTrans = 2,  // ldmatrix for B without / with .trans, the wrong one for its layout
  kMissingWait = 3,  // no cp_async_wait before the consumer reads
  kMissingSync = 4,  // no __syncthreads between cp_async_wait and other threads' reads
};

// How B (16 x 8, k x n) is stored in shared memory.
enum BLayout {
  kBKMajor = 0,  // [n][k]: k contiguous (the "col" operand as is): ldmatrix_x2
  kBNMajor = 1,  // [k][n]: n contiguous: ldmatrix_x2_trans
};

// One warp: D (16 x 8, fp32, row-major) = A (16 x 16, row-major 16-bit words) * B + C, with the
// fragments loaded by ldmatrix from shared memory. a_words: 128 words (two elements each,
// row-major pairs); b_words: 64 words in the layout kBLayout.
template <bool kBf16, int kBLayout, int kFault>
__global__ void mma_m16n8k16_kernel(const uint32_t* a_words, const uint32_t* b_words,
                                    const float* c, float* d) {
  VLMK_SHARED(uint32_t[128], sa);  // 16 rows of 32 bytes
  VLMK_SHARED(uint32_t[64], sb);   // kBKMajor: 8 rows (n) of 32 bytes; kBNMajor: 16 rows (k) of 16
  const int lane = threadIdx.x;
  for (int i = lane; i < 128; i += 32) vlmk::st_shared(&sa[i], a_words[i]);
  for (int i = lane; i < 64; i += 32) vlmk::st_shared(&sb[i], b_words[i]);
  __syncthreads();

  FragA a;
  FragB b;
  // A: lanes 0-15 give rows 0-15 at k 0, lanes 16-31 rows 0-15 at k 8 (matrices -> x[0..3]).
  vlmk::tc::ldmatrix_x4(a.x[0], a.x[1], a.x[2], a.x[3], &sa[(lane % 16) * 8 + (lane / 16) * 4]);
  if (kBLayout == kBKMajor) {
    // Matrix 0: n rows 0-7 at k 0 (lanes 0-7); matrix 1: the same rows at k 8 (lanes 8-15).
    const uint32_t* row = &sb[(lane % 8) * 8 + ((lane / 8) % 2) * 4];
    if (kFault == kWrongBTrans) {
      vlmk::tc::ldmatrix_x2_trans(b.x[0], b.x[1], row);
    } else {
      vlmk::tc::ldmatrix_x2(b.x[0], b.x[1], row);
    }
  } else {
    // Lanes 0-15 give k rows 0-15 (matrix 0: k 0-7, matrix 1: k 8-15), transposed.
    const uint32_t* row = &sb[(lane % 16) * 4];
    if (kFault == kWrongBTrans) {
      vlmk::tc::ldmatrix_x2(b.x[0], b.x[1], row);
    } else {
      vlmk::tc::ldmatrix_x2_trans(b.x[0], b.x[1], row);
    }
  }
  if (kFault == kSwapA12) {
    const uint32_t t = a.x[1];
    a.x[1] = a.x[2];
    a.x[2] = t;
  }
  const int g = lane >> 2;
  const int t = lane & 3;
  FragC acc;
  acc.x[0] = c[g * 8 + 2 * t];
  acc.x[1] = c[g * 8 + 2 * t + 1];
  acc.x[2] = c[(g + 8) * 8 + 2 * t];
  acc.x[3] = c[(g + 8) * 8 + 2 * t + 1];
  if (kBf16) {
    vlmk::tc::mma_m16n8k16_bf16(acc, a, b, acc);  // d aliases c
  } else {
    vlmk::tc::mma_m16n8k16_f16(acc, a, b, acc);
  }
  d[g * 8 + 2 * t] = acc.x[0];
  d[g * 8 + 2 * t + 1] = acc.x[1];
  d[(g + 8) * 8 + 2 * t] = acc.x[2];
  d[(g + 8) * 8 + 2 * t + 1] = acc.x[3];
}

// One warp: D (16 x 8) = A (16 x 8 fp32, row-major) * B (8 x 8 fp32, [k][n]) + C on tf32, the
// fragments read from shared memory with ld_shared per the ISA layout and rounded by to_tf32.
template <int kFault>
__global__ void mma_m16n8k8_tf32_kernel(const float* a, const float* b, const float* c, float* d) {
  VLMK_SHARED(float[128], sa);
  VLMK_SHARED(float[64], sb);
  const int lane = threadIdx.x;
  for (int i = lane; i < 128; i += 32) vlmk::st_shared(&sa[i], a[i]);
  for (int i = lane; i < 64; i += 32) vlmk::st_shared(&sb[i], b[i]);
  __syncthreads();
  const int g = lane >> 2;
  const int t = lane & 3;
  FragA fa;
  FragB fb;
  fa.x[0] = vlmk::tc::to_tf32(vlmk::ld_shared(&sa[g * 8 + t]));
  fa.x[1] = vlmk::tc::to_tf32(vlmk::ld_shared(&sa[(g + 8) * 8 + t]));
  fa.x[2] = vlmk::tc::to_tf32(vlmk::ld_shared(&sa[g * 8 + t + 4]));
  fa.x[3] = vlmk::tc::to_tf32(vlmk::ld_shared(&sa[(g + 8) * 8 + t + 4]));
  if (kFault == kSwapA12) {
    const uint32_t s = fa.x[1];
    fa.x[1] = fa.x[2];
    fa.x[2] = s;
  }
  fb.x[0] = vlmk::tc::to_tf32(vlmk::ld_shared(&sb[t * 8 + g]));
  fb.x[1] = vlmk::tc::to_tf32(vlmk::ld_shared(&sb[(t + 4) * 8 + g]));
  FragC acc;
  acc.x[0] = c[g * 8 + 2 * t];
  acc.x[1] = c[g * 8 + 2 * t + 1];
  acc.x[2] = c[(g + 8) * 8 + 2 * t];
  acc.x[3] = c[(g + 8) * 8 + 2 * t + 1];
  FragC out;
  vlmk::tc::mma_m16n8k8_tf32(out, fa, fb, acc);
  d[g * 8 + 2 * t] = out.x[0];
  d[g * 8 + 2 * t + 1] = out.x[1];
  d[(g + 8) * 8 + 2 * t] = out.x[2];
  d[(g + 8) * 8 + 2 * t + 1] = out.x[3];
}

// ldmatrix probe: four 8x8 matrices of 16-bit values m*64 + r*8 + c, their 32 rows scattered
// over 32 slots of 32 bytes (row i*8+r in slot (i*8+r)*5 % 32, the slot's second half unused).
// Row i*8+r is written by lane 31 - (i*8+r), then (kSync) a __syncthreads; out: 4 words a lane.
__host__ __device__ inline int ldmatrix_slot(int row) { return row * 5 % 32; }

template <int kCount, bool kTrans, bool kSync>
__global__ void ldmatrix_probe_kernel(uint32_t* out) {
  VLMK_SHARED(uint32_t[32 * 8], s);  // 32 slots of 8 words (32 bytes)
  const int lane = threadIdx.x;
  const int written = 31 - lane;  // the row this lane writes (another lane supplies its address)
  for (int w = 0; w < 4; ++w) {
    const uint32_t v0 = uint32_t(written / 8 * 64 + written % 8 * 8 + 2 * w);
    vlmk::st_shared(&s[ldmatrix_slot(written) * 8 + w], v0 | ((v0 + 1) << 16));
  }
  if (kSync) __syncthreads();
  // Lanes past the matrices supply no address (ignored by the instruction).
  const uint32_t* row = lane < 8 * kCount ? &s[ldmatrix_slot(lane) * 8] : nullptr;
  uint32_t r[4] = {0xdeadbeefu, 0xdeadbeefu, 0xdeadbeefu, 0xdeadbeefu};
  if (kCount == 1) {
    if (kTrans) {
      vlmk::tc::ldmatrix_x1_trans(r[0], row);
    } else {
      vlmk::tc::ldmatrix_x1(r[0], row);
    }
  } else if (kCount == 2) {
    if (kTrans) {
      vlmk::tc::ldmatrix_x2_trans(r[0], r[1], row);
    } else {
      vlmk::tc::ldmatrix_x2(r[0], r[1], row);
    }
  } else {
    if (kTrans) {
      vlmk::tc::ldmatrix_x4_trans(r[0], r[1], r[2], r[3], row);
    } else {
      vlmk::tc::ldmatrix_x4(r[0], r[1], r[2], r[3], row);
    }
  }
  for (int i = 0; i < 4; ++i) out[lane * 4 + i] = r[i];
}

// Lane 0 writes a word, then the warp meets at an ldmatrix (kSyncwarp: a __syncwarp), then lane 1
// reads the word: ldmatrix.sync is a rendezvous, not a memory barrier, so only __syncwarp orders.
template <bool kSyncwarp>
__global__ void ldmatrix_is_not_a_barrier_kernel(uint32_t* out) {
  VLMK_SHARED(uint32_t[64], s);
  const int lane = threadIdx.x;
  for (int i = lane; i < 64; i += 32) vlmk::st_shared(&s[i], uint32_t(i));
  __syncthreads();
  if (lane == 0) vlmk::st_shared(&s[63], 1234u);  // not in a row ldmatrix reads
  uint32_t r = 0;
  if (kSyncwarp) __syncwarp();
  vlmk::tc::ldmatrix_x1(r, &s[(lane % 8) * 4]);
  out[lane] = r + (lane == 1 ? vlmk::ld_shared(&s[63]) : 0u);
}

// cp.async double buffering: 64 threads (two warps) stream n_tiles tiles of 64 x 16 bytes through
// two shared stages (commit per tile, wait<1> for the oldest); each thread reads the 16 bytes its
// neighbour (tid + 1) % 64 copied (so thread 31 reads warp 1's bytes) into out.
constexpr int kPipeThreads = 64;

template <int kFault>
__global__ void cp_async_pipeline_kernel(const float* tiles, int n_tiles, float* out) {
  VLMK_SHARED(float[2][kPipeThreads * 4], stage);
  const int tid = threadIdx.x;
  vlmk::tc::cp_async_16(&stage[0][tid * 4], tiles + tid * 4);
  vlmk::tc::cp_async_commit();
  for (int t = 0; t < n_tiles; ++t) {
    if (t + 1 < n_tiles) {
      vlmk::tc::cp_async_16(&stage[(t + 1) & 1][tid * 4],
                            tiles + (size_t(t + 1) * kPipeThreads + tid) * 4);
    }
    vlmk::tc::cp_async_commit();  // possibly empty: keeps "wait<1> = tile t landed"
    if (kFault != kMissingWait) vlmk::tc::cp_async_wait<1>();
    if (kFault != kMissingSync) __syncthreads();
    const int src = (tid + 1) % kPipeThreads;
    for (int j = 0; j < 4; ++j) {
      out[(size_t(t) * kPipeThreads + tid) * 4 + j] = vlmk::ld_shared(&stage[t & 1][src * 4 + j]);
    }
    __syncthreads();  // every read of stage t & 1 before it is refilled
  }
  vlmk::tc::cp_async_wait<0>();
}

// cp.async zero-fill: odd threads copy with valid = false from a null source; every thread then
// reads its neighbour's 16 bytes.
__global__ void cp_async_zfill_kernel(const float* src, float* out) {
  VLMK_SHARED(float[kPipeThreads * 4], buf);
  const int tid = threadIdx.x;
  const bool valid = tid % 2 == 0;
  vlmk::tc::cp_async_16(&buf[tid * 4], valid ? src + tid * 4 : nullptr, valid);
  vlmk::tc::cp_async_commit();
  vlmk::tc::cp_async_wait<0>();
  __syncthreads();
  const int nb = (tid + 1) % kPipeThreads;
  for (int j = 0; j < 4; ++j) out[tid * 4 + j] = vlmk::ld_shared(&buf[nb * 4 + j]);
}

// cp.async groups, one thread: three committed groups and one uncommitted copy; snapshots of the
// 16 destination floats after issue + __syncthreads, wait<2>, wait<1>, wait<0> (out: 4 x 16).
__global__ void cp_async_groups_kernel(const float* src, float* out) {
  VLMK_SHARED(float[16], buf);
  for (int i = 0; i < 4; ++i) {
    vlmk::tc::cp_async_16(&buf[i * 4], src + i * 4);
    if (i < 3) vlmk::tc::cp_async_commit();
  }
  __syncthreads();  // does not complete cp.async copies
  for (int i = 0; i < 16; ++i) out[i] = vlmk::ld_shared(&buf[i]);
  vlmk::tc::cp_async_wait<2>();
  for (int i = 0; i < 16; ++i) out[16 + i] = vlmk::ld_shared(&buf[i]);
  vlmk::tc::cp_async_wait<1>();
  for (int i = 0; i < 16; ++i) out[32 + i] = vlmk::ld_shared(&buf[i]);
  vlmk::tc::cp_async_wait<0>();
  for (int i = 0; i < 16; ++i) out[48 + i] = vlmk::ld_shared(&buf[i]);
}

}  // namespace tck
