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

#else  // nvcc

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

// Unformatted: clang-format would split the launch chevrons into `< < <`.
// clang-format off
#define VLMK_LAUNCH(kernel, grid, block, smem_bytes, stream, ...) \
  ((kernel)<<<(grid), (block), (smem_bytes), (stream)>>>(__VA_ARGS__), ::cudaGetLastError())
// clang-format on

#define VLMK_DYNAMIC_SMEM(T, name)                                    \
  extern __shared__ __align__(16) unsigned char vlmk_dynamic_smem_[]; \
  T* name = reinterpret_cast<T*>(vlmk_dynamic_smem_)

#endif  // VLMK_SIMT

#define VLMK_HOST_DEVICE __host__ __device__
