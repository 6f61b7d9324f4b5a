// Torch glue of the perceiver_attention CUDA kernels run by the SIMT emulator (cuda_sim backend).
#include "torch/perceiver_attention_gpu.h"

namespace vlmk {

std::tuple<at::Tensor, at::Tensor> perceiver_attention_fwd_cuda_sim(
    const at::Tensor& q, const at::Tensor& k_media, const at::Tensor& v_media,
    const at::Tensor& k_latents, const at::Tensor& v_latents,
    const std::optional<at::Tensor>& media_padding_mask, double scale) {
  TORCH_CHECK(q.device().is_cpu(), "the cuda_sim backend needs CPU tensors, got q on ", q.device());
  PerceiverAttentionLaunch l = prepare_perceiver_attention(q, k_media, v_media, k_latents,
                                                           v_latents, media_padding_mask, scale);
  if (l.launch) {
    const int status = sim::launch_perceiver_attention_fwd(l.params, nullptr);
    TORCH_CHECK(status == 0, "perceiver_attention (SIMT emulator) failed: ",
                sim::perceiver_attention_error_string(status));
  }
  return {l.out, l.lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
perceiver_attention_bwd_cuda_sim(const at::Tensor& grad_out, const at::Tensor& q,
                                 const at::Tensor& k_media, const at::Tensor& v_media,
                                 const at::Tensor& k_latents, const at::Tensor& v_latents,
                                 const std::optional<at::Tensor>& media_padding_mask,
                                 const at::Tensor& out, const at::Tensor& lse, double scale) {
  TORCH_CHECK(q.device().is_cpu(), "the cuda_sim backend needs CPU tensors, got q on ", q.device());
  PerceiverAttentionBwdLaunch l = prepare_perceiver_attention_bwd(
      grad_out, q, k_media, v_media, k_latents, v_latents, media_padding_mask, out, lse, scale);
  if (l.launch) {
    const int status = sim::launch_perceiver_attention_bwd(l.params, nullptr);
    TORCH_CHECK(status == 0, "perceiver_attention backward (SIMT emulator) failed: ",
                sim::perceiver_attention_error_string(status));
  }
  return {l.dq, l.dk_media, l.dv_media, l.dk_latents, l.dv_latents};
}

}  // namespace vlmk
