// The shared-memory race checker (SIMT_RACECHECK=1) and shared-memory poison. Each planted race
// must be reported (launch error, message naming kernel, block, both threads, the location and
// the word "race") whatever the thread order; each correctly synchronized pattern must pass.
#include <cstdlib>

#include "simt/tests/check.h"

constexpr unsigned kThreads = 128;

// Sets the race checker (and optionally the schedule) for one scope.
struct RacecheckScope {
  explicit RacecheckScope(bool on, simt::Schedule schedule = simt::get_config().schedule,
                          uint64_t seed = simt::get_config().seed)
      : saved(simt::get_config()) {
    simt::Config c = saved;
    c.racecheck = on;
    c.schedule = schedule;
    c.seed = seed;
    simt::set_config(c);
  }
  ~RacecheckScope() { simt::set_config(saved); }
  simt::Config saved;
};

// ---- write-read: a missing __syncthreads between a write and another thread's read ----------

template <bool kBarrier>
__global__ void neighbour_exchange(const float* in, float* out) {
  VLMK_SHARED(float[kThreads], slots);
  const unsigned t = threadIdx.x;
  vlmk::st_shared(&slots[t], in[t]);
  if (kBarrier) __syncthreads();
  out[t] = vlmk::ld_shared(&slots[(t + 1) % kThreads]);
}

template <bool kBarrier>
cudaError_t run_exchange() {
  std::vector<float> in(kThreads, 1.0f), out(kThreads, 0.0f);
  return VLMK_LAUNCH((neighbour_exchange<kBarrier>), 1, kThreads, 0, nullptr, in.data(),
                     out.data());
}

SIMT_TEST(missing_barrier_write_read_is_reported) {
  RacecheckScope on(true);
  CHECK_CUDA(run_exchange<true>());
  const cudaError_t e = run_exchange<false>();
  CHECK_EQ(int(e), int(cudaErrorLaunchFailure));
  const std::string message = cudaGetErrorString(e);
  CHECK_CONTAINS(message, "race");
  CHECK_CONTAINS(message, "neighbour_exchange");
  CHECK_CONTAINS(message, "block (0,0,0)");
  CHECK_CONTAINS(message, "of static shared 'slots'");
  CHECK_CONTAINS(message, "test_racecheck.cpp:");
  CHECK_CONTAINS(message, "thread (");
  // Without the checker the launch "succeeds" (the result may or may not be wrong).
  RacecheckScope off(false);
  CHECK_CUDA(run_exchange<false>());
}

SIMT_TEST(missing_barrier_is_reported_under_every_schedule) {
  // Whichever of writer and reader runs first, the second access of the pair conflicts.
  const simt::Schedule schedules[] = {simt::Schedule::kForward, simt::Schedule::kReverse,
                                      simt::Schedule::kAlternate, simt::Schedule::kRandom};
  for (simt::Schedule s : schedules) {
    for (uint64_t seed : {1u, 2u, 3u}) {
      RacecheckScope on(true, s, seed);
      CHECK_CUDA(run_exchange<true>());
      const cudaError_t e = run_exchange<false>();
      CHECK_EQ(int(e), int(cudaErrorLaunchFailure));
      CHECK_CONTAINS(cudaGetErrorString(e), "race");
    }
  }
}

// The same in dynamic shared memory, and only in block 1 of 3.
__global__ void dynamic_exchange(float* out) {
  VLMK_DYNAMIC_SMEM(float, slots);
  const unsigned t = threadIdx.x;
  vlmk::st_shared(&slots[t], float(t));
  if (blockIdx.x != 1) __syncthreads();
  const float v = vlmk::ld_shared(&slots[(t + 1) % blockDim.x]);
  if (blockIdx.x == 1) return;  // the racy block never meets the barrier below
  __syncthreads();
  out[blockIdx.x * blockDim.x + t] = v;
}

SIMT_TEST(race_in_dynamic_shared_memory_names_the_block) {
  RacecheckScope on(true, simt::Schedule::kForward);
  std::vector<float> out(3 * 64, 0.0f);
  const cudaError_t e =
      VLMK_LAUNCH(dynamic_exchange, 3, 64, 64 * sizeof(float), nullptr, out.data());
  CHECK_EQ(int(e), int(cudaErrorLaunchFailure));
  const std::string message = cudaGetErrorString(e);
  CHECK_CONTAINS(message, "shared-memory race (");
  CHECK_CONTAINS(message, "dynamic_exchange");
  CHECK_CONTAINS(message, "block (1,0,0)");
  CHECK_CONTAINS(message, "dynamic shared memory offset ");
  CHECK_CONTAINS(message, "(address 0x");
  // Forward order: thread 0 writes slot 0, reads slot 1 (nobody wrote it yet: poison, no race);
  // thread 1 writes slot 1 after thread 0 read it.
  CHECK_CONTAINS(message, "read-write");
  CHECK_CONTAINS(message, "thread (0,0,0) read it");
  CHECK_CONTAINS(message, "thread (1,0,0) writes it");
}

// ---- write-write -----------------------------------------------------------------------------

template <bool kBarrier>
__global__ void two_writers(int* out) {
  VLMK_SHARED(int, value);
  if (threadIdx.x == 3) vlmk::st_shared(&value, 3);
  if (kBarrier) __syncthreads();
  if (threadIdx.x == 70) vlmk::st_shared(&value, 70);
  __syncthreads();
  if (threadIdx.x == 0) *out = vlmk::ld_shared(&value);
}

SIMT_TEST(write_write_is_reported) {
  RacecheckScope on(true, simt::Schedule::kForward);
  int out = 0;
  CHECK_CUDA(VLMK_LAUNCH((two_writers<true>), 1, kThreads, 0, nullptr, &out));
  CHECK_EQ(out, 70);
  const cudaError_t e = VLMK_LAUNCH((two_writers<false>), 1, kThreads, 0, nullptr, &out);
  CHECK_EQ(int(e), int(cudaErrorLaunchFailure));
  const std::string message = cudaGetErrorString(e);
  CHECK_CONTAINS(message, "race (write-write)");
  CHECK_CONTAINS(message, "thread (3,0,0) wrote it");
  CHECK_CONTAINS(message, "thread (70,0,0) writes it");
  CHECK_CONTAINS(message, "static shared 'value'");
}

// ---- read-write: every thread reads a value, one overwrites it too early ----------------------

template <bool kBarrier>
__global__ void read_then_overwrite(int* out) {
  VLMK_SHARED(int, value);
  if (threadIdx.x == 0) vlmk::st_shared(&value, 5);
  __syncthreads();
  const int v = vlmk::ld_shared(&value);
  if (kBarrier) __syncthreads();
  if (threadIdx.x == 0) vlmk::st_shared(&value, 6);  // a race unless everyone has read it
  out[threadIdx.x] = v;
}

SIMT_TEST(read_then_write_by_another_thread_is_reported) {
  // Reverse order: threads 127..1 read, then thread 0 reads (the last reader) and writes; the
  // read by thread 1 before it is the conflicting one.
  {
    RacecheckScope on(true, simt::Schedule::kReverse);
    std::vector<int> out(kThreads, 0);
    CHECK_CUDA(VLMK_LAUNCH((read_then_overwrite<true>), 1, kThreads, 0, nullptr, out.data()));
    CHECK_EQ(out[kThreads - 1], 5);
    const cudaError_t e =
        VLMK_LAUNCH((read_then_overwrite<false>), 1, kThreads, 0, nullptr, out.data());
    CHECK_EQ(int(e), int(cudaErrorLaunchFailure));
    const std::string message = cudaGetErrorString(e);
    CHECK_CONTAINS(message, "race (read-write)");
    CHECK_CONTAINS(message, "thread (1,0,0) read it");
    CHECK_CONTAINS(message, "thread (0,0,0) writes it");
  }
  // Forward order: thread 0 overwrites before thread 1 reads, which sees the new value.
  {
    RacecheckScope on(true, simt::Schedule::kForward);
    std::vector<int> out(kThreads, 0);
    const cudaError_t e =
        VLMK_LAUNCH((read_then_overwrite<false>), 1, kThreads, 0, nullptr, out.data());
    CHECK_EQ(int(e), int(cudaErrorLaunchFailure));
    const std::string message = cudaGetErrorString(e);
    CHECK_CONTAINS(message, "race (write-read)");
    CHECK_CONTAINS(message, "thread (0,0,0) wrote it");
    CHECK_CONTAINS(message, "thread (1,0,0) reads it");
  }
}

// ---- clean patterns ---------------------------------------------------------------------------

// One thread reads and writes its own slot as often as it likes; others only after a barrier.
__global__ void own_slot_updates(float* out) {
  VLMK_SHARED(float[kThreads], acc);
  const unsigned t = threadIdx.x;
  vlmk::st_shared(&acc[t], 0.0f);
  for (int i = 0; i < 4; ++i) vlmk::st_shared(&acc[t], vlmk::ld_shared(&acc[t]) + float(i));
  __syncthreads();
  out[t] = vlmk::ld_shared(&acc[kThreads - 1 - t]);
}

// Atomics on shared memory do not race with each other.
__global__ void shared_atomic_count(int* out) {
  VLMK_SHARED(int, count);
  if (threadIdx.x == 0) vlmk::st_shared(&count, 0);
  __syncthreads();
  atomicAdd(&count, 1);
  __syncthreads();
  out[threadIdx.x] = vlmk::ld_shared(&count);
}

// Warp-synchronous exchange: __syncwarp (or any warp collective) orders the warp's lanes.
template <int kSync>  // 0: none, 1: __syncwarp, 2: a shuffle
__global__ void warp_exchange(float* out) {
  VLMK_SHARED(float[kThreads], slots);
  const unsigned t = threadIdx.x;
  vlmk::st_shared(&slots[t], float(t));
  if (kSync == 1) __syncwarp();
  if (kSync == 2) (void)__shfl_xor_sync(0xffffffffu, 0, 1);
  out[t] = vlmk::ld_shared(&slots[t ^ 1u]);
}

SIMT_TEST(clean_kernels_pass) {
  for (simt::Schedule s :
       {simt::Schedule::kForward, simt::Schedule::kReverse, simt::Schedule::kRandom}) {
    RacecheckScope on(true, s, 5);
    std::vector<float> out(kThreads, -1.0f);
    CHECK_CUDA(VLMK_LAUNCH(own_slot_updates, 2, kThreads, 0, nullptr, out.data()));
    CHECK_EQ(out[0], 6.0f);
    std::vector<int> counts(kThreads, 0);
    CHECK_CUDA(VLMK_LAUNCH(shared_atomic_count, 2, kThreads, 0, nullptr, counts.data()));
    CHECK_EQ(counts[7], int(kThreads));
    CHECK_CUDA(VLMK_LAUNCH((warp_exchange<1>), 2, kThreads, 0, nullptr, out.data()));
    CHECK_EQ(out[6], 7.0f);
    CHECK_CUDA(VLMK_LAUNCH((warp_exchange<2>), 2, kThreads, 0, nullptr, out.data()));
    CHECK_EQ(out[7], 6.0f);
    const cudaError_t e = VLMK_LAUNCH((warp_exchange<0>), 2, kThreads, 0, nullptr, out.data());
    CHECK_EQ(int(e), int(cudaErrorLaunchFailure));
    CHECK_CONTAINS(cudaGetErrorString(e), "race");
  }
}

// A __syncwarp orders only its own warp's lanes, and only those in its mask.
template <int kCase>
__global__ void warp_sync_limits(float* out) {
  VLMK_SHARED(float[64], slots);
  const unsigned t = threadIdx.x;
  vlmk::st_shared(&slots[t], float(t));
  if (kCase == 0) {
    __syncwarp();
    out[t] = vlmk::ld_shared(&slots[t ^ 32u]);  // the other warp's slot
  } else if (t < 16) {
    __syncwarp(0x0000ffffu);
    out[t] = vlmk::ld_shared(&slots[(t + 1) % 16]);        // clean: a lane in the mask
    if (kCase == 2) out[t] = vlmk::ld_shared(&slots[20]);  // lane 20 was not in the mask
  }
}

SIMT_TEST(warp_sync_does_not_order_other_lanes) {
  RacecheckScope on(true, simt::Schedule::kReverse);
  std::vector<float> out(64, 0.0f);
  cudaError_t e = VLMK_LAUNCH((warp_sync_limits<0>), 1, 64, 0, nullptr, out.data());
  CHECK_EQ(int(e), int(cudaErrorLaunchFailure));
  CHECK_CONTAINS(cudaGetErrorString(e), "race (write-read)");
  CHECK_CUDA(VLMK_LAUNCH((warp_sync_limits<1>), 1, 64, 0, nullptr, out.data()));
  CHECK_EQ(out[15], 0.0f);
  e = VLMK_LAUNCH((warp_sync_limits<2>), 1, 64, 0, nullptr, out.data());
  CHECK_EQ(int(e), int(cudaErrorLaunchFailure));
  const std::string message = cudaGetErrorString(e);
  CHECK_CONTAINS(message, "race (write-read)");
  CHECK_CONTAINS(message, "thread (20,0,0) wrote it");
}

// Out-of-bounds shared accesses are reported when the checker is on.
__global__ void out_of_bounds(float* out) {
  VLMK_DYNAMIC_SMEM(float, smem);
  const unsigned t = threadIdx.x;
  out[t] = vlmk::ld_shared(&smem[t == 5 ? 32 : t]);  // one past the end
}

SIMT_TEST(out_of_bounds_shared_access_is_reported) {
  RacecheckScope on(true);
  std::vector<float> out(32, 0.0f);
  const cudaError_t e = VLMK_LAUNCH(out_of_bounds, 1, 32, 32 * sizeof(float), nullptr, out.data());
  CHECK_EQ(int(e), int(cudaErrorIllegalAddress));
  const std::string message = cudaGetErrorString(e);
  CHECK_CONTAINS(message, "thread (5,0,0) reads 4 byte(s) of shared memory out of bounds");
  CHECK_CONTAINS(message, "at offset 128 (128 bytes of dynamic shared memory");
}

// ---- poison -----------------------------------------------------------------------------------

// Reads static and dynamic shared memory before anything wrote it, then writes it (so the next
// block on the same OS thread would see these values if poisoning were only done once).
__global__ void read_before_write(float* out, unsigned* bits) {
  VLMK_SHARED(float[32], fixed);
  VLMK_DYNAMIC_SMEM(float, dyn);
  const unsigned t = threadIdx.x;
  const unsigned b = blockIdx.x;
  out[b * 64 + t] = vlmk::ld_shared(&fixed[t]);
  out[b * 64 + 32 + t] = vlmk::ld_shared(&dyn[t]);
  std::memcpy(&bits[b * 64 + t], &fixed[t], 4);
  std::memcpy(&bits[b * 64 + 32 + t], &dyn[t], 4);
  __syncthreads();
  vlmk::st_shared(&fixed[t], 1.0f);
  vlmk::st_shared(&dyn[t], 2.0f);
}

SIMT_TEST(uninitialized_shared_reads_are_nan) {
  for (bool racecheck : {false, true}) {
    RacecheckScope scope(racecheck);
    simt::Config one_thread = simt::get_config();
    one_thread.num_threads = 1;  // every block on one OS thread: reuse of the arena
    simt::set_config(one_thread);
    std::vector<float> out(3 * 64, 0.0f);
    std::vector<unsigned> bits(3 * 64, 0);
    CHECK_CUDA(VLMK_LAUNCH(read_before_write, 3, 32, 32 * sizeof(float), nullptr, out.data(),
                           bits.data()));
    for (size_t i = 0; i < out.size(); ++i) {
      if (!std::isnan(out[i]) || bits[i] != 0xffffffffu) {
        CHECK(std::isnan(out[i]));
        CHECK_EQ(bits[i], 0xffffffffu);
        break;
      }
    }
  }
}

// Static shared memory is limited to 48 KB per block, as on a GPU.
__global__ void too_much_static(float* out) {
  VLMK_SHARED(float[8192], a);
  VLMK_SHARED(float[8192], b);
  out[0] = vlmk::ld_shared(&a[0]) + vlmk::ld_shared(&b[0]);
}

SIMT_TEST(static_shared_memory_limit) {
  float out = 0;
  const cudaError_t e = VLMK_LAUNCH(too_much_static, 1, 1, 0, nullptr, &out);
  CHECK_EQ(int(e), int(cudaErrorInvalidValue));
  CHECK_CONTAINS(cudaGetErrorString(e), "'b' (32768 bytes) does not fit");
}

SIMT_TEST(racecheck_setting_comes_from_the_environment) {
  const char* v = std::getenv("SIMT_RACECHECK");
  CHECK_EQ(simt::get_config().racecheck, v != nullptr && std::atoi(v) != 0);
}
