// cuda_compat.cuh — the one portability header that kernel sources include.
//
// The same .cu source builds two ways:
//   nvcc                      -> a real CUDA kernel;
//   g++ -DVLMK_SIMT -I csrc   -> host C++ run by the SIMT emulator (csrc/simt/simt.h), the
//                                `cuda_sim` backend that tests kernels on machines without a GPU.
//
// What kernel code uses from here, in both modes:
//   VLMK_LAUNCH(kernel, grid, block, smem_bytes, stream, args...)
//       An expression of type cudaError_t: launches and returns cudaGetLastError() (so the error
//       is also cleared). Under nvcc the launch is asynchronous on `stream`; under the emulator it
//       runs to completion before returning (`stream` is evaluated and ignored). `kernel` must
//       not contain a top-level comma: write a template instance in parentheses,
//       VLMK_LAUNCH((my_kernel<float, 64>), grid, block, smem, stream, args...).
//   VLMK_DYNAMIC_SMEM(T, name);
//       Declares `T* name` pointing at the block's dynamic shared memory (16-byte aligned).
//       Under the emulator it is filled with 0xff bytes at the start of each block.
//   VLMK_SHARED(T, name);
//       `__shared__ T name;` (T may be an array type, e.g. float[64]; no top-level comma). Under
//       the emulator the variable lives in the block's shared arena, is filled with 0xff bytes
//       at block start and is seen by the race checker; a plain `__shared__` variable is a
//       thread_local there, neither poisoned nor checked.
//   vlmk::ld_shared(ptr), vlmk::st_shared(ptr, value)
//       A load / store of shared memory. Under nvcc exactly `*ptr` / `*ptr = value`; under the
//       emulator the race checker (SIMT_RACECHECK=1) sees them. Kernels access shared memory
//       through these so that a missing barrier is reported, not just maybe visible in a result.
//   VLMK_HOST_DEVICE  = __host__ __device__
//   VLMK_SIMT         defined when compiled by the emulator (guard inline PTX and arch-specific
//                     paths with `#if !defined(VLMK_SIMT)`).
//   CUDA's own names for 16-bit floats work in both modes: __half, __nv_bfloat16, __half2,
//   __nv_bfloat162, __float2half, __half2float, __float2bfloat16, __bfloat162float, ...
//   (under the emulator from simt/half.h, which needs no CUDA toolkit).
#pragma once

#if defined(VLMK_SIMT)

#include "simt/simt.h"

#define VLMK_LAUNCH(kernel, grid, block, smem_bytes, stream, ...)                       \
  ((void)(stream),                                                                      \
   ::simt::launch_named(#kernel, kernel, (grid), (block), (smem_bytes), ##__VA_ARGS__), \
   ::cudaGetLastError())

#define VLMK_DYNAMIC_SMEM(T, name) T* name = ::simt::dynamic_shared<T>()

// The tag's address identifies the declaration (one per function, or template instance, like a
// __shared__ variable).
#define VLMK_SHARED(T, name)                \
  [[maybe_unused]] static char name##_tag_; \
  ::vlmk::shared_type<T>& name = *::simt::static_shared<::vlmk::shared_type<T>>(&name##_tag_, #name)

namespace vlmk {
template <class T>
using shared_type = T;  // lets VLMK_SHARED take array types
template <class T>
inline T ld_shared(const T* p, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return ::simt::shared_load(p, file, line);
}
template <class T>
inline void st_shared(T* p, const typename std::enable_if<true, T>::type& value,
                      const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::simt::shared_store(p, value, file, line);
}
}  // namespace vlmk

#else  // nvcc

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>

// Unformatted: clang-format would split the launch chevrons into `< < <`.
// clang-format off
#define VLMK_LAUNCH(kernel, grid, block, smem_bytes, stream, ...) \
  ((kernel)<<<(grid), (block), (smem_bytes), (stream)>>>(__VA_ARGS__), ::cudaGetLastError())
// clang-format on

#define VLMK_DYNAMIC_SMEM(T, name)                                    \
  extern __shared__ __align__(16) unsigned char vlmk_dynamic_smem_[]; \
  T* name = reinterpret_cast<T*>(vlmk_dynamic_smem_)

#define VLMK_SHARED(T, name) __shared__::vlmk::shared_type<T> name

namespace vlmk {
template <class T>
using shared_type = T;  // lets VLMK_SHARED take array types
template <class T>
__device__ __forceinline__ T ld_shared(const T* p) {
  return *p;
}
template <class T>
__device__ __forceinline__ void st_shared(T* p,
                                          const typename std::enable_if<true, T>::type& value) {
  *p = value;
}
}  // namespace vlmk

#endif  // VLMK_SIMT

#define VLMK_HOST_DEVICE __host__ __device__
