// Torch glue of the patch_embed CUDA kernels run by the SIMT emulator (cuda_sim backend).
#include "torch/patch_embed_gpu.h"

namespace vlmk {

namespace {
// The multiprocessor count the emulated device reports (sm_90-like); it sizes the dW splits.
constexpr int kEmulatedMultiprocessors = 132;
}  // namespace

at::Tensor patch_embed_fwd_cuda_sim(const at::Tensor& pixels, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias,
                                    const std::optional<at::Tensor>& cls_token,
                                    const std::optional<at::Tensor>& pos_embed,
                                    const std::optional<at::Tensor>& pixel_mean,
                                    const std::optional<at::Tensor>& pixel_std) {
  TORCH_CHECK(weight.device().is_cpu(), "the cuda_sim backend needs CPU tensors, got weight on ",
              weight.device());
  PatchEmbedLaunch launch =
      prepare_patch_embed(pixels, weight, bias, cls_token, pos_embed, pixel_mean, pixel_std);
  const int status = sim::launch_patch_embed_fwd(launch.params, nullptr);
  TORCH_CHECK(status == 0,
              "patch_embed (SIMT emulator) failed: ", sim::patch_embed_error_string(status));
  return launch.out;
}

PatchEmbedGrads patch_embed_bwd_cuda_sim(const at::Tensor& grad_out, const at::Tensor& pixels,
                                         const at::Tensor& weight,
                                         const std::optional<at::Tensor>& pixel_mean,
                                         const std::optional<at::Tensor>& pixel_std, bool has_cls,
                                         bool need_pixels_grad) {
  TORCH_CHECK(weight.device().is_cpu(), "the cuda_sim backend needs CPU tensors, got weight on ",
              weight.device());
  PatchEmbedBwdLaunch launch =
      prepare_patch_embed_bwd(grad_out, pixels, weight, pixel_mean, pixel_std, has_cls,
                              need_pixels_grad, kEmulatedMultiprocessors);
  if (!launch.done) {
    const int status = sim::launch_patch_embed_bwd(launch.params, nullptr);
    TORCH_CHECK(status == 0, "patch_embed backward (SIMT emulator) failed: ",
                sim::patch_embed_error_string(status));
  }
  return patch_embed_grads(launch, has_cls);
}

}  // namespace vlmk
