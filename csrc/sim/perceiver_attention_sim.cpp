// The perceiver_attention forward CUDA kernel's own source compiled as host C++ through the SIMT
// emulator (cuda_sim backend).
#define VLMK_SIMT 1
#include "cuda/perceiver_attention.cu"

namespace vlmk {
namespace sim {

const char* perceiver_attention_error_string(int status) {
  return cudaGetErrorString(static_cast<cudaError_t>(status));
}

}  // namespace sim
}  // namespace vlmk
