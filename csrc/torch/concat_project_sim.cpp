// Torch glue of the concat_project CUDA kernels run by the SIMT emulator (cuda_sim backend).
#include "torch/concat_project_gpu.h"

namespace vlmk {

namespace {
// The multiprocessor count the emulated device reports (sm_90-like); it sizes the dW splits.
constexpr int kEmulatedMultiprocessors = 132;
}  // namespace

at::Tensor concat_project_fwd_cuda_sim(const std::vector<at::Tensor>& features,
                                       const at::Tensor& weight,
                                       const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(weight.device().is_cpu(), "the cuda_sim backend needs CPU tensors, got weight on ",
              weight.device());
  return concat_project_forward(
      features, weight, bias,
      [](const ConcatProjectParams& p) { return sim::launch_concat_project_fwd(p, nullptr); },
      sim::concat_project_error_string);
}

ConcatProjectGrads concat_project_bwd_cuda_sim(const at::Tensor& grad_out,
                                               const std::vector<at::Tensor>& features,
                                               const at::Tensor& weight) {
  TORCH_CHECK(weight.device().is_cpu(), "the cuda_sim backend needs CPU tensors, got weight on ",
              weight.device());
  return concat_project_backward(
      grad_out, features, weight, kEmulatedMultiprocessors,
      [](const ConcatProjectBwdParams& p) { return sim::launch_concat_project_bwd(p, nullptr); },
      sim::concat_project_error_string);
}

}  // namespace vlmk
