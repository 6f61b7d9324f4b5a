// Torch glue for block_chunk_schedule: the CPU kernel and the CUDA kernel run by the SIMT emulator.
#include "cpu/kernels.h"
#include "torch/block_chunk_schedule_glue.h"
#include "torch/ops.h"

namespace vlmk {

std::tuple<at::Tensor, at::Tensor> block_chunk_schedule_cpu(const at::Tensor& media_mask,
                                                            int64_t block_q) {
  TORCH_CHECK(media_mask.device().is_cpu(), "the cpu backend needs CPU tensors, got media_mask on ",
              media_mask.device());
  auto [chunk_count, chunk_ids, params] = prepare_block_chunk_schedule(media_mask, block_q);
  cpu::block_chunk_schedule(params);
  return {chunk_count, chunk_ids};
}

std::tuple<at::Tensor, at::Tensor> block_chunk_schedule_cuda_sim(const at::Tensor& media_mask,
                                                                 int64_t block_q) {
  TORCH_CHECK(media_mask.device().is_cpu(),
              "the cuda_sim backend needs CPU tensors, got media_mask on ", media_mask.device());
  auto [chunk_count, chunk_ids, params] = prepare_block_chunk_schedule(media_mask, block_q);
  const int status = sim::launch_block_chunk_schedule(params, nullptr);
  TORCH_CHECK(status == 0, "block_chunk_schedule (SIMT emulator) failed with CUDA error ", status);
  return {chunk_count, chunk_ids};
}

}  // namespace vlmk
