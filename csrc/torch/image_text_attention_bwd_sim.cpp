// Torch glue of the image_text_attention backward CUDA kernels run by the SIMT emulator
// (cuda_sim backend).
#include "torch/image_text_attention_bwd_gpu.h"

namespace vlmk {

std::tuple<at::Tensor, at::Tensor, at::Tensor> image_text_attention_bwd_cuda_sim(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& media_mask, const at::Tensor& out, const at::Tensor& lse, int64_t media_len,
    double scale, bool uniform) {
  TORCH_CHECK(q.device().is_cpu(), "the cuda_sim backend needs CPU tensors, got q on ", q.device());
  ImageTextAttentionBwdLaunch launch =
      prepare_image_text_attention_bwd(grad_out, q, k, v, media_mask, out, lse, media_len, scale,
                                       uniform, [](const BlockChunkScheduleParams& params) {
                                         return sim::launch_block_chunk_schedule(params, nullptr);
                                       });
  if (!launch.done) {
    const int status = sim::launch_image_text_attention_bwd(launch.params, nullptr);
    TORCH_CHECK(status == 0, "image_text_attention backward (SIMT emulator) failed: ",
                sim::image_text_attention_bwd_error_string(status));
  }
  return {launch.dq, launch.dk, launch.dv};
}

}  // namespace vlmk
