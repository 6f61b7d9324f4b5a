// The SIMT emulator's scheduler: blocks of fibers, barriers, warp exchanges, the launch.
//
// Execution model
// - One block runs on one OS thread; each of its CUDA threads is a fiber with its own stack.
//   A scheduler runs one fiber at a time until it blocks (at __syncthreads, a warp collective,
//   __nanosleep) or exits. Nothing is preempted, so a thread always runs as far as it can before
//   any other thread of its block moves: a missing __syncthreads makes a reader see memory that
//   its writer has not written yet (or has already overwritten), deterministically.
// - Threads are resumed in block order, reversed on every other block by default
//   (Schedule::kAlternate): forward order exposes a thread reading data of a higher-numbered
//   thread too early, reverse order a lower-numbered one, so a grid of two or more blocks
//   exercises both. SIMT_SCHEDULE=forward|reverse|alternate|random picks another policy.
// - Blocks of a grid are spread over SIMT_NUM_THREADS OS threads (default: hardware
//   concurrency); the launching thread works too. Launches from several host threads at once are
//   safe: each runs its own blocks and shares the worker pool.
// - __syncthreads is strict: it completes when every thread of the block has arrived at the same
//   __syncthreads (same source line). Threads that have exited never arrive. Anything else is a
//   deadlock (or a divergent barrier) and fails the launch with a message naming the threads,
//   the source lines and the block, instead of hanging.
// - Warp collectives (__shfl*_sync, votes, __syncwarp, __match_*, __reduce_*) rendezvous the
//   lanes named in the mask that exist and have not exited; the lane that completes the group
//   computes every lane's result. Reading a lane that does not take part gives 0xff bytes
//   (NaN for floats), where hardware gives an undefined value. Custom collectives (WarpOp::
//   kCustom: the tensor-core mma / ldmatrix of simt/tensor_core.h) ride the same rendezvous,
//   the completing lane running their function over every lane's payload.
// - cp.async copies are queued per thread (async_copy) and land in shared memory only at the
//   cp.async.wait_group that retires their group (async_wait), as writes of that thread there;
//   __syncthreads does not complete them.
// - Shared memory is one arena per block: the dynamic part at offset 0, the static variables
//   (VLMK_SHARED) after it. Both are filled with 0xff bytes before the block first sees them, so
//   an uninitialised read gives NaN (float, half, bf16) or -1, never a plausible leftover.
// - SIMT_RACECHECK=1 checks every shared-memory load and store made through simt::shared_load /
//   shared_store (vlmk::ld_shared / st_shared in kernel code): per byte it keeps the last write
//   and the last reads (thread, sync stamp, source line) and reports a write-read, read-write or
//   write-write by two different threads with no synchronization between them. A __syncthreads
//   orders every pair of threads; a completed warp collective (__syncwarp, shuffles, votes, ...)
//   orders the pairs of lanes that took part in it. Atomics are not checked (they do not race by
//   definition). A race fails the launch like a deadlock does.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <exception>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#include "simt/fiber.h"
#include "simt/types.h"

#if defined(__x86_64__)
#include <xmmintrin.h>
#endif

// The CUDA built-in variables. They are per OS thread (`thread_local`); the scheduler stores the
// running fiber's values before switching to it, and a block never leaves its OS thread.
inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;
constexpr int warpSize = 32;

namespace simt {

enum class Schedule {
  kAlternate,  // forward order in even blocks, reverse in odd ones (default)
  kForward,    // thread 0 first
  kReverse,    // last thread first
  kRandom,     // a fresh random order at every barrier and warp collective (seeded)
};

// Emulator settings. Defaults come from the environment once per process: SIMT_NUM_THREADS,
// SIMT_STACK_KB, SIMT_SCHEDULE, SIMT_SEED, SIMT_NUM_SMS, SIMT_RACECHECK. Each launch copies the
// settings, so set_config() affects the launches that start after it.
struct Config {
  int num_threads = 1;             // OS threads running the blocks of one launch (>= 1)
  size_t stack_bytes = 256 << 10;  // stack per emulated CUDA thread (virtual; pages on demand)
  Schedule schedule = Schedule::kAlternate;
  uint64_t seed = 0;  // for Schedule::kRandom
  int num_sms = 132;  // what cudaDeviceGetAttribute(MultiProcessorCount) reports
  // Dynamic shared memory per block: 227 KB at most (sm_90's opt-in limit; sm_80 has 163 KB),
  // 48 KB unless the kernel raised its limit with cudaFuncSetAttribute.
  size_t max_dynamic_smem = 232448;
  size_t default_dynamic_smem = 49152;
  bool racecheck = false;  // check shared-memory accesses for races (SIMT_RACECHECK=1)
};

// Static shared memory per block (CUDA's limit for __shared__ variables).
constexpr size_t kMaxStaticSharedBytes = 48 << 10;

namespace detail {

inline Schedule parse_schedule(const char* s) {
  if (s == nullptr) return Schedule::kAlternate;
  std::string v(s);
  if (v == "forward") return Schedule::kForward;
  if (v == "reverse") return Schedule::kReverse;
  if (v == "random") return Schedule::kRandom;
  return Schedule::kAlternate;
}

inline Config config_from_env() {
  Config c;
  unsigned hw = std::thread::hardware_concurrency();
  c.num_threads = hw == 0 ? 1 : int(hw);
  if (const char* v = std::getenv("SIMT_NUM_THREADS")) c.num_threads = std::max(1, std::atoi(v));
  if (const char* v = std::getenv("SIMT_STACK_KB")) {
    c.stack_bytes = size_t(std::max(16, std::atoi(v))) << 10;
  }
  c.schedule = parse_schedule(std::getenv("SIMT_SCHEDULE"));
  if (const char* v = std::getenv("SIMT_SEED")) c.seed = std::strtoull(v, nullptr, 10);
  if (const char* v = std::getenv("SIMT_NUM_SMS")) c.num_sms = std::max(1, std::atoi(v));
  if (const char* v = std::getenv("SIMT_RACECHECK")) c.racecheck = std::atoi(v) != 0;
  return c;
}

struct ConfigStore {
  std::mutex mu;
  Config config = config_from_env();
};

inline ConfigStore& config_store() {
  static ConfigStore* store = new ConfigStore();  // leaked: usable during static destruction
  return *store;
}

}  // namespace detail

inline Config get_config() {
  std::lock_guard<std::mutex> lock(detail::config_store().mu);
  return detail::config_store().config;
}

inline void set_config(const Config& config) {
  std::lock_guard<std::mutex> lock(detail::config_store().mu);
  detail::config_store().config = config;
  if (detail::config_store().config.num_threads < 1) detail::config_store().config.num_threads = 1;
}

namespace detail {

// ---------------------------------------------------------------------------------------------
// Errors: cudaGetLastError() state and the detailed message of the last failed launch, per host
// thread (like CUDA's per-thread last error).
struct ErrorState {
  cudaError_t last = cudaSuccess;
  cudaError_t detail_code = cudaSuccess;
  std::string detail;
};

inline ErrorState& error_state() {
  static thread_local ErrorState state;
  return state;
}

inline void record_error(cudaError_t code, const std::string& message) {
  ErrorState& s = error_state();
  s.last = code;
  s.detail_code = code;
  s.detail = message;
}

inline const char* error_name(cudaError_t e) {
  switch (e) {
    case cudaSuccess:
      return "cudaSuccess";
    case cudaErrorInvalidValue:
      return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation:
      return "cudaErrorMemoryAllocation";
    case cudaErrorInitializationError:
      return "cudaErrorInitializationError";
    case cudaErrorInvalidConfiguration:
      return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDeviceFunction:
      return "cudaErrorInvalidDeviceFunction";
    case cudaErrorNoKernelImageForDevice:
      return "cudaErrorNoKernelImageForDevice";
    case cudaErrorIllegalAddress:
      return "cudaErrorIllegalAddress";
    case cudaErrorLaunchOutOfResources:
      return "cudaErrorLaunchOutOfResources";
    case cudaErrorLaunchTimeout:
      return "cudaErrorLaunchTimeout";
    case cudaErrorAssert:
      return "cudaErrorAssert";
    case cudaErrorIllegalInstruction:
      return "cudaErrorIllegalInstruction";
    case cudaErrorMisalignedAddress:
      return "cudaErrorMisalignedAddress";
    case cudaErrorLaunchFailure:
      return "cudaErrorLaunchFailure";
    case cudaErrorNotSupported:
      return "cudaErrorNotSupported";
    case cudaErrorUnknown:
      return "cudaErrorUnknown";
  }
  return "cudaErrorUnknown";
}

inline const char* error_text(cudaError_t e) {
  switch (e) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidValue:
      return "invalid argument";
    case cudaErrorMemoryAllocation:
      return "out of memory";
    case cudaErrorInitializationError:
      return "initialization error";
    case cudaErrorInvalidConfiguration:
      return "invalid configuration argument";
    case cudaErrorInvalidDeviceFunction:
      return "invalid device function";
    case cudaErrorNoKernelImageForDevice:
      return "no kernel image is available for execution";
    case cudaErrorIllegalAddress:
      return "an illegal memory access was encountered";
    case cudaErrorLaunchOutOfResources:
      return "too many resources requested for launch";
    case cudaErrorLaunchTimeout:
      return "the launch timed out and was terminated";
    case cudaErrorAssert:
      return "device-side assert triggered";
    case cudaErrorIllegalInstruction:
      return "an illegal instruction was encountered";
    case cudaErrorMisalignedAddress:
      return "misaligned address";
    case cudaErrorLaunchFailure:
      return "unspecified launch failure";
    case cudaErrorNotSupported:
      return "operation not supported";
    case cudaErrorUnknown:
      return "unknown error";
  }
  return "unknown error";
}

// Concatenates strings and numbers (avoids `"literal" + std::string` chains, which trip a
// false -Wrestrict warning in GCC 12 at -O3).
inline void append_piece(std::string& out, const std::string& v) { out += v; }
inline void append_piece(std::string& out, const char* v) { out += v; }
inline void append_piece(std::string& out, char v) { out += v; }
template <class T, class = std::enable_if_t<std::is_integral<T>::value>>
inline void append_piece(std::string& out, T v) {
  out += std::to_string(v);
}

template <class... Pieces>
inline std::string cat(const Pieces&... pieces) {
  std::string out;
  (append_piece(out, pieces), ...);
  return out;
}

// Source location of a synchronization call, filled in by default arguments
// (__builtin_FILE/__builtin_LINE evaluate at the call site).
struct Site {
  const char* what = "";
  const char* file = "";
  int line = 0;
};

inline bool same_site(const Site& a, const Site& b) {
  return a.line == b.line && a.what == b.what &&
         (a.file == b.file || std::strcmp(a.file, b.file) == 0);
}

inline std::string site_string(const Site& s) { return cat(s.what, " at ", s.file, ":", s.line); }

enum class FiberState : uint8_t { kReady, kRunning, kBarrier, kWarp, kActiveMask, kExited };

// kCustom: a collective whose result the lane that completes the group computes with the
// function `custom` over every lane's `payload` (tensor-core emulations: mma, ldmatrix).
enum class WarpOp : uint8_t { kShfl, kVote, kSync, kMatchAny, kMatchAll, kReduce, kCustom };

enum class ReduceOp : uint8_t { kAddU, kAddS, kMinU, kMinS, kMaxU, kMaxS, kAnd, kOr, kXor };

constexpr size_t kMaxWarpBytes = 16;  // largest value a warp collective exchanges

class BlockRunner;
struct Fiber;

// A custom warp collective (WarpOp::kCustom), run by the lane that completes the group: `lanes`
// are the warp's 32 fibers, `group` the lanes taking part (each with its `payload`).
using WarpCustomFn = void (*)(BlockRunner& runner, Fiber* lanes, uint32_t group, unsigned warp);

// A cp.async copy of one thread, queued until the cp.async.wait_group that retires its group.
struct AsyncCopy {
  unsigned char* dst;
  uint32_t group;  // the commit group it belongs to (== the thread's commit count: not committed)
  uint8_t bytes;
  unsigned char data[16];  // the source bytes (read at issue), or zeros when !valid
};

struct Fiber {
  Context ctx;
  uint3 tid;
  unsigned linear = 0;
  FiberState state = FiberState::kReady;
  Site site;
  // Barrier arrival.
  int barrier_pred = 0;
  // Warp collective: what this lane brings ...
  WarpOp op = WarpOp::kSync;
  ReduceOp reduce = ReduceOp::kAddU;
  uint8_t size = 0;
  uint32_t mask = 0;
  int src = 0;
  int pred = 0;
  alignas(16) unsigned char in[kMaxWarpBytes];
  // ... and what it gets back.
  alignas(16) unsigned char out[kMaxWarpBytes];
  uint32_t out_bits = 0;
  // Custom collective (WarpOp::kCustom): the function and this lane's in/out record.
  WarpCustomFn custom = nullptr;
  void* payload = nullptr;
  bool custom_orders = false;  // whether it orders memory like __syncwarp (race checker)
  // cp.async: this thread's copies in flight, and how many commit groups it has committed.
  std::vector<AsyncCopy> async_copies;
  uint32_t async_committed = 0;
};

struct LaunchInfo {
  const char* name;
  dim3 grid;
  dim3 block;
  size_t smem_bytes;
  void (*invoke)(const void*);
  const void* args;
  Config config;
  unsigned fp_control;  // the launching thread's MXCSR (x86-64): denormal flushing, rounding
};

inline std::string dim_string(const dim3& d) { return cat("(", d.x, ",", d.y, ",", d.z, ")"); }

// Formats a sorted list of thread numbers as "0-31,40,64-127".
inline std::string ranges_string(const std::vector<unsigned>& ids) {
  std::string out;
  for (size_t i = 0; i < ids.size();) {
    size_t j = i;
    while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) ++j;
    if (!out.empty()) out += ',';
    out += std::to_string(ids[i]);
    if (j > i) out += cat("-", ids[j]);
    i = j + 1;
  }
  return out;
}

inline void fiber_main(void* arg);

// The per-OS-thread state that runs one block at a time.
class BlockRunner {
 public:
  // Runs block `block_linear` of `launch`. Returns cudaSuccess or an error with `*message`.
  cudaError_t run(const LaunchInfo& launch, uint64_t block_linear, std::string* message) {
    launch_ = &launch;
    const dim3 grid = launch.grid;
    const dim3 block = launch.block;
    blockIdx = uint3{unsigned(block_linear % grid.x), unsigned(block_linear / grid.x % grid.y),
                     unsigned(block_linear / (uint64_t(grid.x) * grid.y))};
    blockDim = block;
    gridDim = grid;
    n_threads_ = block.x * block.y * block.z;
    if (!arena_.reserve(n_threads_, launch.config.stack_bytes)) {
      *message = cat("simt: cannot map ", n_threads_, " fiber stacks");
      return cudaErrorMemoryAllocation;
    }
    if (fibers_.size() < n_threads_) fibers_.resize(n_threads_);
    for (unsigned i = 0; i < n_threads_; ++i) {
      Fiber& f = fibers_[i];
      f.tid = uint3{i % block.x, i / block.x % block.y, i / (block.x * block.y)};
      f.linear = i;
      f.state = FiberState::kReady;
      f.async_copies.clear();
      f.async_committed = 0;
      make_context(&f.ctx, arena_.stack(i), arena_.stack_bytes(), &fiber_main, this);
    }
    n_warps_ = (n_threads_ + 31) / 32;
    for (unsigned w = 0; w < n_warps_; ++w) {
      const unsigned lanes = std::min(32u, n_threads_ - 32 * w);
      warp_live_[w] = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
      warp_waiting_[w] = 0;
    }
    n_exited_ = 0;
    barrier_arrived_ = 0;
    barrier_pred_count_ = 0;
    failed_ = false;
    error_ = cudaSuccess;
    message_.clear();
    prepare_shared_memory(launch.smem_bytes);
    racecheck_ = launch.config.racecheck;
    if (racecheck_) prepare_racecheck();

    const Schedule s = launch.config.schedule;
    reverse_ = s == Schedule::kReverse || (s == Schedule::kAlternate && (block_linear & 1));
    random_ = s == Schedule::kRandom;
    rng_ = (launch.config.seed + 1) * 0x9e3779b97f4a7c15ull ^
           (block_linear + 1) * 0xbf58476d1ce4e5b9ull;

    queue_.assign(n_threads_, 0);
    queue_head_ = 0;
    queue_size_ = 0;
    order_.resize(n_threads_);
    for (unsigned i = 0; i < n_threads_; ++i) order_[i] = i;
    enqueue_in_order(order_.data(), n_threads_);

    for (;;) {
      while (queue_size_ > 0 && !failed_) {
        const unsigned id = queue_[queue_head_];
        if (++queue_head_ == n_threads_) queue_head_ = 0;
        --queue_size_;
        Fiber& f = fibers_[id];
        f.state = FiberState::kRunning;
        current_ = &f;
        threadIdx = f.tid;
        switch_context(&scheduler_, &f.ctx);
      }
      if (failed_ || !resolve_active_masks()) break;
    }
    current_ = nullptr;
    if (!failed_ && n_exited_ != n_threads_) report_deadlock();
    if (failed_) *message = message_;
    launch_ = nullptr;
    return failed_ ? error_ : cudaSuccess;
  }

  Fiber* current() const { return current_; }
  unsigned char* shared_memory() const { return smem_; }
  size_t shared_memory_bytes() const { return smem_bytes_; }
  bool racecheck() const { return racecheck_; }

  // The block's instance of the static shared variable identified by `key` (one per
  // declaration): the first thread to reach the declaration places it after the dynamic shared
  // memory and poisons it; every thread of the block gets the same address.
  void* static_shared(const void* key, size_t bytes, size_t align, const char* name) {
    for (const StaticShared& v : static_vars_) {
      if (v.key == key) return smem_ + v.offset;
    }
    const size_t offset = (static_base_ + static_used_ + align - 1) / align * align;
    if (offset + bytes > static_base_ + kMaxStaticSharedBytes) {
      fail(cudaErrorInvalidValue,
           cat("static shared memory: '", name, "' (", bytes, " bytes) does not fit in the ",
               kMaxStaticSharedBytes, " bytes of static shared memory a block can have"));
      leave();
    }
    static_vars_.push_back({key, offset, bytes, name});
    static_used_ = offset + bytes - static_base_;
    std::memset(smem_ + offset, 0xff, bytes);  // poison
    if (racecheck_) clear_shadow(offset, bytes);
    return smem_ + offset;
  }

  // Race check of one shared-memory access of `bytes` bytes at `p` by the running thread
  // (SIMT_RACECHECK=1). Addresses outside the block's shared arena (global memory, a plain
  // `__shared__` thread_local) are not shared memory of this block and are ignored.
  // `as`: the thread the access is made for (a lane of a warp collective that another lane
  // completes); default: the running thread.
  void shared_access(const void* p, size_t bytes, bool write, const char* file, int line,
                     const Fiber* as = nullptr) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    const uintptr_t base = reinterpret_cast<uintptr_t>(smem_);
    if (a < base || a >= base + smem_capacity_) return;
    const size_t offset = a - base;
    const bool in_dynamic = offset + bytes <= smem_bytes_;
    const bool in_static = offset >= static_base_ && offset + bytes <= static_base_ + static_used_;
    const Fiber* f = as != nullptr ? as : current_;
    if (!in_dynamic && !in_static) {
      fail(cudaErrorIllegalAddress,
           cat(thread_string(*f), write ? " writes " : " reads ", bytes,
               " byte(s) of shared memory out of bounds at offset ", offset, " (", smem_bytes_,
               " bytes of dynamic shared memory, static variables at ", static_base_, "..",
               static_base_ + static_used_, ") at ", file, ":", line));
      leave();
    }
    const Access now{stamp_, uint16_t(f->linear), intern_site(file, line)};
    for (size_t i = 0; i < bytes; ++i) {
      ShadowByte& s = shadow_[offset + i];
      const Access* other = nullptr;
      const char* kind = nullptr;
      if (conflicts(s.write, now)) {
        other = &s.write;
        kind = write ? "write-write" : "write-read";
      } else if (write && conflicts(s.read, now)) {
        other = &s.read;
        kind = "read-write";
      } else if (write && conflicts(s.read_other, now)) {
        other = &s.read_other;
        kind = "read-write";
      }
      if (other != nullptr) {
        fail(cudaErrorLaunchFailure, race_message(kind, offset + i, *other, now));
        leave();
      }
      if (write) {
        s.write = now;
      } else if (s.read.tid == now.tid) {
        s.read = now;
      } else {
        s.read_other = s.read;
        s.read = now;
      }
    }
  }

  // Whether [p, p + bytes) lies in the running block's shared memory (its dynamic part or a
  // static variable placed so far).
  bool in_shared_memory(const void* p, size_t bytes) const {
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    const uintptr_t base = reinterpret_cast<uintptr_t>(smem_);
    if (a < base || a + bytes > base + smem_capacity_) return false;
    const size_t offset = a - base;
    return offset + bytes <= smem_bytes_ ||
           (offset >= static_base_ && offset + bytes <= static_base_ + static_used_);
  }

  // A custom warp collective (see WarpCustomFn): returns once the group has completed.
  // `orders_memory`: whether, for the race checker, it orders the lanes' shared-memory accesses
  // before it with those after it as __syncwarp does (false for mma / ldmatrix, whose .sync
  // makes lanes wait for each other but is no memory barrier: PTX treats ldmatrix as a weak
  // memory operation).
  void warp_custom(WarpCustomFn fn, uint8_t kind, void* payload, uint32_t mask, const Site& site,
                   bool orders_memory = false) {
    Fiber* f = current_;
    f->op = WarpOp::kCustom;
    f->size = kind;
    f->custom = fn;
    f->payload = payload;
    f->custom_orders = orders_memory;
    f->mask = mask;
    warp_collective(f, site);
  }

  // cp.async of `bytes` (<= 16) bytes from global `src` to shared `dst` by the running thread:
  // the source is read now (zeros when !valid; src is not read), the bytes land at the
  // cp_async_wait that retires the copy's group (async_wait).
  void async_copy(void* dst, const void* src, size_t bytes, bool valid, const Site& site) {
    Fiber* f = current_;
    if (!in_shared_memory(dst, bytes)) {
      fail(cudaErrorIllegalAddress,
           cat(thread_string(*f), ": ", site_string(site), ": destination ", hex_pointer(dst),
               " is not in the block's shared memory (", bytes, " bytes)"));
      leave();
    }
    if (reinterpret_cast<uintptr_t>(dst) % bytes != 0 ||
        (valid && reinterpret_cast<uintptr_t>(src) % bytes != 0)) {
      fail(cudaErrorMisalignedAddress,
           cat(thread_string(*f), ": ", site_string(site), ": addresses ", hex_pointer(dst), " <- ",
               hex_pointer(src), " are not ", bytes, "-byte aligned"));
      leave();
    }
    AsyncCopy c;
    c.dst = static_cast<unsigned char*>(dst);
    c.group = f->async_committed;
    c.bytes = uint8_t(bytes);
    if (valid) {
      std::memcpy(c.data, src, bytes);
    } else {
      std::memset(c.data, 0, sizeof(c.data));
    }
    f->async_copies.push_back(c);
  }

  // cp.async.commit_group: the thread's uncommitted copies become one group (maybe empty).
  void async_commit() { ++current_->async_committed; }

  // cp.async.wait_group n: the copies of every group but the n most recent committed ones land
  // now (n == 0: every copy, committed or not, as cp.async.wait_all), in issue order, each a
  // shared-memory write of this thread at `site` for the race checker.
  void async_wait(int n, const Site& site) {
    Fiber* f = current_;
    const uint32_t keep = uint32_t(std::max(n, 0));
    const uint32_t limit = f->async_committed >= keep ? f->async_committed - keep : 0;
    std::vector<AsyncCopy>& q = f->async_copies;
    size_t kept = 0;
    for (size_t i = 0; i < q.size(); ++i) {
      const AsyncCopy& c = q[i];
      if (c.group < limit || n <= 0) {
        if (racecheck_) shared_access(c.dst, c.bytes, true, site.file, site.line);
        std::memcpy(c.dst, c.data, c.bytes);
      } else {
        q[kept++] = c;
      }
    }
    q.resize(kept);
  }

  // Called by a fiber after fail(): leaves the fiber for good (the block stops). Callers build
  // the message in a statement of its own, so no temporary is left alive on the abandoned stack.
  [[noreturn]] void leave() {
    Fiber* f = current_;
    switch_context(&f->ctx, &scheduler_);
    std::abort();  // never resumed
  }

  // __syncthreads and its _count/_and/_or forms. Returns the number of threads whose predicate
  // was nonzero.
  int barrier(int pred, const Site& site) {
    Fiber* f = current_;
    f->state = FiberState::kBarrier;
    f->site = site;
    f->barrier_pred = pred;
    ++barrier_arrived_;
    barrier_pred_count_ += pred != 0;
    if (barrier_arrived_ == n_threads_) {
      for (unsigned i = 0; i < n_threads_; ++i) {
        if (!same_site(fibers_[i].site, site)) {
          fail(cudaErrorLaunchFailure,
               cat("divergent barrier: every thread arrived at a barrier, but not at the same one:",
                   waiting_summary()));
          leave();
        }
      }
      barrier_result_ = barrier_pred_count_;
      barrier_stamp_ = ++stamp_;  // orders every access before it with every access after it
      barrier_arrived_ = 0;
      barrier_pred_count_ = 0;
      fill_order();
      enqueue_in_order(order_.data(), n_threads_);
    }
    switch_context(&f->ctx, &scheduler_);
    return barrier_result_;
  }

  static std::string hex_pointer(const void* p) {
    char buf[32];
    std::snprintf(buf, sizeof(buf), "%p", p);
    return buf;
  }

  // A warp collective. `f` has its op fields filled in; returns once the group completes, with
  // f->out / f->out_bits set.
  void warp_collective(Fiber* f, const Site& site) {
    const unsigned lane = f->linear & 31u;
    const unsigned warp = f->linear >> 5;
    if (((f->mask >> lane) & 1u) == 0) {
      char buf[160];
      std::snprintf(buf, sizeof(buf),
                    "%s with mask 0x%08x called by lane %u, which the mask "
                    "does not include (thread %u)",
                    site.what, f->mask, lane, f->linear);
      fail(cudaErrorLaunchFailure, cat(buf, " at ", site.file, ":", site.line));
      leave();
    }
    f->state = FiberState::kWarp;
    f->site = site;
    warp_waiting_[warp] |= 1u << lane;
    try_complete_warp(warp, f);
    switch_context(&f->ctx, &scheduler_);
  }

  // __activemask: waits until no thread of the block can run; then the lanes of the warp that
  // wait in the same __activemask() call are the active ones (what a converged group of lanes
  // that reached the call together would see on a GPU).
  uint32_t active_mask(const Site& site) {
    Fiber* f = current_;
    f->state = FiberState::kActiveMask;
    f->site = site;
    switch_context(&f->ctx, &scheduler_);
    return f->out_bits;
  }

  // __nanosleep: lets the other threads of the block run first.
  void yield() {
    Fiber* f = current_;
    f->state = FiberState::kReady;
    push(f->linear);
    switch_context(&f->ctx, &scheduler_);
  }

  // Called by fiber_main when the kernel function returns.
  [[noreturn]] void exit_fiber() {
    Fiber* f = current_;
    f->state = FiberState::kExited;
    ++n_exited_;
    const unsigned warp = f->linear >> 5;
    warp_live_[warp] &= ~(1u << (f->linear & 31u));
    // Groups that were waiting only for lanes that have now exited can complete.
    for (bool progress = true; progress && !failed_;) {
      progress = false;
      uint32_t waiting = warp_waiting_[warp];
      while (waiting != 0 && !failed_) {
        const unsigned lane = unsigned(__builtin_ctz(waiting));
        waiting &= waiting - 1;
        if (try_complete_warp(warp, &fibers_[warp * 32 + lane])) {
          progress = true;
          break;
        }
      }
    }
    switch_context(&f->ctx, &scheduler_);
    std::abort();  // never resumed
  }

  void run_kernel() { launch_->invoke(launch_->args); }

  std::string thread_string(const Fiber& f) const {
    return cat("thread (", f.tid.x, ",", f.tid.y, ",", f.tid.z, ")");
  }

  // Marks the block failed (the first failure's message is kept).
  void fail(cudaError_t code, const std::string& what) {
    if (failed_) return;
    failed_ = true;
    error_ = code;
    message_ =
        cat("simt: kernel '", launch_->name, "', block ", dim_string(dim3(blockIdx)), " of grid ",
            dim_string(launch_->grid), ", blockDim ", dim_string(launch_->block), ": ", what);
  }

 private:
  // The block's shared arena: `bytes` of dynamic shared memory at offset 0, then room for the
  // static variables (placed and poisoned as the block declares them, see static_shared).
  void prepare_shared_memory(size_t bytes) {
    static_base_ = (std::max<size_t>(bytes, 16) + 1023) / 1024 * 1024;
    const size_t want = static_base_ + kMaxStaticSharedBytes;
    if (want > smem_capacity_) {
      std::free(smem_);
      smem_capacity_ = want;
      smem_ = static_cast<unsigned char*>(std::aligned_alloc(1024, smem_capacity_));
    }
    smem_bytes_ = bytes;
    static_vars_.clear();
    static_used_ = 0;
    // Poison: uninitialised reads give NaN for float/half/bf16 and -1 for integers.
    std::memset(smem_, 0xff, static_base_);
  }

  // Race checker state -----------------------------------------------------------------------
  // An access: the sync stamp when it happened, the thread (linear id), the source line (index
  // into sites_). tid kNoThread: none yet.
  static constexpr uint16_t kNoThread = 0xffff;
  struct Access {
    uint32_t stamp = 0;
    uint16_t tid = kNoThread;
    uint16_t site = 0;
  };
  // Per shared-memory byte: the last write, the last read, and the last read by another thread
  // than that one (so a write after reads by several threads still sees one that is not its own).
  struct ShadowByte {
    Access write;
    Access read;
    Access read_other;
  };

  void prepare_racecheck() {
    if (shadow_.size() < smem_capacity_) shadow_.resize(smem_capacity_);
    clear_shadow(0, smem_bytes_);
    stamp_ = 1;
    barrier_stamp_ = 0;
    pair_sync_.assign(size_t(n_threads_) * 32, 0u);
  }

  void clear_shadow(size_t offset, size_t bytes) {
    std::fill(shadow_.begin() + offset, shadow_.begin() + offset + bytes, ShadowByte{});
  }

  // A completed warp collective orders, for every pair of lanes that took part, what each did
  // before it with what the other does after it.
  void record_warp_sync(unsigned warp, uint32_t group) {
    const uint32_t stamp = ++stamp_;
    for (uint32_t m = group; m != 0; m &= m - 1) {
      uint32_t* row = &pair_sync_[size_t(warp * 32 + unsigned(__builtin_ctz(m))) * 32];
      for (uint32_t k = group; k != 0; k &= k - 1) row[__builtin_ctz(k)] = stamp;
    }
  }

  // Whether `earlier` (by another thread) and `now` conflict: no __syncthreads since, and no
  // warp collective that both threads took part in since.
  bool conflicts(const Access& earlier, const Access& now) const {
    if (earlier.tid == kNoThread || earlier.tid == now.tid) return false;
    if (barrier_stamp_ > earlier.stamp) return false;
    if ((earlier.tid >> 5) == (now.tid >> 5) &&
        pair_sync_[size_t(now.tid) * 32 + (earlier.tid & 31u)] > earlier.stamp) {
      return false;
    }
    return true;
  }

  uint16_t intern_site(const char* file, int line) {
    if (last_site_file_ == file && last_site_line_ == line) return last_site_;
    auto it = site_index_.find({file, line});
    uint16_t index;
    if (it != site_index_.end()) {
      index = it->second;
    } else {
      index = uint16_t(std::min<size_t>(sites_.size(), 0xffff));
      if (sites_.size() < 0xffff) {
        sites_.push_back({"", file, line});
        site_index_.emplace(std::make_pair(file, line), index);
      }
    }
    last_site_file_ = file;
    last_site_line_ = line;
    last_site_ = index;
    return index;
  }

  std::string site_of(const Access& a) const {
    if (a.site >= sites_.size()) return "(unknown)";
    return cat(sites_[a.site].file, ":", sites_[a.site].line);
  }

  std::string thread_of(unsigned linear) const { return thread_string(fibers_[linear]); }

  // Where shared-memory byte `offset` lives: in the dynamic part or in which static variable.
  std::string location(size_t offset) const {
    char address[32];
    std::snprintf(address, sizeof(address), "%p", static_cast<void*>(smem_ + offset));
    if (offset < smem_bytes_) {
      return cat("dynamic shared memory offset ", offset, " (address ", address, ")");
    }
    for (const StaticShared& v : static_vars_) {
      if (offset >= v.offset && offset < v.offset + v.bytes) {
        return cat("byte ", offset - v.offset, " of static shared '", v.name, "' (address ",
                   address, ")");
      }
    }
    return cat("shared memory offset ", offset, " (address ", address, ")");
  }

  std::string race_message(const char* kind, size_t offset, const Access& earlier,
                           const Access& now) const {
    const bool earlier_write = kind[0] == 'w';
    const bool now_write = kind[std::strlen(kind) - 1] == 'e';
    return cat("shared-memory race (", kind, ") on ", location(offset), ": ",
               thread_of(earlier.tid), earlier_write ? " wrote" : " read", " it at ",
               site_of(earlier), ", then ", thread_of(now.tid), now_write ? " writes" : " reads",
               " it at ", site_of(now),
               " with no __syncthreads() between them (nor a __syncwarp()/warp collective that "
               "both lanes took part in)");
  }

  void push(unsigned id) {
    unsigned tail = queue_head_ + queue_size_;
    if (tail >= n_threads_) tail -= n_threads_;
    queue_[tail] = id;
    ++queue_size_;
  }

  uint64_t next_random() {
    rng_ ^= rng_ >> 12;
    rng_ ^= rng_ << 25;
    rng_ ^= rng_ >> 27;
    return rng_ * 0x2545f4914f6cdd1dull;
  }

  // Puts ids[0..n) (ascending) into the ready queue in the order of the schedule policy.
  void enqueue_in_order(unsigned* ids, unsigned n) {
    if (random_) {
      for (unsigned i = n; i > 1; --i) std::swap(ids[i - 1], ids[next_random() % i]);
    } else if (reverse_) {
      std::reverse(ids, ids + n);
    }
    for (unsigned i = 0; i < n; ++i) {
      fibers_[ids[i]].state = FiberState::kReady;
      push(ids[i]);
    }
  }

  // Completes every pending __activemask() (see active_mask); false when there was none.
  bool resolve_active_masks() {
    bool any = false;
    for (unsigned w = 0; w < n_warps_; ++w) {
      uint32_t pending = 0;
      for (unsigned l = 0; l < 32 && w * 32 + l < n_threads_; ++l) {
        if (fibers_[w * 32 + l].state == FiberState::kActiveMask) pending |= 1u << l;
      }
      while (pending != 0) {
        const Site site = fibers_[w * 32 + unsigned(__builtin_ctz(pending))].site;
        uint32_t group = 0;
        for (uint32_t m = pending; m != 0; m &= m - 1) {
          if (same_site(fibers_[w * 32 + unsigned(__builtin_ctz(m))].site, site)) {
            group |= 1u << __builtin_ctz(m);
          }
        }
        unsigned ids[32];
        unsigned n = 0;
        for (uint32_t m = group; m != 0; m &= m - 1) {
          fibers_[w * 32 + unsigned(__builtin_ctz(m))].out_bits = group;
          ids[n++] = w * 32 + unsigned(__builtin_ctz(m));
        }
        enqueue_in_order(ids, n);
        pending &= ~group;
        any = true;
      }
    }
    return any;
  }

  void fill_order() {
    for (unsigned i = 0; i < n_threads_; ++i) order_[i] = i;
  }

  // Completes the group of `candidate` (its mask) when every live lane of it is waiting with
  // that same mask. Returns true when it completed.
  bool try_complete_warp(unsigned warp, Fiber* candidate) {
    const uint32_t mask = candidate->mask;
    const uint32_t group = mask & warp_live_[warp];
    if ((warp_waiting_[warp] & group) != group) return false;
    Fiber* lanes = &fibers_[warp * 32];
    for (uint32_t m = group; m != 0; m &= m - 1) {
      if (lanes[__builtin_ctz(m)].mask != mask) return false;
    }
    for (uint32_t m = group; m != 0; m &= m - 1) {
      const Fiber& g = lanes[__builtin_ctz(m)];
      if (g.op != candidate->op || g.size != candidate->size ||
          (g.op == WarpOp::kReduce && g.reduce != candidate->reduce) ||
          (g.op == WarpOp::kCustom && g.custom != candidate->custom)) {
        fail(cudaErrorLaunchFailure, cat("lanes of warp ", warp, " with mask ", hex(mask),
                                         " met at different warp collectives:", waiting_summary()));
        return false;
      }
    }
    if (candidate->op == WarpOp::kCustom) {
      candidate->custom(*this, lanes, group, warp);  // may fail() and leave()
    } else {
      compute_warp(lanes, group, *candidate);
    }
    if (racecheck_ && (candidate->op != WarpOp::kCustom || candidate->custom_orders)) {
      record_warp_sync(warp, group);
    }
    unsigned ids[32];
    unsigned n = 0;
    for (uint32_t m = group; m != 0; m &= m - 1) ids[n++] = warp * 32 + __builtin_ctz(m);
    warp_waiting_[warp] &= ~group;
    enqueue_in_order(ids, n);
    return true;
  }

  static void compute_warp(Fiber* lanes, uint32_t group, const Fiber& proto) {
    const size_t size = proto.size;
    switch (proto.op) {
      case WarpOp::kSync:
      case WarpOp::kCustom:  // computed by the collective's own function (try_complete_warp)
        break;
      case WarpOp::kShfl:
        for (uint32_t m = group; m != 0; m &= m - 1) {
          Fiber& g = lanes[__builtin_ctz(m)];
          const int j = g.src;
          if (j >= 0 && j < 32 && ((group >> j) & 1u)) {
            std::memcpy(g.out, lanes[j].in, size);
          } else {
            std::memset(g.out, 0xff, size);  // source lane not taking part: undefined on GPU
          }
        }
        break;
      case WarpOp::kVote: {
        uint32_t bits = 0;
        for (uint32_t m = group; m != 0; m &= m - 1) {
          const unsigned l = unsigned(__builtin_ctz(m));
          if (lanes[l].pred != 0) bits |= 1u << l;
        }
        for (uint32_t m = group; m != 0; m &= m - 1) {
          lanes[__builtin_ctz(m)].out_bits = bits;
          lanes[__builtin_ctz(m)].pred = int(group);  // for __all_sync
        }
        break;
      }
      case WarpOp::kMatchAny:
      case WarpOp::kMatchAll: {
        bool all_equal = true;
        for (uint32_t m = group; m != 0; m &= m - 1) {
          Fiber& g = lanes[__builtin_ctz(m)];
          uint32_t same = 0;
          for (uint32_t k = group; k != 0; k &= k - 1) {
            if (std::memcmp(lanes[__builtin_ctz(k)].in, g.in, size) == 0) {
              same |= 1u << __builtin_ctz(k);
            }
          }
          g.out_bits = same;
          all_equal = all_equal && same == group;
        }
        if (proto.op == WarpOp::kMatchAll) {
          for (uint32_t m = group; m != 0; m &= m - 1) {
            Fiber& g = lanes[__builtin_ctz(m)];
            g.out_bits = all_equal ? group : 0u;
            g.pred = all_equal ? 1 : 0;
          }
        }
        break;
      }
      case WarpOp::kReduce: {
        uint32_t acc = 0;
        bool first = true;
        for (uint32_t m = group; m != 0; m &= m - 1) {
          uint32_t v;
          std::memcpy(&v, lanes[__builtin_ctz(m)].in, 4);
          if (first) {
            acc = v;
            first = false;
            continue;
          }
          switch (proto.reduce) {
            case ReduceOp::kAddU:
            case ReduceOp::kAddS:
              acc += v;
              break;
            case ReduceOp::kMinU:
              acc = std::min(acc, v);
              break;
            case ReduceOp::kMaxU:
              acc = std::max(acc, v);
              break;
            case ReduceOp::kMinS:
              acc = uint32_t(std::min(int32_t(acc), int32_t(v)));
              break;
            case ReduceOp::kMaxS:
              acc = uint32_t(std::max(int32_t(acc), int32_t(v)));
              break;
            case ReduceOp::kAnd:
              acc &= v;
              break;
            case ReduceOp::kOr:
              acc |= v;
              break;
            case ReduceOp::kXor:
              acc ^= v;
              break;
          }
        }
        for (uint32_t m = group; m != 0; m &= m - 1) {
          std::memcpy(lanes[__builtin_ctz(m)].out, &acc, 4);
        }
        break;
      }
    }
  }

  static std::string hex(uint32_t v) {
    char buf[16];
    std::snprintf(buf, sizeof(buf), "0x%08x", v);
    return buf;
  }

  // One line per group of threads that wait at the same place, plus the count of exited ones.
  std::string waiting_summary() const {
    std::map<std::string, std::vector<unsigned>> groups;
    std::vector<unsigned> exited;
    for (unsigned i = 0; i < n_threads_; ++i) {
      const Fiber& f = fibers_[i];
      if (f.state == FiberState::kExited) {
        exited.push_back(i);
      } else if (f.state == FiberState::kBarrier) {
        groups[site_string(f.site)].push_back(i);
      } else if (f.state == FiberState::kWarp) {
        groups[cat(site_string(f.site), " (warp ", i / 32, ", mask ", hex(f.mask), ")")].push_back(
            i);
      } else {
        groups["running or ready"].push_back(i);
      }
    }
    std::string out;
    for (const auto& g : groups) {
      out += cat("\n  ", g.second.size(), " thread(s) [", ranges_string(g.second), "] wait in ",
                 g.first);
    }
    if (!exited.empty()) {
      out += cat("\n  ", exited.size(), " thread(s) [", ranges_string(exited), "] have exited");
    }
    out += "\n  (threads are numbered x + y*blockDim.x + z*blockDim.x*blockDim.y)";
    return out;
  }

  void report_deadlock() {
    std::string hint;
    bool at_barrier = false;
    for (unsigned i = 0; i < n_threads_; ++i) {
      at_barrier = at_barrier || fibers_[i].state == FiberState::kBarrier;
    }
    if (at_barrier && n_exited_ > 0) {
      hint =
          "\n  every thread of a block must reach each __syncthreads(); a thread that has "
          "returned never arrives (is the barrier inside a branch or after an early return?)";
    } else if (at_barrier) {
      hint =
          "\n  a __syncthreads() waits for all threads of the block, including those blocked "
          "in a warp collective or at another __syncthreads()";
    }
    fail(cudaErrorLaunchTimeout,
         "deadlock: no thread can make progress (on a GPU this kernel would hang):" +
             waiting_summary() + hint);
  }

  const LaunchInfo* launch_ = nullptr;
  StackArena arena_;
  std::vector<Fiber> fibers_;
  Context scheduler_;
  Fiber* current_ = nullptr;
  unsigned n_threads_ = 0;
  unsigned n_warps_ = 0;
  unsigned n_exited_ = 0;
  uint32_t warp_live_[32] = {};     // lanes that exist and have not exited
  uint32_t warp_waiting_[32] = {};  // lanes blocked in a warp collective
  unsigned barrier_arrived_ = 0;
  int barrier_pred_count_ = 0;
  int barrier_result_ = 0;
  std::vector<unsigned> queue_;  // ready fibers, a ring of capacity n_threads_
  unsigned queue_head_ = 0;
  unsigned queue_size_ = 0;
  std::vector<unsigned> order_;
  bool reverse_ = false;
  bool random_ = false;
  uint64_t rng_ = 1;
  unsigned char* smem_ = nullptr;
  size_t smem_capacity_ = 0;
  size_t smem_bytes_ = 0;
  // Static shared variables of the running block (VLMK_SHARED), placed from static_base_ on.
  struct StaticShared {
    const void* key;
    size_t offset;
    size_t bytes;
    const char* name;
  };
  std::vector<StaticShared> static_vars_;
  size_t static_base_ = 0;
  size_t static_used_ = 0;
  // Race checker (SIMT_RACECHECK): see shared_access.
  bool racecheck_ = false;
  std::vector<ShadowByte> shadow_;   // one per byte of the arena
  std::vector<uint32_t> pair_sync_;  // [thread][lane]: stamp of their last common warp sync
  uint32_t stamp_ = 1;               // counts the block's sync events
  uint32_t barrier_stamp_ = 0;       // stamp of the last __syncthreads
  std::vector<Site> sites_;
  std::map<std::pair<const char*, int>, uint16_t> site_index_;
  const char* last_site_file_ = nullptr;
  int last_site_line_ = 0;
  uint16_t last_site_ = 0;
  bool failed_ = false;
  cudaError_t error_ = cudaSuccess;
  std::string message_;

 public:
  BlockRunner() = default;
  BlockRunner(const BlockRunner&) = delete;
  BlockRunner& operator=(const BlockRunner&) = delete;
  ~BlockRunner() { std::free(smem_); }
};

// The runner of the calling OS thread, and the one currently running a block (null outside).
inline BlockRunner& thread_runner() {
  static thread_local BlockRunner runner;
  return runner;
}

inline thread_local BlockRunner* tls_active = nullptr;

inline void fiber_main(void* arg) {
  BlockRunner* runner = static_cast<BlockRunner*>(arg);
  bool threw = false;
  try {
    runner->run_kernel();
  } catch (const std::exception& e) {
    runner->fail(cudaErrorLaunchFailure,
                 cat(runner->thread_string(*runner->current()), " threw an exception: ", e.what()));
    threw = true;
  } catch (...) {
    runner->fail(cudaErrorLaunchFailure,
                 cat(runner->thread_string(*runner->current()), " threw an exception"));
    threw = true;
  }
  if (threw) runner->leave();  // outside the handler, so the exception object is released
  runner->exit_fiber();
}

// The active runner, for device-side functions; aborts when called outside a kernel.
inline BlockRunner& active(const char* what) {
  BlockRunner* r = tls_active;
  if (r == nullptr || r->current() == nullptr) {
    std::fprintf(stderr, "simt: %s called outside a kernel launched by simt::launch\n", what);
    std::abort();
  }
  return *r;
}

// ---------------------------------------------------------------------------------------------
// Launch: the blocks of a grid, shared between the launching thread and a pool of workers.

struct Job {
  const LaunchInfo* launch = nullptr;
  uint64_t num_blocks = 0;
  std::atomic<uint64_t> next_block{0};
  std::atomic<bool> abort{false};
  int helpers = 0;      // workers that joined (guarded by the pool mutex)
  int max_helpers = 0;  // how many may join
  int active = 0;       // workers running blocks of this job (guarded by the pool mutex)
  std::mutex error_mu;
  cudaError_t error = cudaSuccess;
  std::string message;

  void run_blocks() {
    BlockRunner& runner = thread_runner();
    BlockRunner* saved = tls_active;
    tls_active = &runner;
#if defined(__x86_64__)
    // Every block computes with the launching thread's floating-point mode, whichever OS
    // thread runs it (torch.set_flush_denormal, for one, sets it per thread).
    const unsigned saved_fp_control = _mm_getcsr();
    _mm_setcsr(launch->fp_control);
#endif
    for (;;) {
      if (abort.load(std::memory_order_relaxed)) break;
      const uint64_t b = next_block.fetch_add(1, std::memory_order_relaxed);
      if (b >= num_blocks) break;
      std::string msg;
      const cudaError_t e = runner.run(*launch, b, &msg);
      if (e != cudaSuccess) {
        std::lock_guard<std::mutex> lock(error_mu);
        if (error == cudaSuccess) {
          error = e;
          message = msg;
        }
        abort.store(true, std::memory_order_relaxed);
      }
    }
#if defined(__x86_64__)
    _mm_setcsr(saved_fp_control);
#endif
    tls_active = saved;
  }
};

class Pool {
 public:
  // Makes sure at least `n` workers exist.
  void ensure_workers(int n) {
    std::lock_guard<std::mutex> lock(mu_);
    while (workers_ < n) {
      std::thread([this] { worker_loop(); }).detach();
      ++workers_;
    }
  }

  void run(Job* job, int helpers) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      job->max_helpers = helpers;
      jobs_.push_back(job);
    }
    work_cv_.notify_all();
    job->run_blocks();
    std::unique_lock<std::mutex> lock(mu_);
    auto it = std::find(jobs_.begin(), jobs_.end(), job);
    if (it != jobs_.end()) jobs_.erase(it);
    done_cv_.wait(lock, [job] { return job->active == 0; });
  }

  pid_t pid() const { return pid_; }

 private:
  void worker_loop() {
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      work_cv_.wait(lock, [this] { return !jobs_.empty(); });
      Job* job = jobs_.front();
      if (++job->helpers >= job->max_helpers) jobs_.pop_front();  // enough helpers now
      ++job->active;
      lock.unlock();
      job->run_blocks();
      lock.lock();
      auto it = std::find(jobs_.begin(), jobs_.end(), job);
      if (it != jobs_.end()) jobs_.erase(it);  // no blocks left to hand out
      if (--job->active == 0) done_cv_.notify_all();
    }
  }

  std::mutex mu_;
  std::condition_variable work_cv_;
  std::condition_variable done_cv_;
  std::deque<Job*> jobs_;
  int workers_ = 0;
  pid_t pid_ = getpid();
};

// The process-wide pool; a forked child gets a fresh one (the parent's workers do not exist in
// the child). Leaked on purpose: workers may still wait on it during static destruction.
inline Pool& pool() {
  static std::mutex mu;
  static Pool* p = nullptr;
  std::lock_guard<std::mutex> lock(mu);
  if (p == nullptr || p->pid() != getpid()) p = new Pool();
  return *p;
}

struct FuncAttributes {
  std::mutex mu;
  std::unordered_map<uintptr_t, size_t> max_dynamic_smem;
};

inline FuncAttributes& func_attributes() {
  static FuncAttributes* a = new FuncAttributes();
  return *a;
}

inline size_t dynamic_smem_limit(uintptr_t kernel, const Config& config) {
  FuncAttributes& a = func_attributes();
  std::lock_guard<std::mutex> lock(a.mu);
  auto it = a.max_dynamic_smem.find(kernel);
  return it == a.max_dynamic_smem.end() ? config.default_dynamic_smem : it->second;
}

inline cudaError_t fail_launch(cudaError_t code, const std::string& message) {
  record_error(code, message);
  return code;
}

inline cudaError_t launch_impl(const char* name, uintptr_t kernel, dim3 grid, dim3 block,
                               size_t smem_bytes, void (*invoke)(const void*), const void* args) {
  const Config config = get_config();
  auto where = [&] {
    return cat("simt: launch of '", name, "' with grid ", dim_string(grid), ", block ",
               dim_string(block), ": ");
  };
  if (tls_active != nullptr) {
    // Not recorded as the host thread's last error: the enclosing launch continues.
    return cudaErrorNotSupported;  // launching a kernel from a kernel is not supported
  }
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (block.x == 0 || block.y == 0 || block.z == 0 || block.x > 1024 || block.y > 1024 ||
      block.z > 64 || threads > 1024) {
    return fail_launch(cudaErrorInvalidConfiguration,
                       cat(where(), "a block must have 1 to 1024 threads (x, y <= 1024, z <= 64)"));
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 ||
      grid.z > 65535) {
    return fail_launch(cudaErrorInvalidConfiguration,
                       cat(where(), "grid dimensions must be >= 1 (x < 2^31, y and z <= 65535)"));
  }
  const size_t limit = dynamic_smem_limit(kernel, config);
  if (smem_bytes > limit) {
    return fail_launch(cudaErrorInvalidValue,
                       cat(where(), smem_bytes,
                           " bytes of dynamic shared memory exceed the kernel's limit of ", limit,
                           " (above 48 KB, raise it with cudaFuncSetAttribute(kernel, "
                           "cudaFuncAttributeMaxDynamicSharedMemorySize, bytes))"));
  }
#if defined(__x86_64__)
  const unsigned fp_control = _mm_getcsr();
#else
  const unsigned fp_control = 0;
#endif
  LaunchInfo launch{name, grid, block, smem_bytes, invoke, args, config, fp_control};
  Job job;
  job.launch = &launch;
  job.num_blocks = uint64_t(grid.x) * grid.y * grid.z;
  const int helpers = int(std::min<uint64_t>(uint64_t(config.num_threads - 1), job.num_blocks - 1));
  if (helpers <= 0) {
    job.run_blocks();
  } else {
    Pool& p = pool();
    p.ensure_workers(helpers);
    p.run(&job, helpers);
  }
  if (job.error != cudaSuccess) return fail_launch(job.error, job.message);
  return cudaSuccess;
}

template <class T>
struct KernelArgs;

template <class... Params>
struct KernelArgs<void (*)(Params...)> {
  void (*kernel)(Params...);
  std::tuple<std::decay_t<Params>...> values;

  static void invoke(const void* self) {
    const KernelArgs* a = static_cast<const KernelArgs*>(self);
    std::apply(a->kernel, a->values);  // each emulated thread gets its own copy of the arguments
  }
};

}  // namespace detail

// Runs `kernel` on a grid of `grid` blocks of `block` threads with `smem_bytes` bytes of dynamic
// shared memory, synchronously. Arguments convert to the kernel's parameter types as in a call.
// Returns cudaSuccess or an error (also kept for cudaGetLastError(); cudaGetErrorString(error)
// and simt::last_error_message() give the detailed message).
template <class... Params, class... Args>
cudaError_t launch_named(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block,
                         size_t smem_bytes, Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args),
                "simt::launch: the number of arguments differs from the kernel's parameters");
  using Packed = detail::KernelArgs<void (*)(Params...)>;
  const Packed packed{kernel, std::tuple<std::decay_t<Params>...>(std::forward<Args>(args)...)};
  return detail::launch_impl(name, reinterpret_cast<uintptr_t>(kernel), grid, block, smem_bytes,
                             &Packed::invoke, &packed);
}

template <class... Params, class... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes,
                   Args&&... args) {
  return launch_named("<kernel>", kernel, grid, block, smem_bytes, std::forward<Args>(args)...);
}

// The detailed message of the last failed launch on this host thread ("" if none).
inline const char* last_error_message() { return detail::error_state().detail.c_str(); }

// The dynamic shared memory of the running block (the launch's smem_bytes, 1024-byte aligned,
// filled with 0xff bytes at the start of every block).
template <class T>
T* dynamic_shared() {
  return reinterpret_cast<T*>(detail::active("dynamic_shared").shared_memory());
}

// Bytes of dynamic shared memory of the running block.
inline size_t dynamic_shared_bytes() {
  return detail::active("dynamic_shared_bytes").shared_memory_bytes();
}

// The running block's instance of a static shared variable of type T (what VLMK_SHARED declares
// under the emulator): `key` is the address of an object unique to the declaration, `name` its
// name for messages. Placed after the dynamic shared memory and filled with 0xff bytes when the
// first thread of the block reaches the declaration.
template <class T>
T* static_shared(const void* key, const char* name) {
  constexpr size_t kAlign = alignof(T) > 16 ? alignof(T) : 16;
  return static_cast<T*>(
      detail::active("static_shared").static_shared(key, sizeof(T), kAlign, name));
}

// A shared-memory load / store, seen by the race checker when SIMT_RACECHECK is on (otherwise a
// plain load / store after one test). Kernels use them through vlmk::ld_shared / st_shared.
template <class T>
inline T shared_load(const T* p, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  detail::BlockRunner* r = detail::tls_active;
  if (r != nullptr && r->racecheck()) r->shared_access(p, sizeof(T), false, file, line);
  return *p;
}

template <class T>
inline void shared_store(T* p, const typename std::enable_if<true, T>::type& value,
                         const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  detail::BlockRunner* r = detail::tls_active;
  if (r != nullptr && r->racecheck()) r->shared_access(p, sizeof(T), true, file, line);
  *p = value;
}

}  // namespace simt
