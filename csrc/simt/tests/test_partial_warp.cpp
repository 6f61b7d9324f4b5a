// Blocks whose size is not a multiple of 32: the last warp has only the lanes that exist, and
// collectives work over those lanes.
#include "simt/tests/check.h"

// Sum over the block via warp shuffles + shared memory, correct for any blockDim.x <= 1024.
__global__ void block_sum_shfl(const float* in, float* out) {
  __shared__ float warp_sums[32];
  const unsigned t = threadIdx.x, lane = t % 32, warp = t / 32;
  const unsigned warps = (blockDim.x + 31) / 32;
  const unsigned mask = __ballot_sync(0xffffffffu, 1);  // the lanes that exist
  float v = in[blockIdx.x * blockDim.x + t];
  for (int offset = 16; offset > 0; offset /= 2) {
    const float other = __shfl_down_sync(mask, v, offset);
    if (lane + offset < 32 && ((mask >> (lane + offset)) & 1u)) v += other;
  }
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (t == 0) {
    float s = 0;
    for (unsigned w = 0; w < warps; ++w) s += warp_sums[w];
    out[blockIdx.x] = s;
  }
}

SIMT_TEST(block_sum_with_partial_last_warp) {
  for (unsigned threads : {1u, 5u, 31u, 33u, 48u, 100u, 1000u}) {
    std::vector<float> in(2 * threads), out(2, -1);
    for (size_t i = 0; i < in.size(); ++i) in[i] = float(i % 5);
    CHECK_CUDA(VLMK_LAUNCH(block_sum_shfl, 2, threads, 0, nullptr, in.data(), out.data()));
    for (unsigned b = 0; b < 2; ++b) {
      float expect = 0;
      for (unsigned i = 0; i < threads; ++i) expect += in[b * threads + i];
      CHECK_EQ(out[b], expect);
    }
  }
}

struct Seen {
  unsigned ballot, active;
  int all;
  float from_missing_lane, from_present_lane;
};

__global__ void partial_votes(Seen* out) {
  const unsigned lane = threadIdx.x % 32;
  Seen s;
  s.ballot = __ballot_sync(0xffffffffu, 1);
  s.active = __activemask();
  s.all = __all_sync(0xffffffffu, 1);
  // Lane 20 does not exist in a 48-thread block's second warp: its value is undefined on a GPU,
  // and NaN here.
  s.from_missing_lane = __shfl_sync(0xffffffffu, float(threadIdx.x), 20);
  s.from_present_lane = __shfl_sync(0xffffffffu, float(threadIdx.x), lane ^ 1);
  out[threadIdx.x] = s;
}

SIMT_TEST(votes_and_shuffles_over_existing_lanes) {
  std::vector<Seen> out(48);
  CHECK_CUDA(VLMK_LAUNCH(partial_votes, 1, 48, 0, nullptr, out.data()));
  for (int t = 0; t < 48; ++t) {
    const Seen& s = out[t];
    const unsigned lanes = t < 32 ? 0xffffffffu : 0xffffu;
    CHECK_EQ(s.ballot, lanes);
    CHECK_EQ(s.active, lanes);
    CHECK_EQ(s.all, 1);
    CHECK_EQ(s.from_present_lane, float(t ^ 1));
    if (t < 32) {
      CHECK_EQ(s.from_missing_lane, 20.0f);
    } else {
      CHECK(std::isnan(s.from_missing_lane));
    }
  }
}

// Exited lanes leave their warp's collectives: the others still complete.
__global__ void exit_then_vote(unsigned* out) {
  const unsigned lane = threadIdx.x % 32;
  if (lane >= 10) return;
  out[threadIdx.x] = __ballot_sync(0xffffffffu, 1);
}

SIMT_TEST(exited_lanes_do_not_block_warp_collectives) {
  std::vector<unsigned> out(64, 0);
  CHECK_CUDA(VLMK_LAUNCH(exit_then_vote, 1, 64, 0, nullptr, out.data()));
  for (int t = 0; t < 64; ++t) CHECK_EQ(out[t], t % 32 < 10 ? 0x3ffu : 0u);
}
