// Torch glue of the concat_project CUDA kernels on CUDA tensors (compiled only in the CUDA build).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include "torch/concat_project_gpu.h"

namespace vlmk {

namespace {
const char* cuda_error(int status) { return cudaGetErrorString(static_cast<cudaError_t>(status)); }
}  // namespace

at::Tensor concat_project_fwd_cuda(const std::vector<at::Tensor>& features,
                                   const at::Tensor& weight,
                                   const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(weight.is_cuda(), "the cuda backend needs CUDA tensors, got weight on ",
              weight.device());
  const c10::cuda::CUDAGuard device_guard(weight.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  return concat_project_forward(
      features, weight, bias,
      [&](const ConcatProjectParams& p) { return cuda::launch_concat_project_fwd(p, stream); },
      cuda_error);
}

ConcatProjectGrads concat_project_bwd_cuda(const at::Tensor& grad_out,
                                           const std::vector<at::Tensor>& features,
                                           const at::Tensor& weight) {
  TORCH_CHECK(weight.is_cuda(), "the cuda backend needs CUDA tensors, got weight on ",
              weight.device());
  const c10::cuda::CUDAGuard device_guard(weight.device());
  int num_sms = 0;
  const cudaError_t attribute_status =
      cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, weight.device().index());
  TORCH_CHECK(attribute_status == cudaSuccess, "concat_project backward: cudaDeviceGetAttribute: ",
              cudaGetErrorString(attribute_status));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  return concat_project_backward(
      grad_out, features, weight, num_sms,
      [&](const ConcatProjectBwdParams& p) { return cuda::launch_concat_project_bwd(p, stream); },
      cuda_error);
}

}  // namespace vlmk
