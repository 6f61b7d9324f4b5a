// Torch glue of the image_text_attention CUDA kernels run by the SIMT emulator (cuda_sim backend).
#include "torch/image_text_attention_gpu.h"

namespace vlmk {

namespace {
// The multiprocessor count the emulated device reports (sm_90-like); it sizes the decode splits.
constexpr int kEmulatedMultiprocessors = 132;
}  // namespace

std::tuple<at::Tensor, at::Tensor> image_text_attention_fwd_cuda_sim(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& media_mask,
    int64_t media_len, double scale, bool uniform) {
  TORCH_CHECK(q.device().is_cpu(), "the cuda_sim backend needs CPU tensors, got q on ", q.device());
  ImageTextAttentionLaunch launch = prepare_image_text_attention(
      q, k, v, media_mask, media_len, scale, uniform, kEmulatedMultiprocessors);
  const int status = sim::launch_image_text_attention_fwd(launch.params, nullptr);
  TORCH_CHECK(status == 0, "image_text_attention (SIMT emulator) failed: ",
              sim::image_text_attention_error_string(status));
  return {launch.out, launch.lse};
}

}  // namespace vlmk
