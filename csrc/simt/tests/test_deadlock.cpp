// Synchronization bugs that hang (or misbehave) on a GPU fail the launch with a clear message.
#include <stdexcept>

#include "simt/tests/check.h"

__global__ void barrier_in_branch(int* out) {
  if (threadIdx.x == 0) __syncthreads();  // the other threads never arrive
  out[threadIdx.x] = 1;
}

SIMT_TEST(barrier_in_branch_is_a_deadlock) {
  std::vector<int> out(64, 0);
  const cudaError_t e = VLMK_LAUNCH(barrier_in_branch, 2, 64, 0, nullptr, out.data());
  CHECK_EQ(int(e), int(cudaErrorLaunchTimeout));
  const std::string message = cudaGetErrorString(e);
  CHECK_CONTAINS(message, "deadlock");
  CHECK_CONTAINS(message, "barrier_in_branch");
  CHECK_CONTAINS(message, "1 thread(s) [0] wait in __syncthreads() at ");
  CHECK_CONTAINS(message, "test_deadlock.cpp:7");
  CHECK_CONTAINS(message, "63 thread(s) [1-63] have exited");
  CHECK_EQ(std::string(simt::last_error_message()), message);
  CHECK_EQ(int(cudaGetLastError()), int(cudaSuccess));  // VLMK_LAUNCH already took it
}

__global__ void early_return_then_barrier(const int* n, int* out) {
  __shared__ int buf[64];
  if (int(threadIdx.x) >= *n) return;  // a bug: the barrier below waits for every thread
  buf[threadIdx.x] = int(threadIdx.x);
  __syncthreads();
  out[threadIdx.x] = buf[(threadIdx.x + 1) % *n];
}

SIMT_TEST(early_return_before_barrier_is_a_deadlock) {
  const int n = 40;
  std::vector<int> out(64, 0);
  const cudaError_t e = VLMK_LAUNCH(early_return_then_barrier, 1, 64, 0, nullptr, &n, out.data());
  CHECK_EQ(int(e), int(cudaErrorLaunchTimeout));
  const std::string message = cudaGetErrorString(e);
  CHECK_CONTAINS(message, "40 thread(s) [0-39] wait in __syncthreads()");
  CHECK_CONTAINS(message, "24 thread(s) [40-63] have exited");
  CHECK_CONTAINS(message, "early return");
}

__global__ void shuffle_vs_barrier(float* out) {
  float v = float(threadIdx.x);
  if (threadIdx.x % 32 == 5) {
    __syncthreads();  // lane 5 waits for the block, its warp waits for lane 5 in the shuffle
  } else {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
  }
  out[threadIdx.x] = v;
}

SIMT_TEST(warp_collective_deadlock) {
  std::vector<float> out(64, 0);
  const cudaError_t e = VLMK_LAUNCH(shuffle_vs_barrier, 1, 64, 0, nullptr, out.data());
  CHECK_EQ(int(e), int(cudaErrorLaunchTimeout));
  const std::string message = cudaGetErrorString(e);
  CHECK_CONTAINS(message, "31 thread(s) [0-4,6-31] wait in __shfl_xor_sync()");
  CHECK_CONTAINS(message, "(warp 0, mask 0xffffffff)");
  CHECK_CONTAINS(message, "2 thread(s) [5,37] wait in __syncthreads()");
}

__global__ void divergent_barriers(int* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

SIMT_TEST(divergent_barriers_are_reported) {
  std::vector<int> out(32, 0);
  const cudaError_t e = VLMK_LAUNCH(divergent_barriers, 1, 32, 0, nullptr, out.data());
  CHECK_EQ(int(e), int(cudaErrorLaunchFailure));
  CHECK_CONTAINS(cudaGetErrorString(e), "divergent barrier");
}

__global__ void mismatched_collectives(unsigned* out) {
  unsigned v;
  if (threadIdx.x < 16) {
    v = __ballot_sync(0xffffffffu, 1);
  } else {
    v = __shfl_sync(0xffffffffu, 7u, 0);
  }
  out[threadIdx.x] = v;
}

SIMT_TEST(mismatched_warp_collectives_are_reported) {
  std::vector<unsigned> out(32, 0);
  const cudaError_t e = VLMK_LAUNCH(mismatched_collectives, 1, 32, 0, nullptr, out.data());
  CHECK_EQ(int(e), int(cudaErrorLaunchFailure));
  CHECK_CONTAINS(cudaGetErrorString(e), "different warp collectives");
}

__global__ void mask_without_self(int* out) {
  out[threadIdx.x] = __shfl_sync(0x1u, 1, 0);  // lanes 1..31 are not in the mask
}

SIMT_TEST(mask_must_include_the_calling_lane) {
  std::vector<int> out(32, 0);
  const cudaError_t e = VLMK_LAUNCH(mask_without_self, 1, 32, 0, nullptr, out.data());
  CHECK_EQ(int(e), int(cudaErrorLaunchFailure));
  CHECK_CONTAINS(cudaGetErrorString(e), "which the mask does not include");
}

__global__ void traps(int* out) {
  if (threadIdx.x == 3 && blockIdx.x == 1) __trap();
  out[threadIdx.x] = 1;
}

__global__ void throws(int* out) {
  if (threadIdx.x == 2) throw std::runtime_error("boom");
  out[threadIdx.x] = 1;
}

SIMT_TEST(trap_and_exception_fail_the_launch) {
  std::vector<int> out(32, 0);
  cudaError_t e = VLMK_LAUNCH(traps, 2, 32, 0, nullptr, out.data());
  CHECK_EQ(int(e), int(cudaErrorLaunchFailure));
  CHECK_CONTAINS(cudaGetErrorString(e), "thread (3,0,0) executed __trap()");
  CHECK_CONTAINS(cudaGetErrorString(e), "block (1,0,0)");
  e = VLMK_LAUNCH(throws, 1, 32, 0, nullptr, out.data());
  CHECK_EQ(int(e), int(cudaErrorLaunchFailure));
  CHECK_CONTAINS(cudaGetErrorString(e), "boom");
}

__global__ void fill(int* out, int value) { out[blockIdx.x * blockDim.x + threadIdx.x] = value; }

SIMT_TEST(launches_work_after_a_failure) {
  std::vector<int> out(64, 0);
  CHECK(VLMK_LAUNCH(barrier_in_branch, 1, 64, 0, nullptr, out.data()) != cudaSuccess);
  CHECK_CUDA(VLMK_LAUNCH(fill, 2, 32, 0, nullptr, out.data(), 9));
  for (int v : out) CHECK_EQ(v, 9);
}

SIMT_TEST(deadlock_in_many_blocks_in_parallel) {
  simt::Config saved = simt::get_config();
  simt::Config c = saved;
  c.num_threads = 4;
  simt::set_config(c);
  std::vector<int> out(256, 0);
  for (int i = 0; i < 5; ++i) {
    CHECK_EQ(int(VLMK_LAUNCH(barrier_in_branch, 64, 256, 0, nullptr, out.data())),
             int(cudaErrorLaunchTimeout));
  }
  simt::set_config(saved);
}
