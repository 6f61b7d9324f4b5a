// The perceiver_attention backward CUDA kernels' own source compiled as host C++ through the SIMT
// emulator (cuda_sim backend).
#define VLMK_SIMT 1
#include "cuda/perceiver_attention_bwd.cu"
