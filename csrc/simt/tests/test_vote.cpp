// Warp votes and the other collectives: __ballot_sync, __any_sync, __all_sync, __activemask,
// __syncwarp, __match_any_sync, __match_all_sync, __reduce_*_sync.
#include "simt/tests/check.h"

struct Votes {
  unsigned ballot, ballot_sub;
  int any_odd, all_odd, any_big, all_small;
  unsigned active;
};

__global__ void votes(Votes* out) {
  const unsigned lane = threadIdx.x % 32;
  Votes v;
  v.ballot = __ballot_sync(0xffffffffu, lane % 3 == 0);
  v.ballot_sub = 0;
  if (lane < 8) v.ballot_sub = __ballot_sync(0xffu, lane & 1);
  __syncwarp();
  v.any_odd = __any_sync(0xffffffffu, lane & 1);
  v.all_odd = __all_sync(0xffffffffu, lane & 1);
  v.any_big = __any_sync(0xffffffffu, lane > 40);
  v.all_small = __all_sync(0xffffffffu, lane < 32);
  v.active = __activemask();
  out[threadIdx.x] = v;
}

SIMT_TEST(ballot_any_all) {
  std::vector<Votes> out(64);
  CHECK_CUDA(VLMK_LAUNCH(votes, 1, 64, 0, nullptr, out.data()));
  unsigned every_third = 0;
  for (int l = 0; l < 32; l += 3) every_third |= 1u << l;
  for (int t = 0; t < 64; ++t) {
    const Votes& v = out[t];
    CHECK_EQ(v.ballot, every_third);
    CHECK_EQ(v.ballot_sub, t % 32 < 8 ? 0xaau : 0u);
    CHECK_EQ(v.any_odd, 1);
    CHECK_EQ(v.all_odd, 0);
    CHECK_EQ(v.any_big, 0);
    CHECK_EQ(v.all_small, 1);
    CHECK_EQ(v.active, 0xffffffffu);
  }
}

__global__ void matches(const int* keys, unsigned* any, unsigned* all, int* all_pred) {
  const int k = keys[threadIdx.x];
  any[threadIdx.x] = __match_any_sync(0xffffffffu, k);
  int pred = -1;
  all[threadIdx.x] = __match_all_sync(0xffffffffu, k, &pred);
  all_pred[threadIdx.x] = pred;
}

SIMT_TEST(match_any_and_all) {
  std::vector<int> keys(64);
  for (int t = 0; t < 32; ++t) keys[t] = t % 4;  // warp 0: four classes
  for (int t = 32; t < 64; ++t) keys[t] = 5;     // warp 1: all equal
  std::vector<unsigned> any(64), all(64);
  std::vector<int> pred(64);
  CHECK_CUDA(
      VLMK_LAUNCH(matches, 1, 64, 0, nullptr, keys.data(), any.data(), all.data(), pred.data()));
  for (int t = 0; t < 32; ++t) {
    CHECK_EQ(any[t], 0x11111111u << (t % 4));
    CHECK_EQ(all[t], 0u);
    CHECK_EQ(pred[t], 0);
  }
  for (int t = 32; t < 64; ++t) {
    CHECK_EQ(any[t], 0xffffffffu);
    CHECK_EQ(all[t], 0xffffffffu);
    CHECK_EQ(pred[t], 1);
  }
}

__global__ void reduces(int* out) {
  const int lane = int(threadIdx.x % 32);
  const int v = lane - 10;
  out[threadIdx.x * 6 + 0] = __reduce_add_sync(0xffffffffu, v);
  out[threadIdx.x * 6 + 1] = __reduce_min_sync(0xffffffffu, v);
  out[threadIdx.x * 6 + 2] = __reduce_max_sync(0xffffffffu, v);
  out[threadIdx.x * 6 + 3] = int(__reduce_min_sync(0xffffffffu, unsigned(v)));
  out[threadIdx.x * 6 + 4] = int(__reduce_or_sync(0xffffffffu, 1u << (lane % 8)));
  out[threadIdx.x * 6 + 5] = int(__reduce_xor_sync(0xffffffffu, unsigned(lane)));
}

SIMT_TEST(warp_reduce_intrinsics) {
  std::vector<int> out(32 * 6);
  CHECK_CUDA(VLMK_LAUNCH(reduces, 1, 32, 0, nullptr, out.data()));
  for (int t = 0; t < 32; ++t) {
    CHECK_EQ(out[t * 6 + 0], 496 - 320);
    CHECK_EQ(out[t * 6 + 1], -10);
    CHECK_EQ(out[t * 6 + 2], 21);
    CHECK_EQ(out[t * 6 + 3], 0);  // unsigned: lane 10 gives 0, negatives wrap to large values
    CHECK_EQ(out[t * 6 + 4], 0xff);
    CHECK_EQ(out[t * 6 + 5], 0);
  }
}

// __syncwarp orders shared-memory traffic inside a warp: a warp-private transpose.
__global__ void warp_transpose(int* out) {
  __shared__ int tile[2][32];
  const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  tile[warp][lane] = int(100 * warp + lane);
  __syncwarp();
  out[threadIdx.x] = tile[warp][31 - lane];
}

SIMT_TEST(syncwarp_orders_shared_memory) {
  std::vector<int> out(64);
  CHECK_CUDA(VLMK_LAUNCH(warp_transpose, 1, 64, 0, nullptr, out.data()));
  for (int t = 0; t < 64; ++t) CHECK_EQ(out[t], 100 * (t / 32) + 31 - t % 32);
}

// __activemask reports the lanes that reach the same call together.
__global__ void active_in_branches(unsigned* out) {
  const unsigned lane = threadIdx.x % 32;
  unsigned m;
  if (lane < 10) {
    m = __activemask();
  } else {
    m = __activemask();
  }
  out[threadIdx.x] = m;
}

SIMT_TEST(activemask_in_divergent_branches) {
  std::vector<unsigned> out(64);
  CHECK_CUDA(VLMK_LAUNCH(active_in_branches, 1, 64, 0, nullptr, out.data()));
  for (int t = 0; t < 64; ++t) CHECK_EQ(out[t], t % 32 < 10 ? 0x3ffu : 0xfffffc00u);
}

// The usual idiom: shuffle among the active lanes of a partial warp.
__global__ void active_then_shuffle(int* out) {
  if (threadIdx.x % 32 >= 20) return;
  const unsigned mask = __activemask();
  int v = int(threadIdx.x);
  v = __shfl_sync(mask, v, 19);
  out[threadIdx.x] = v;
}

SIMT_TEST(activemask_then_shuffle) {
  std::vector<int> out(48, -1);
  CHECK_CUDA(VLMK_LAUNCH(active_then_shuffle, 1, 48, 0, nullptr, out.data()));
  for (int t = 0; t < 48; ++t) {
    if (t % 32 < 20 && t < 48) {
      // Warp 1 has 16 lanes (32..47): lane 19 does not exist, so its value is undefined there.
      if (t < 32) CHECK_EQ(out[t], 19);
    } else {
      CHECK_EQ(out[t], -1);
    }
  }
}
