// The concat_project CUDA kernels' own source compiled as host C++ through the SIMT emulator
// (cuda_sim backend).
#define VLMK_SIMT 1
#include "cuda/concat_project.cu"

namespace vlmk {
namespace sim {

const char* concat_project_error_string(int status) {
  return cudaGetErrorString(static_cast<cudaError_t>(status));
}

}  // namespace sim
}  // namespace vlmk
