// The backward CUDA kernels' own source compiled as host C++ through the SIMT emulator (cuda_sim
// backend).
#define VLMK_SIMT 1
#include "cuda/image_text_attention_bwd.cu"

namespace vlmk {
namespace sim {

const char* image_text_attention_bwd_error_string(int status) {
  return cudaGetErrorString(static_cast<cudaError_t>(status));
}

}  // namespace sim
}  // namespace vlmk
