// Tensor checks, output allocation and params for block_chunk_schedule, shared by the CPU, emulator
// and CUDA glue (the Python op has already validated; these checks guard direct callers of
// vlm_kernels._C).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "cuda/block_chunk_schedule.h"

namespace vlmk {

inline std::tuple<at::Tensor, at::Tensor, BlockChunkScheduleParams> prepare_block_chunk_schedule(
    const at::Tensor& media_mask, int64_t block_q) {
  TORCH_CHECK(media_mask.dim() == 3, "media_mask must be [B, Lq, M], got shape ",
              media_mask.sizes());
  TORCH_CHECK(media_mask.scalar_type() == at::kBool, "media_mask must be bool, got ",
              media_mask.scalar_type());
  TORCH_CHECK(block_q >= 1, "block_q must be >= 1, got ", block_q);
  const int64_t batch = media_mask.size(0), query_len = media_mask.size(1);
  const int64_t num_chunks = media_mask.size(2);
  const int64_t num_blocks = (query_len + block_q - 1) / block_q;
  const auto int_options = media_mask.options().dtype(at::kInt);
  at::Tensor chunk_count = at::empty({batch, num_blocks}, int_options);
  at::Tensor chunk_ids = at::empty({batch, num_blocks, num_chunks}, int_options);
  BlockChunkScheduleParams params{};
  params.media_mask = reinterpret_cast<const uint8_t*>(media_mask.data_ptr<bool>());
  params.chunk_count = chunk_count.data_ptr<int32_t>();
  params.chunk_ids = chunk_ids.data_ptr<int32_t>();
  params.mask_stride_batch = media_mask.stride(0);
  params.mask_stride_query = media_mask.stride(1);
  params.mask_stride_chunk = media_mask.stride(2);
  params.batch = batch;
  params.query_len = query_len;
  params.num_chunks = num_chunks;
  params.block_q = block_q;
  params.num_query_blocks = num_blocks;
  return {chunk_count, chunk_ids, params};
}

}  // namespace vlmk
