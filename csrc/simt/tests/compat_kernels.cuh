// Kernels written only against common/cuda_compat.cuh. test_compat.cpp runs them under the
// emulator; compat_nvcc.cu compiles the same source with nvcc (a build step when nvcc exists), so
// both sides of the portability header stay in step.
#pragma once

#include "common/cuda_compat.cuh"

namespace compat {

VLMK_HOST_DEVICE inline float squared(float x) { return x * x; }

// out[i] = squared(in[i]) * kScale, through dynamic shared memory, reversed within each block.
template <typename T, int kScale>
__global__ void __launch_bounds__(256)
    scaled_reverse(const T* __restrict__ in, T* __restrict__ out, int n) {
  VLMK_DYNAMIC_SMEM(float, buffer);
  const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  buffer[threadIdx.x] = i < n ? squared(static_cast<float>(in[i])) : 0.0f;
  __syncthreads();
  const int j = static_cast<int>(blockIdx.x * blockDim.x + (blockDim.x - 1 - threadIdx.x));
  if (j < n) out[j] = static_cast<T>(buffer[threadIdx.x] * kScale);
}

// Round trips through CUDA's own 16-bit names, and a warp sum of the results.
__global__ void sixteen_bit(const float* in, float* out) {
  const float x = in[threadIdx.x];
  const __half h = __float2half(x);
  const __nv_bfloat16 b = __float2bfloat16(x);
  float v = __half2float(h) + __bfloat162float(b);
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  out[threadIdx.x] = v;
}

__global__ void no_arguments() {}

inline cudaError_t launch_scaled_reverse(const float* in, float* out, int n, cudaStream_t stream) {
  const int threads = 128;
  const int blocks = (n + threads - 1) / threads;
  return VLMK_LAUNCH((scaled_reverse<float, 3>), dim3(blocks), dim3(threads),
                     threads * sizeof(float), stream, in, out, n);
}

inline cudaError_t launch_sixteen_bit(const float* in, float* out, cudaStream_t stream) {
  return VLMK_LAUNCH(sixteen_bit, 1, 32, 0, stream, in, out);
}

inline cudaError_t launch_no_arguments(cudaStream_t stream) {
  return VLMK_LAUNCH(no_arguments, 2, 2, 0, stream);
}

}  // namespace compat
