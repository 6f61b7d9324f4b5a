// The patch_embed forward CUDA kernel's own source compiled as host C++ through the SIMT emulator
// (cuda_sim backend).
#define VLMK_SIMT 1
#include "cuda/patch_embed.cu"

namespace vlmk {
namespace sim {

const char* patch_embed_error_string(int status) {
  return cudaGetErrorString(static_cast<cudaError_t>(status));
}

}  // namespace sim
}  // namespace vlmk
