// simt.h — a header-only SIMT emulator: CUDA kernel sources compiled as host C++ (g++ >= 9,
// -std=c++17, built with -DVLMK_SIMT through common/cuda_compat.cuh) run on the CPU with real
// CUDA barrier and warp semantics. Used for tests only (the `cuda_sim` backend).
//
// Tensor cores: not nvcuda::wmma, but the PTX-level building blocks of common/tensor_core.cuh
// (mma.sync, ldmatrix, cp.async), emulated in simt/tensor_core.h.
// Not emulated (yet): WMMA, inline PTX (guard it with `#if !defined(VLMK_SIMT)`), `extern
// __shared__` (use VLMK_DYNAMIC_SMEM), cooperative groups, dynamic parallelism, device-side
// assert() (the host's assert aborts the process), spin-waiting on another block of the same
// launch, and global memory checking (an out-of-bounds access is a host out-of-bounds access;
// shared accesses made through vlmk::ld_shared / st_shared are bounds-checked under
// SIMT_RACECHECK=1).
//
// Mapping of the CUDA language onto the host:
//   __global__ __device__ __host__ __constant__ __managed__ __grid_constant__  -> nothing
//   __forceinline__ -> inline + always_inline; __launch_bounds__(...) -> nothing;
//   __align__(n) -> aligned(n); __restrict__ is g++'s own keyword.
//   __shared__ -> `static thread_local`: one instance per OS thread, and all threads (fibers)
//       of a block run on one OS thread, so the block's threads share it while blocks running
//       concurrently on other OS threads have their own. Like on a GPU its contents are
//       undefined at block start (whatever the previous block on that OS thread left there).
//       VLMK_SHARED(T, name) (common/cuda_compat.cuh) is the checked form: the variable lives in
//       the block's shared arena, poisoned (0xff bytes) at block start and seen by the race
//       checker (SIMT_RACECHECK=1, see runtime.h) through simt::shared_load / shared_store.
//   threadIdx / blockIdx / blockDim / gridDim -> thread_local variables that the scheduler sets
//       before it resumes a thread; warpSize -> constexpr 32.
//   kernel<<<grid, block, smem, stream>>>(args...) -> simt::launch(kernel, grid, block, smem,
//       args...) (synchronous; VLMK_LAUNCH in common/cuda_compat.cuh writes either form).
// See runtime.h for the execution model (fibers, schedule, deadlock detection).
//
// Device-side API (CUDA's names and semantics):
//   barriers   __syncthreads, __syncthreads_count/_and/_or (every thread of the block must reach
//              the same one: an early `return` before a barrier is reported as a deadlock)
//   warps      __shfl_sync, __shfl_up_sync, __shfl_down_sync, __shfl_xor_sync (optional width),
//              __ballot_sync, __any_sync, __all_sync, __uni_sync, __activemask, __syncwarp,
//              __match_any_sync, __match_all_sync, __reduce_{add,min,max,and,or,xor}_sync
//   atomics    atomicAdd/Sub/Exch/Min/Max/And/Or/Xor/CAS/Inc/Dec (int, unsigned, long long,
//              unsigned long long; Add also float, double, __half(2), __nv_bfloat16(2)),
//              __threadfence(_block/_system)
//   math       __expf, __logf, __log2f, __powf, __sinf, __cosf, __sincosf, __fdividef, rsqrtf,
//              __saturatef, __f*_rn, min/max overloads, <math.h> (expf, exp2f, fmaxf, INFINITY...)
//   bits       __popc(ll), __ffs(ll), __clz(ll), __brev(ll), __byte_perm, __funnelshift_l/r,
//              __float_as_int and friends, __ldg / __ldcg / __ldcs / __stcs ...
//   16-bit     __half, __half2, __nv_bfloat16, __nv_bfloat162 and their conversions (half.h)
//   other      __trap, __nanosleep (yields to the block's other threads)
// Host-side API: simt::launch(kernel, grid, block, smem_bytes, args...), simt::launch_named,
//   simt::dynamic_shared<T>(), simt::dynamic_shared_bytes(), simt::static_shared<T>(),
//   simt::shared_load / shared_store, simt::last_error_message(),
//   simt::get_config()/set_config(); cudaGetLastError, cudaPeekAtLastError, cudaGetErrorString
//   (the detailed message of this thread's last failed launch), cudaGetErrorName,
//   cudaFuncSetAttribute (MaxDynamicSharedMemorySize), cudaDeviceGetAttribute,
//   cudaDeviceSynchronize, cudaStreamSynchronize, cudaMalloc/Free/Memset(Async)/Memcpy(Async),
//   cudaMemcpyToSymbol.
// Errors: bad launch shape -> cudaErrorInvalidConfiguration; dynamic shared memory above the
//   kernel's limit -> cudaErrorInvalidValue; deadlock -> cudaErrorLaunchTimeout; divergent
//   barrier, misused warp collective, __trap, exception, shared-memory race (SIMT_RACECHECK)
//   -> cudaErrorLaunchFailure; out-of-bounds shared access (SIMT_RACECHECK) ->
//   cudaErrorIllegalAddress; static shared memory over 48 KB -> cudaErrorInvalidValue.
#pragma once

#include <math.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>

#include "simt/fiber.h"
#include "simt/half.h"
#include "simt/intrinsics.h"
#include "simt/runtime.h"
#include "simt/types.h"

#ifndef INFINITY
#define INFINITY (__builtin_inff())
#endif

// ---- CUDA keywords (defined after every system header above is in) ----
#define __global__
#define __device__
#define __host__
#define __constant__
#define __managed__
#define __grid_constant__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static thread_local

// ---- block barriers ----
// The source line of each call is recorded (default arguments evaluated at the call site), so a
// deadlock report can say where every thread waits.
inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  simt::detail::active("__syncthreads").barrier(0, {"__syncthreads()", file, line});
}
inline int __syncthreads_count(int pred, const char* file = __builtin_FILE(),
                               int line = __builtin_LINE()) {
  return simt::detail::active("__syncthreads_count")
      .barrier(pred, {"__syncthreads_count()", file, line});
}
inline int __syncthreads_and(int pred, const char* file = __builtin_FILE(),
                             int line = __builtin_LINE()) {
  return simt::detail::active("__syncthreads_and")
             .barrier(pred, {"__syncthreads_and()", file, line}) ==
         int(blockDim.x * blockDim.y * blockDim.z);
}
inline int __syncthreads_or(int pred, const char* file = __builtin_FILE(),
                            int line = __builtin_LINE()) {
  return simt::detail::active("__syncthreads_or")
             .barrier(pred, {"__syncthreads_or()", file, line}) != 0;
}

// Stops the kernel: the launch fails with cudaErrorLaunchFailure.
[[noreturn]] inline void __trap() {
  simt::detail::BlockRunner& r = simt::detail::active("__trap");
  r.fail(cudaErrorLaunchFailure,
         simt::detail::cat(r.thread_string(*r.current()), " executed __trap()"));
  r.leave();
}

// Lets the other threads of the block run (so a spin-wait on shared memory can make progress).
inline void __nanosleep(unsigned) { simt::detail::active("__nanosleep").yield(); }

// ---- warp collectives ----
namespace simt {
namespace detail {

inline Fiber& warp_lane(const char* what) { return *active(what).current(); }

inline void check_width(BlockRunner& r, int width, const Site& site) {
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
    r.fail(cudaErrorLaunchFailure,
           cat(site_string(site), ": width ", width, " is not a power of two in [1, 32]"));
    r.leave();
  }
}

enum class ShflMode { kIdx, kUp, kDown, kXor };

// The source lane of a shuffle, as PTX shfl.sync defines it (own lane when out of the segment).
inline int shfl_source(ShflMode mode, int lane, long long b, int width) {
  const int segment_start = lane & ~(width - 1);
  const int segment_last = segment_start + width - 1;
  long long j = lane;
  bool in_range = true;
  switch (mode) {
    case ShflMode::kIdx:
      j = segment_start + (b & (width - 1));
      break;
    case ShflMode::kUp:
      j = lane - b;
      in_range = j >= segment_start;
      break;
    case ShflMode::kDown:
      j = lane + b;
      in_range = j <= segment_last;
      break;
    case ShflMode::kXor:
      j = lane ^ b;
      in_range = j >= 0 && j <= segment_last;
      break;
  }
  return in_range ? int(j) : lane;
}

template <class T>
inline T shuffle(ShflMode mode, unsigned mask, const T& value, long long b, int width, Site site) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= kMaxWarpBytes,
                "warp shuffles exchange trivially copyable values of at most 16 bytes");
  BlockRunner& r = active(site.what);
  Fiber& f = *r.current();
  check_width(r, width, site);
  f.op = WarpOp::kShfl;
  f.size = uint8_t(sizeof(T));
  f.mask = mask;
  f.src = shfl_source(mode, int(f.linear & 31u), b, width);
  std::memcpy(f.in, &value, sizeof(T));
  r.warp_collective(&f, site);
  T out;
  std::memcpy(&out, f.out, sizeof(T));
  return out;
}

inline Fiber& vote(WarpOp op, unsigned mask, int pred, const void* value, size_t size,
                   const Site& site) {
  BlockRunner& r = active(site.what);
  Fiber& f = *r.current();
  f.op = op;
  f.size = uint8_t(size);
  f.mask = mask;
  f.pred = pred;
  if (size > 0) std::memcpy(f.in, value, size);
  r.warp_collective(&f, site);
  return f;
}

inline uint32_t warp_reduce(ReduceOp op, unsigned mask, uint32_t value, const Site& site) {
  BlockRunner& r = active(site.what);
  Fiber& f = *r.current();
  f.op = WarpOp::kReduce;
  f.reduce = op;
  f.size = 4;
  f.mask = mask;
  std::memcpy(f.in, &value, 4);
  r.warp_collective(&f, site);
  uint32_t out;
  std::memcpy(&out, f.out, 4);
  return out;
}

}  // namespace detail
}  // namespace simt

template <class T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize,
                     const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return simt::detail::shuffle(simt::detail::ShflMode::kIdx, mask, var, src_lane, width,
                               {"__shfl_sync()", file, line});
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                        const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return simt::detail::shuffle(simt::detail::ShflMode::kUp, mask, var, delta, width,
                               {"__shfl_up_sync()", file, line});
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                          const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return simt::detail::shuffle(simt::detail::ShflMode::kDown, mask, var, delta, width,
                               {"__shfl_down_sync()", file, line});
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize,
                         const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return simt::detail::shuffle(simt::detail::ShflMode::kXor, mask, var,
                               static_cast<long long>(static_cast<unsigned>(lane_mask)), width,
                               {"__shfl_xor_sync()", file, line});
}

inline unsigned __ballot_sync(unsigned mask, int pred, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
  return simt::detail::vote(simt::detail::WarpOp::kVote, mask, pred, nullptr, 0,
                            {"__ballot_sync()", file, line})
      .out_bits;
}
inline int __any_sync(unsigned mask, int pred, const char* file = __builtin_FILE(),
                      int line = __builtin_LINE()) {
  return simt::detail::vote(simt::detail::WarpOp::kVote, mask, pred, nullptr, 0,
                            {"__any_sync()", file, line})
             .out_bits != 0;
}
inline int __all_sync(unsigned mask, int pred, const char* file = __builtin_FILE(),
                      int line = __builtin_LINE()) {
  const simt::detail::Fiber& f = simt::detail::vote(simt::detail::WarpOp::kVote, mask, pred,
                                                    nullptr, 0, {"__all_sync()", file, line});
  return f.out_bits == uint32_t(f.pred);  // pred holds the group's lanes after the vote
}
inline int __uni_sync(unsigned mask, int pred, const char* file = __builtin_FILE(),
                      int line = __builtin_LINE()) {
  const simt::detail::Fiber& f = simt::detail::vote(simt::detail::WarpOp::kVote, mask, pred,
                                                    nullptr, 0, {"__uni_sync()", file, line});
  return f.out_bits == 0 || f.out_bits == uint32_t(f.pred);
}
inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(),
                       int line = __builtin_LINE()) {
  simt::detail::vote(simt::detail::WarpOp::kSync, mask, 0, nullptr, 0,
                     {"__syncwarp()", file, line});
}
// The lanes of the calling warp that reach this same __activemask() call together: the call
// waits until no thread of the block can run, then groups the lanes waiting in it.
inline unsigned __activemask(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return simt::detail::active("__activemask").active_mask({"__activemask()", file, line});
}
template <class T>
inline unsigned __match_any_sync(unsigned mask, T value, const char* file = __builtin_FILE(),
                                 int line = __builtin_LINE()) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "__match_any_sync takes 32- or 64-bit values");
  return simt::detail::vote(simt::detail::WarpOp::kMatchAny, mask, 0, &value, sizeof(T),
                            {"__match_any_sync()", file, line})
      .out_bits;
}
template <class T>
inline unsigned __match_all_sync(unsigned mask, T value, int* pred,
                                 const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "__match_all_sync takes 32- or 64-bit values");
  const simt::detail::Fiber& f =
      simt::detail::vote(simt::detail::WarpOp::kMatchAll, mask, 0, &value, sizeof(T),
                         {"__match_all_sync()", file, line});
  *pred = f.pred;
  return f.out_bits;
}

#define SIMT_WARP_REDUCE(name, T, op)                                                     \
  inline T name(unsigned mask, T value, const char* file = __builtin_FILE(),              \
                int line = __builtin_LINE()) {                                            \
    return T(simt::detail::warp_reduce(simt::detail::ReduceOp::op, mask, uint32_t(value), \
                                       {#name "()", file, line}));                        \
  }
SIMT_WARP_REDUCE(__reduce_add_sync, unsigned, kAddU)
SIMT_WARP_REDUCE(__reduce_add_sync, int, kAddS)
SIMT_WARP_REDUCE(__reduce_min_sync, unsigned, kMinU)
SIMT_WARP_REDUCE(__reduce_min_sync, int, kMinS)
SIMT_WARP_REDUCE(__reduce_max_sync, unsigned, kMaxU)
SIMT_WARP_REDUCE(__reduce_max_sync, int, kMaxS)
SIMT_WARP_REDUCE(__reduce_and_sync, unsigned, kAnd)
SIMT_WARP_REDUCE(__reduce_or_sync, unsigned, kOr)
SIMT_WARP_REDUCE(__reduce_xor_sync, unsigned, kXor)
#undef SIMT_WARP_REDUCE

// ---- runtime API subset ----
inline cudaError_t cudaGetLastError() {
  simt::detail::ErrorState& s = simt::detail::error_state();
  const cudaError_t e = s.last;
  s.last = cudaSuccess;
  return e;
}
inline cudaError_t cudaPeekAtLastError() { return simt::detail::error_state().last; }

// The detailed message of this host thread's last failed launch when `e` is its code (valid until
// the next failing launch on the thread), else CUDA's fixed text.
inline const char* cudaGetErrorString(cudaError_t e) {
  const simt::detail::ErrorState& s = simt::detail::error_state();
  if (e != cudaSuccess && e == s.detail_code && !s.detail.empty()) return s.detail.c_str();
  return simt::detail::error_text(e);
}
inline const char* cudaGetErrorName(cudaError_t e) { return simt::detail::error_name(e); }

inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaSetDevice(int device) {
  return device == 0 ? cudaSuccess : cudaErrorInvalidValue;
}
inline cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}

// The emulated device: sm_90-like limits.
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return cudaErrorInvalidValue;
  const simt::Config c = simt::get_config();
  switch (attr) {
    case cudaDevAttrMaxThreadsPerBlock:
      *value = 1024;
      break;
    case cudaDevAttrMaxBlockDimX:
      *value = 1024;
      break;
    case cudaDevAttrMaxBlockDimY:
      *value = 1024;
      break;
    case cudaDevAttrMaxBlockDimZ:
      *value = 64;
      break;
    case cudaDevAttrMaxGridDimX:
      *value = 0x7fffffff;
      break;
    case cudaDevAttrMaxGridDimY:
      *value = 65535;
      break;
    case cudaDevAttrMaxGridDimZ:
      *value = 65535;
      break;
    case cudaDevAttrMaxSharedMemoryPerBlock:
      *value = int(c.default_dynamic_smem);
      break;
    case cudaDevAttrWarpSize:
      *value = 32;
      break;
    case cudaDevAttrMultiProcessorCount:
      *value = c.num_sms;
      break;
    case cudaDevAttrComputeCapabilityMajor:
      *value = 9;
      break;
    case cudaDevAttrComputeCapabilityMinor:
      *value = 0;
      break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor:
      *value = 233472;
      break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = int(c.max_dynamic_smem);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

// Raises a kernel's dynamic shared memory limit (above 48 KB needs this on a GPU too).
template <class... Params>
inline cudaError_t cudaFuncSetAttribute(void (*kernel)(Params...), cudaFuncAttribute attr,
                                        int value) {
  if (attr == cudaFuncAttributePreferredSharedMemoryCarveout) return cudaSuccess;
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      size_t(value) > simt::get_config().max_dynamic_smem) {
    simt::detail::record_error(cudaErrorInvalidValue,
                               simt::detail::cat("simt: cudaFuncSetAttribute: ", value,
                                                 " bytes exceed the opt-in shared memory limit"));
    return cudaErrorInvalidValue;
  }
  simt::detail::FuncAttributes& a = simt::detail::func_attributes();
  std::lock_guard<std::mutex> lock(a.mu);
  a.max_dynamic_smem[reinterpret_cast<uintptr_t>(kernel)] = size_t(value);
  return cudaSuccess;
}

// Memory: device memory is host memory.
inline cudaError_t cudaMalloc(void** p, size_t bytes) {
  *p = std::aligned_alloc(256, (std::max<size_t>(bytes, 1) + 255) / 256 * 256);
  return *p == nullptr ? cudaErrorMemoryAllocation : cudaSuccess;
}
template <class T>
inline cudaError_t cudaMalloc(T** p, size_t bytes) {
  void* v = nullptr;
  const cudaError_t e = cudaMalloc(&v, bytes);
  *p = static_cast<T*>(v);
  return e;
}
inline cudaError_t cudaFree(void* p) {
  std::free(p);
  return cudaSuccess;
}
inline cudaError_t cudaMemset(void* p, int value, size_t bytes) {
  std::memset(p, value, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t = nullptr) {
  std::memset(p, value, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind) {
  std::memmove(dst, src, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind,
                                   cudaStream_t = nullptr) {
  std::memmove(dst, src, bytes);
  return cudaSuccess;
}
template <class T>
inline cudaError_t cudaMemcpyToSymbol(const T& symbol, const void* src, size_t bytes,
                                      size_t offset = 0, cudaMemcpyKind = cudaMemcpyHostToDevice) {
  std::memcpy(reinterpret_cast<char*>(const_cast<T*>(&symbol)) + offset, src, bytes);
  return cudaSuccess;
}
