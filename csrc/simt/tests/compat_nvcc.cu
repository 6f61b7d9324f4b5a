// Compiled (not run) by nvcc when the build finds it: the CUDA side of common/cuda_compat.cuh.
#include "simt/tests/compat_kernels.cuh"

cudaError_t compat_launch_all(const float* in, float* out, int n, cudaStream_t stream) {
  cudaError_t e = compat::launch_scaled_reverse(in, out, n, stream);
  if (e == cudaSuccess) e = compat::launch_sixteen_bit(in, out, stream);
  if (e == cudaSuccess) e = compat::launch_no_arguments(stream);
  return e;
}
