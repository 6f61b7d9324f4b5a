// Declarations of the CPU kernels (raw pointers and strides in; torch tensors stay in csrc/torch).
#pragma once

#include "cuda/block_chunk_schedule.h"

namespace vlmk {
namespace cpu {

void block_chunk_schedule(const BlockChunkScheduleParams& params);

}  // namespace cpu
}  // namespace vlmk
