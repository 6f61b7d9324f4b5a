// Torch-facing entry points of the extension, bound to Python in bindings.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace vlmk {

// block_chunk_schedule(media_mask [B, Lq, M] bool, block_q) -> (chunk_count [B, nQB], chunk_ids [B,
// nQB, M])
std::tuple<at::Tensor, at::Tensor> block_chunk_schedule_cpu(const at::Tensor& media_mask,
                                                            int64_t block_q);
std::tuple<at::Tensor, at::Tensor> block_chunk_schedule_cuda_sim(const at::Tensor& media_mask,
                                                                 int64_t block_q);
#if defined(VLMK_WITH_CUDA)
std::tuple<at::Tensor, at::Tensor> block_chunk_schedule_cuda(const at::Tensor& media_mask,
                                                             int64_t block_q);
#endif

}  // namespace vlmk
