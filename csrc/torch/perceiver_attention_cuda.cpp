// Torch glue of the perceiver_attention CUDA kernels on CUDA tensors (compiled only in the CUDA
// build).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include "torch/perceiver_attention_gpu.h"

namespace vlmk {

std::tuple<at::Tensor, at::Tensor> perceiver_attention_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k_media, const at::Tensor& v_media,
    const at::Tensor& k_latents, const at::Tensor& v_latents,
    const std::optional<at::Tensor>& media_padding_mask, double scale) {
  TORCH_CHECK(q.is_cuda(), "the cuda backend needs CUDA tensors, got q on ", q.device());
  const c10::cuda::CUDAGuard device_guard(q.device());
  PerceiverAttentionLaunch l = prepare_perceiver_attention(q, k_media, v_media, k_latents,
                                                           v_latents, media_padding_mask, scale);
  if (l.launch) {
    const int status =
        cuda::launch_perceiver_attention_fwd(l.params, c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(status == 0, "perceiver_attention launch failed: ",
                cudaGetErrorString(static_cast<cudaError_t>(status)));
  }
  return {l.out, l.lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> perceiver_attention_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k_media,
    const at::Tensor& v_media, const at::Tensor& k_latents, const at::Tensor& v_latents,
    const std::optional<at::Tensor>& media_padding_mask, const at::Tensor& out,
    const at::Tensor& lse, double scale) {
  TORCH_CHECK(q.is_cuda(), "the cuda backend needs CUDA tensors, got q on ", q.device());
  const c10::cuda::CUDAGuard device_guard(q.device());
  PerceiverAttentionBwdLaunch l = prepare_perceiver_attention_bwd(
      grad_out, q, k_media, v_media, k_latents, v_latents, media_padding_mask, out, lse, scale);
  if (l.launch) {
    const int status =
        cuda::launch_perceiver_attention_bwd(l.params, c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(status == 0, "perceiver_attention backward launch failed: ",
                cudaGetErrorString(static_cast<cudaError_t>(status)));
  }
  return {l.dq, l.dk_media, l.dv_media, l.dk_latents, l.dv_latents};
}

}  // namespace vlmk
