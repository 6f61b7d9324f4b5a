// block_chunk_schedule: the media chunks each block of `block_q` query rows must visit.
//
//   media_mask [B, Lq, M] bool  ->  chunk_count [B, nQB] int32, chunk_ids [B, nQB, M] int32
//   chunk_ids[b, qb, :chunk_count[b, qb]] = ascending chunks m with media_mask[b, t, m] for some t
//   in [qb * block_q, min(Lq, (qb + 1) * block_q)); the remaining entries are -1.
//
// Torch-free declarations shared by the CUDA build, the SIMT-emulated build (cuda_sim) and the
// torch glue. The kernel and its launcher live in block_chunk_schedule.cu.
#pragma once

#include <cstdint>

namespace vlmk {

struct BlockChunkScheduleParams {
  const uint8_t* media_mask;  // [B, Lq, M], bool stored as one byte
  int32_t* chunk_count;       // [B, nQB], contiguous
  int32_t* chunk_ids;         // [B, nQB, M], contiguous
  int64_t mask_stride_batch;  // element strides of media_mask
  int64_t mask_stride_query;
  int64_t mask_stride_chunk;
  int64_t batch;             // B
  int64_t query_len;         // Lq
  int64_t num_chunks;        // M
  int64_t block_q;           // query rows per block
  int64_t num_query_blocks;  // nQB = ceil(Lq / block_q)
};

// Each returns 0 on success, else a cudaError_t value (the emulator uses the same codes).
namespace cuda {
int launch_block_chunk_schedule(const BlockChunkScheduleParams& params, void* stream);
}  // namespace cuda
namespace sim {
int launch_block_chunk_schedule(const BlockChunkScheduleParams& params, void* stream);
}  // namespace sim

}  // namespace vlmk
