// Torch glue of the image_text_attention CUDA kernels on CUDA tensors (compiled only in the CUDA
// build).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include "torch/image_text_attention_gpu.h"

namespace vlmk {

std::tuple<at::Tensor, at::Tensor> image_text_attention_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& media_mask,
    int64_t media_len, double scale, bool uniform) {
  TORCH_CHECK(q.is_cuda(), "the cuda backend needs CUDA tensors, got q on ", q.device());
  const c10::cuda::CUDAGuard device_guard(q.device());
  int num_sms = 0;
  const cudaError_t attribute_status =
      cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, q.device().index());
  TORCH_CHECK(attribute_status == cudaSuccess, "image_text_attention: cudaDeviceGetAttribute: ",
              cudaGetErrorString(attribute_status));
  ImageTextAttentionLaunch launch =
      prepare_image_text_attention(q, k, v, media_mask, media_len, scale, uniform, num_sms);
  const int status = cuda::launch_image_text_attention_fwd(
      launch.params, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(status == 0, "image_text_attention launch failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(status)));
  return {launch.out, launch.lse};
}

}  // namespace vlmk
