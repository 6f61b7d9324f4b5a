// Static __shared__ memory and __syncthreads: a block-wide tree reduction, and the
// __syncthreads_count/_and/_or forms.
#include "simt/tests/check.h"

constexpr int kMaxThreads = 1024;

// out[blockIdx.x] = sum of in[blockIdx.x * n + i] over i < n, with n = blockDim.x.
__global__ void block_sum(const float* in, float* out) {
  __shared__ float partial[kMaxThreads];
  const unsigned t = threadIdx.x;
  partial[t] = in[blockIdx.x * blockDim.x + t];
  __syncthreads();
  // Fold the upper part onto a power-of-two prefix, then halve.
  unsigned pow2 = 1;
  while (pow2 * 2 <= blockDim.x) pow2 *= 2;
  if (t >= pow2) partial[t - pow2] += partial[t];
  __syncthreads();
  for (unsigned stride = pow2 / 2; stride > 0; stride /= 2) {
    if (t < stride) partial[t] += partial[t + stride];
    __syncthreads();
  }
  if (t == 0) out[blockIdx.x] = partial[0];
}

SIMT_TEST(block_reduction_all_block_sizes) {
  for (unsigned threads : {1u, 7u, 32u, 100u, 256u, 1024u}) {
    const unsigned blocks = 5;
    std::vector<float> in(blocks * threads), out(blocks, -1.0f);
    for (size_t i = 0; i < in.size(); ++i) in[i] = float(i % 17) - 3.0f;
    CHECK_CUDA(VLMK_LAUNCH(block_sum, blocks, threads, 0, nullptr, in.data(), out.data()));
    for (unsigned b = 0; b < blocks; ++b) {
      double expect = 0;
      for (unsigned i = 0; i < threads; ++i) expect += in[b * threads + i];
      CHECK_NEAR(out[b], expect, 1e-3);
    }
  }
}

// Block reduction over a 2-D block, in a __device__ helper with its own __shared__ array.
__device__ float block_sum_2d(float v) {
  __shared__ float buf[256];
  const unsigned t = threadIdx.y * blockDim.x + threadIdx.x;
  buf[t] = v;
  __syncthreads();
  float total = 0;
  if (t == 0) {
    for (unsigned i = 0; i < blockDim.x * blockDim.y; ++i) total += buf[i];
    buf[0] = total;
  }
  __syncthreads();
  total = buf[0];
  __syncthreads();  // buf is reused by the next call
  return total;
}

__global__ void twice_block_sum(float* out) {
  const float a = block_sum_2d(float(threadIdx.x + 1));
  const float b = block_sum_2d(float(threadIdx.y + 1));
  if (threadIdx.x == 0 && threadIdx.y == 0) {
    out[2 * blockIdx.x] = a;
    out[2 * blockIdx.x + 1] = b;
  }
}

SIMT_TEST(shared_memory_in_device_function) {
  std::vector<float> out(8, -1);
  CHECK_CUDA(VLMK_LAUNCH(twice_block_sum, 4, dim3(16, 8), 0, nullptr, out.data()));
  for (int b = 0; b < 4; ++b) {
    CHECK_EQ(out[2 * b], 8.0f * (16 * 17 / 2));
    CHECK_EQ(out[2 * b + 1], 16.0f * (8 * 9 / 2));
  }
}

__global__ void sync_predicates(int* out) {
  const unsigned t = threadIdx.x;
  const int count = __syncthreads_count(t % 3 == 0);
  const int all_small = __syncthreads_and(t < 1000);
  const int all_even = __syncthreads_and(t % 2 == 0);
  const int any_last = __syncthreads_or(t == blockDim.x - 1);
  const int any_big = __syncthreads_or(t > 5000);
  if (t == 1) {
    out[0] = count;
    out[1] = all_small;
    out[2] = all_even;
    out[3] = any_last;
    out[4] = any_big;
  }
}

SIMT_TEST(syncthreads_count_and_or) {
  std::vector<int> out(5, -1);
  CHECK_CUDA(VLMK_LAUNCH(sync_predicates, 2, 100, 0, nullptr, out.data()));
  CHECK_EQ(out[0], 34);
  CHECK_EQ(out[1], 1);
  CHECK_EQ(out[2], 0);
  CHECK_EQ(out[3], 1);
  CHECK_EQ(out[4], 0);
}

// Many barriers in a loop: a running prefix sum (Hillis-Steele) in shared memory.
__global__ void prefix_sum(const int* in, int* out) {
  __shared__ int buf[2][512];
  const unsigned t = threadIdx.x;
  int cur = 0;
  buf[cur][t] = in[t];
  __syncthreads();
  for (unsigned offset = 1; offset < blockDim.x; offset *= 2) {
    const int v = buf[cur][t] + (t >= offset ? buf[cur][t - offset] : 0);
    buf[1 - cur][t] = v;
    cur = 1 - cur;
    __syncthreads();
  }
  out[t] = buf[cur][t];
}

SIMT_TEST(prefix_sum_many_barriers) {
  const unsigned n = 512;
  std::vector<int> in(n), out(n, -1);
  for (unsigned i = 0; i < n; ++i) in[i] = int(i * 7 % 13) - 6;
  CHECK_CUDA(VLMK_LAUNCH(prefix_sum, 1, n, 0, nullptr, in.data(), out.data()));
  int running = 0;
  for (unsigned i = 0; i < n; ++i) {
    running += in[i];
    CHECK_EQ(out[i], running);
  }
}

// A spin-wait on shared memory progresses when it yields with __nanosleep (thread 0 runs first
// and waits for thread 1).
__global__ void spin_wait(int* out) {
  __shared__ volatile int flag;
  if (threadIdx.x == 0) flag = 0;
  __syncthreads();
  if (threadIdx.x == 1) flag = 42;
  if (threadIdx.x == 0) {
    while (flag == 0) __nanosleep(100);
    out[0] = flag;
  }
}

SIMT_TEST(nanosleep_lets_other_threads_run) {
  int out = 0;
  CHECK_CUDA(VLMK_LAUNCH(spin_wait, 1, 64, 0, nullptr, &out));
  CHECK_EQ(out, 42);
}
