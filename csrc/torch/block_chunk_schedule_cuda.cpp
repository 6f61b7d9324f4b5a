// Torch glue for block_chunk_schedule on CUDA tensors (compiled only in the CUDA build).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include "torch/block_chunk_schedule_glue.h"
#include "torch/ops.h"

namespace vlmk {

std::tuple<at::Tensor, at::Tensor> block_chunk_schedule_cuda(const at::Tensor& media_mask,
                                                             int64_t block_q) {
  TORCH_CHECK(media_mask.is_cuda(), "the cuda backend needs CUDA tensors, got media_mask on ",
              media_mask.device());
  const c10::cuda::CUDAGuard device_guard(media_mask.device());
  auto [chunk_count, chunk_ids, params] = prepare_block_chunk_schedule(media_mask, block_q);
  const int status =
      cuda::launch_block_chunk_schedule(params, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(status == 0, "block_chunk_schedule launch failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(status)));
  return {chunk_count, chunk_ids};
}

}  // namespace vlmk
