// Torch glue of the patch_embed CUDA kernels on CUDA tensors (compiled only in the CUDA build).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include "torch/patch_embed_gpu.h"

namespace vlmk {

at::Tensor patch_embed_fwd_cuda(const at::Tensor& pixels, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias,
                                const std::optional<at::Tensor>& cls_token,
                                const std::optional<at::Tensor>& pos_embed,
                                const std::optional<at::Tensor>& pixel_mean,
                                const std::optional<at::Tensor>& pixel_std) {
  TORCH_CHECK(weight.is_cuda(), "the cuda backend needs CUDA tensors, got weight on ",
              weight.device());
  const c10::cuda::CUDAGuard device_guard(weight.device());
  PatchEmbedLaunch launch =
      prepare_patch_embed(pixels, weight, bias, cls_token, pos_embed, pixel_mean, pixel_std);
  const int status =
      cuda::launch_patch_embed_fwd(launch.params, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(status == 0,
              "patch_embed launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(status)));
  return launch.out;
}

PatchEmbedGrads patch_embed_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& pixels,
                                     const at::Tensor& weight,
                                     const std::optional<at::Tensor>& pixel_mean,
                                     const std::optional<at::Tensor>& pixel_std, bool has_cls,
                                     bool need_pixels_grad) {
  TORCH_CHECK(weight.is_cuda(), "the cuda backend needs CUDA tensors, got weight on ",
              weight.device());
  const c10::cuda::CUDAGuard device_guard(weight.device());
  int num_sms = 0;
  const cudaError_t attribute_status =
      cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, weight.device().index());
  TORCH_CHECK(attribute_status == cudaSuccess, "patch_embed backward: cudaDeviceGetAttribute: ",
              cudaGetErrorString(attribute_status));
  PatchEmbedBwdLaunch launch = prepare_patch_embed_bwd(
      grad_out, pixels, weight, pixel_mean, pixel_std, has_cls, need_pixels_grad, num_sms);
  if (!launch.done) {
    const int status =
        cuda::launch_patch_embed_bwd(launch.params, c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(status == 0, "patch_embed backward launch failed: ",
                cudaGetErrorString(static_cast<cudaError_t>(status)));
  }
  return patch_embed_grads(launch, has_cls);
}

}  // namespace vlmk
