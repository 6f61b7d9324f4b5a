// The point of running threads as fibers: a kernel that forgets a __syncthreads gives a WRONG
// answer under the emulator (deterministically), while the same kernel with the barrier is right.
#include "simt/tests/check.h"

constexpr unsigned kThreads = 128;

// Each thread publishes a value in shared memory and reads its neighbour's.
// direction = +1 reads the next thread's slot, -1 the previous thread's.
template <bool kWithBarrier>
__global__ void neighbour_exchange(const float* in, float* out, int direction) {
  VLMK_DYNAMIC_SMEM(float, slots);
  const unsigned t = threadIdx.x;
  slots[t] = in[blockIdx.x * blockDim.x + t];
  if (kWithBarrier) __syncthreads();
  const unsigned neighbour = (t + blockDim.x + direction) % blockDim.x;
  out[blockIdx.x * blockDim.x + t] = slots[neighbour];
}

// Tree reduction: the barrier inside the loop is the one people forget.
template <bool kWithBarrier>
__global__ void tree_sum(const float* in, float* out) {
  __shared__ float partial[kThreads];
  const unsigned t = threadIdx.x;
  partial[t] = in[blockIdx.x * blockDim.x + t];
  __syncthreads();
  for (unsigned stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (t < stride) partial[t] += partial[t + stride];
    if (kWithBarrier) __syncthreads();
  }
  if (t == 0) out[blockIdx.x] = partial[0];
}

struct ScheduleScope {
  explicit ScheduleScope(simt::Schedule s) : saved(simt::get_config()) {
    simt::Config c = saved;
    c.schedule = s;
    simt::set_config(c);
  }
  ~ScheduleScope() { simt::set_config(saved); }
  simt::Config saved;
};

// Counts outputs of neighbour_exchange that differ from the right answer.
template <bool kWithBarrier>
int exchange_errors(unsigned blocks, int direction) {
  std::vector<float> in(blocks * kThreads), out(in.size(), 0.0f);
  for (size_t i = 0; i < in.size(); ++i) in[i] = float(i) + 0.5f;
  const cudaError_t e =
      VLMK_LAUNCH((neighbour_exchange<kWithBarrier>), blocks, kThreads, kThreads * sizeof(float),
                  nullptr, in.data(), out.data(), direction);
  CHECK_CUDA(e);
  int errors = 0;
  for (unsigned b = 0; b < blocks; ++b) {
    for (unsigned t = 0; t < kThreads; ++t) {
      const unsigned neighbour = (t + kThreads + direction) % kThreads;
      errors += out[b * kThreads + t] != in[b * kThreads + neighbour];
    }
  }
  return errors;
}

template <bool kWithBarrier>
int tree_sum_errors(unsigned blocks) {
  std::vector<float> in(blocks * kThreads), out(blocks, 0.0f);
  for (size_t i = 0; i < in.size(); ++i) in[i] = float(i % 11);
  CHECK_CUDA(
      VLMK_LAUNCH((tree_sum<kWithBarrier>), blocks, kThreads, 0, nullptr, in.data(), out.data()));
  int errors = 0;
  for (unsigned b = 0; b < blocks; ++b) {
    float expect = 0;
    for (unsigned t = 0; t < kThreads; ++t) expect += in[b * kThreads + t];
    errors += out[b] != expect;
  }
  return errors;
}

SIMT_TEST(neighbour_exchange_without_barrier_is_wrong) {
  // Default schedule (forward in even blocks, reverse in odd ones): two blocks catch a read of
  // either neighbour.
  for (int direction : {+1, -1}) {
    CHECK_EQ(exchange_errors<true>(2, direction), 0);
    CHECK(exchange_errors<false>(2, direction) > 0);
  }
  // Forward order alone catches reading a later thread's slot, reverse order an earlier one's.
  {
    ScheduleScope forward(simt::Schedule::kForward);
    CHECK_EQ(exchange_errors<true>(1, +1), 0);
    CHECK_EQ(exchange_errors<false>(1, +1), int(kThreads) - 1);
  }
  {
    ScheduleScope reverse(simt::Schedule::kReverse);
    CHECK_EQ(exchange_errors<true>(1, -1), 0);
    CHECK_EQ(exchange_errors<false>(1, -1), int(kThreads) - 1);
  }
}

SIMT_TEST(tree_reduction_without_barrier_is_wrong) {
  CHECK_EQ(tree_sum_errors<true>(4), 0);
  CHECK(tree_sum_errors<false>(4) > 0);
  ScheduleScope forward(simt::Schedule::kForward);
  CHECK_EQ(tree_sum_errors<true>(3), 0);
  CHECK_EQ(tree_sum_errors<false>(3), 3);  // every block wrong
}

SIMT_TEST(random_schedule_still_right_with_barriers) {
  ScheduleScope random(simt::Schedule::kRandom);
  CHECK_EQ(exchange_errors<true>(3, +1), 0);
  CHECK_EQ(exchange_errors<true>(3, -1), 0);
  CHECK_EQ(tree_sum_errors<true>(3), 0);
  CHECK(exchange_errors<false>(3, +1) > 0);
}
