// block_chunk_schedule kernel (semantics in block_chunk_schedule.h).
//
// One thread block per (batch, query block). Threads own chunks: thread i tests chunk m0 + i over
// the block's query rows (consecutive threads read consecutive bytes of a mask row), then the block
// compacts the visible chunks in ascending order: a warp ballot gives each thread its rank inside
// its warp, the per-warp totals in shared memory give each warp its offset, and a running offset
// carries across tiles of kThreads chunks. The same source is compiled by nvcc (namespace
// vlmk::cuda) and, with VLMK_SIMT, as host C++ through the SIMT emulator (namespace vlmk::sim) for
// the cuda_sim backend; shared memory goes through ld_shared / st_shared so that the emulator's
// race checker sees it.
#include "common/cuda_compat.cuh"
#include "cuda/block_chunk_schedule.h"

#if defined(VLMK_SIMT)
#define VLMK_BCS_NAMESPACE sim
#else
#define VLMK_BCS_NAMESPACE cuda
#endif

namespace vlmk {
namespace VLMK_BCS_NAMESPACE {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;

__global__ void __launch_bounds__(kThreads)
    block_chunk_schedule_kernel(const BlockChunkScheduleParams p) {
  VLMK_SHARED(int32_t[kWarps], warp_visible);  // visible chunks per warp in the current tile
  VLMK_SHARED(int32_t, tile_offset);           // visible chunks found in earlier tiles

  const int64_t batch_index = blockIdx.x / p.num_query_blocks;
  const int64_t query_block = blockIdx.x % p.num_query_blocks;
  const int64_t row_begin = query_block * p.block_q;
  const int64_t row_end = min(row_begin + p.block_q, p.query_len);
  const uint8_t* mask = p.media_mask + batch_index * p.mask_stride_batch;
  int32_t* ids = p.chunk_ids + blockIdx.x * p.num_chunks;
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;

  if (threadIdx.x == 0) st_shared(&tile_offset, 0);
  __syncthreads();

  for (int64_t tile = 0; tile < p.num_chunks; tile += kThreads) {
    const int64_t chunk = tile + threadIdx.x;
    bool visible = false;
    if (chunk < p.num_chunks) {
      for (int64_t row = row_begin; row < row_end && !visible; ++row) {
        visible = mask[row * p.mask_stride_query + chunk * p.mask_stride_chunk] != 0;
      }
    }
    const unsigned ballot = __ballot_sync(0xffffffffu, visible);
    if (lane == 0) st_shared(&warp_visible[warp], __popc(ballot));
    __syncthreads();  // warp_visible complete

    int32_t before_my_warp = 0;
    int32_t in_tile = 0;
    for (int w = 0; w < kWarps; ++w) {
      const int32_t visible_in_w = ld_shared(&warp_visible[w]);
      before_my_warp += w < warp ? visible_in_w : 0;
      in_tile += visible_in_w;
    }
    if (visible) {
      const int32_t rank_in_warp = __popc(ballot & ((1u << lane) - 1u));
      ids[ld_shared(&tile_offset) + before_my_warp + rank_in_warp] = static_cast<int32_t>(chunk);
    }
    __syncthreads();  // everyone has read tile_offset and warp_visible before they change
    if (threadIdx.x == 0) st_shared(&tile_offset, ld_shared(&tile_offset) + in_tile);
    __syncthreads();
  }

  const int32_t count = ld_shared(&tile_offset);
  for (int64_t chunk = count + threadIdx.x; chunk < p.num_chunks; chunk += kThreads)
    ids[chunk] = -1;
  if (threadIdx.x == 0) p.chunk_count[blockIdx.x] = count;
}

}  // namespace

int launch_block_chunk_schedule(const BlockChunkScheduleParams& params, void* stream) {
  const int64_t blocks = params.batch * params.num_query_blocks;
  if (blocks == 0) return 0;
  if (blocks > 0x7fffffff) return static_cast<int>(cudaErrorInvalidConfiguration);
  const cudaError_t status =
      VLMK_LAUNCH(block_chunk_schedule_kernel, dim3(static_cast<unsigned>(blocks)), dim3(kThreads),
                  0, static_cast<cudaStream_t>(stream), params);
  return static_cast<int>(status);
}

}  // namespace VLMK_BCS_NAMESPACE
}  // namespace vlmk
