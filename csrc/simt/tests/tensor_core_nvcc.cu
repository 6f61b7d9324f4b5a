// Compiled (not run) by nvcc for sm_80 and sm_90a when the build finds it: the PTX side of
// common/tensor_core.cuh on the kernels test_tensor_core runs under the emulator. ctest
// disassembles the cubins and checks for the tensor-core instructions (HMMA, LDSM, LDGSTS).
#include "simt/tests/tensor_core_kernels.cuh"

cudaError_t tensor_core_launch_all(const uint32_t* aw, const uint32_t* bw, const float* a,
                                   const float* b, const float* c, float* d, uint32_t* u,
                                   cudaStream_t stream) {
  cudaError_t e = VLMK_LAUNCH((tck::mma_m16n8k16_kernel<true, tck::kBKMajor, tck::kNoFault>), 1, 32,
                              0, stream, aw, bw, c, d);
  if (e == cudaSuccess) {
    e = VLMK_LAUNCH((tck::mma_m16n8k16_kernel<false, tck::kBNMajor, tck::kNoFault>), 1, 32, 0,
                    stream, aw, bw, c, d);
  }
  if (e == cudaSuccess) {
    e = VLMK_LAUNCH((tck::mma_m16n8k8_tf32_kernel<tck::kNoFault>), 1, 32, 0, stream, a, b, c, d);
  }
  if (e == cudaSuccess) {
    e = VLMK_LAUNCH((tck::ldmatrix_probe_kernel<1, false, true>), 1, 32, 0, stream, u);
  }
  if (e == cudaSuccess) {
    e = VLMK_LAUNCH((tck::ldmatrix_probe_kernel<2, true, true>), 1, 32, 0, stream, u);
  }
  if (e == cudaSuccess) {
    e = VLMK_LAUNCH((tck::ldmatrix_probe_kernel<4, true, true>), 1, 32, 0, stream, u);
  }
  if (e == cudaSuccess) {
    e = VLMK_LAUNCH((tck::cp_async_pipeline_kernel<tck::kNoFault>), 1, tck::kPipeThreads, 0, stream,
                    a, 4, d);
  }
  if (e == cudaSuccess) {
    e = VLMK_LAUNCH(tck::cp_async_zfill_kernel, 1, tck::kPipeThreads, 0, stream, a, d);
  }
  return e;
}
