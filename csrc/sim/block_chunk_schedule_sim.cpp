// The CUDA kernel's own source compiled as host C++ through the SIMT emulator (cuda_sim backend).
#define VLMK_SIMT 1
#include "cuda/block_chunk_schedule.cu"
