// The patch_embed backward CUDA kernels' own source compiled as host C++ through the SIMT emulator
// (cuda_sim backend).
#define VLMK_SIMT 1
#include "cuda/patch_embed_bwd.cu"
