// block_chunk_schedule on the CPU (semantics in cuda/block_chunk_schedule.h): one task per
// (batch, query block), parallel over them with at::parallel_for.
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "cpu/kernels.h"

namespace vlmk {
namespace cpu {

void block_chunk_schedule(const BlockChunkScheduleParams& p) {
  const int64_t blocks = p.batch * p.num_query_blocks;
  // Each task reads block_q * M mask bytes; group enough tasks that a thread gets ~32 KB of work.
  const int64_t grain =
      std::max<int64_t>(1, 32768 / std::max<int64_t>(1, p.block_q * p.num_chunks));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> visible(static_cast<size_t>(p.num_chunks));
    for (int64_t block = begin; block < end; ++block) {
      const int64_t batch_index = block / p.num_query_blocks;
      const int64_t row_begin = (block % p.num_query_blocks) * p.block_q;
      const int64_t row_end = std::min(row_begin + p.block_q, p.query_len);
      std::fill(visible.begin(), visible.end(), 0);
      for (int64_t row = row_begin; row < row_end; ++row) {
        const uint8_t* mask_row =
            p.media_mask + batch_index * p.mask_stride_batch + row * p.mask_stride_query;
        for (int64_t chunk = 0; chunk < p.num_chunks; ++chunk) {
          visible[chunk] |= mask_row[chunk * p.mask_stride_chunk];
        }
      }
      int32_t* ids = p.chunk_ids + block * p.num_chunks;
      int32_t count = 0;
      for (int64_t chunk = 0; chunk < p.num_chunks; ++chunk) {
        if (visible[chunk]) ids[count++] = static_cast<int32_t>(chunk);
      }
      std::fill(ids + count, ids + p.num_chunks, -1);
      p.chunk_count[block] = count;
    }
  });
}

}  // namespace cpu
}  // namespace vlmk
