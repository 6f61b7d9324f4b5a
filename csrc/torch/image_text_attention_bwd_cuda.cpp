// Torch glue of the image_text_attention backward CUDA kernels on CUDA tensors (compiled only in
// the CUDA build).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include "torch/image_text_attention_bwd_gpu.h"

namespace vlmk {

std::tuple<at::Tensor, at::Tensor, at::Tensor> image_text_attention_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& media_mask, const at::Tensor& out, const at::Tensor& lse, int64_t media_len,
    double scale, bool uniform) {
  TORCH_CHECK(q.is_cuda(), "the cuda backend needs CUDA tensors, got q on ", q.device());
  const c10::cuda::CUDAGuard device_guard(q.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  ImageTextAttentionBwdLaunch launch =
      prepare_image_text_attention_bwd(grad_out, q, k, v, media_mask, out, lse, media_len, scale,
                                       uniform, [stream](const BlockChunkScheduleParams& params) {
                                         return cuda::launch_block_chunk_schedule(params, stream);
                                       });
  if (!launch.done) {
    const int status = cuda::launch_image_text_attention_bwd(launch.params, stream);
    TORCH_CHECK(status == 0, "image_text_attention backward launch failed: ",
                cudaGetErrorString(static_cast<cudaError_t>(status)));
  }
  return {launch.dq, launch.dk, launch.dv};
}

}  // namespace vlmk
