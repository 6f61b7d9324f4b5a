// Dynamic shared memory: sized by the launch, per block, poisoned at block start, limited like a
// GPU's (48 KB unless raised with cudaFuncSetAttribute, 227 KB at most).
#include "simt/tests/check.h"

// Reverses each block's slice through dynamic shared memory of blockDim.x floats + a header.
__global__ void reverse_slices(const float* in, float* out) {
  VLMK_DYNAMIC_SMEM(float, smem);
  float* header = smem;      // 4 floats
  float* values = smem + 4;  // blockDim.x floats
  const unsigned t = threadIdx.x;
  const unsigned n = blockDim.x;
  values[t] = in[blockIdx.x * n + t];
  if (t == 0) header[0] = float(blockIdx.x);
  __syncthreads();
  out[blockIdx.x * n + t] = values[n - 1 - t] + 1000.0f * header[0];
}

SIMT_TEST(dynamic_shared_memory_per_block) {
  const unsigned blocks = 16, threads = 200;
  std::vector<float> in(blocks * threads), out(in.size(), -1);
  for (size_t i = 0; i < in.size(); ++i) in[i] = float(i);
  CHECK_CUDA(VLMK_LAUNCH(reverse_slices, blocks, threads, (threads + 4) * sizeof(float), nullptr,
                         in.data(), out.data()));
  for (unsigned b = 0; b < blocks; ++b) {
    for (unsigned t = 0; t < threads; ++t) {
      CHECK_EQ(out[b * threads + t], in[b * threads + threads - 1 - t] + 1000.0f * float(b));
    }
  }
}

// Reports what the block sees before writing: the poison pattern, its size and alignment.
__global__ void inspect_smem(unsigned* out) {
  VLMK_DYNAMIC_SMEM(unsigned, words);
  if (threadIdx.x == 0) {
    out[0] = words[0];
    out[1] = words[simt::dynamic_shared_bytes() / 4 - 1];
    out[2] = unsigned(reinterpret_cast<uintptr_t>(words) % 16);
    out[3] = unsigned(simt::dynamic_shared_bytes());
    words[0] = 0;  // the next block must see the poison again
  }
}

SIMT_TEST(dynamic_shared_memory_is_poisoned) {
  std::vector<unsigned> out(4, 0);
  for (int round = 0; round < 2; ++round) {
    CHECK_CUDA(VLMK_LAUNCH(inspect_smem, 1, 32, 1024, nullptr, out.data()));
    CHECK_EQ(out[0], 0xffffffffu);
    CHECK_EQ(out[1], 0xffffffffu);
    CHECK_EQ(out[2], 0u);
    CHECK_EQ(out[3], 1024u);
  }
  // A float read from uninitialised dynamic shared memory is NaN.
  float f;
  std::memcpy(&f, &out[0], 4);
  CHECK(std::isnan(f));
}

__global__ void big_smem(float* out) {
  VLMK_DYNAMIC_SMEM(float, smem);
  const unsigned n = unsigned(simt::dynamic_shared_bytes() / sizeof(float));
  for (unsigned i = threadIdx.x; i < n; i += blockDim.x) smem[i] = 1.0f;
  __syncthreads();
  if (threadIdx.x == 0) {
    float s = 0;
    for (unsigned i = 0; i < n; ++i) s += smem[i];
    out[blockIdx.x] = s;
  }
}

SIMT_TEST(large_dynamic_shared_memory_needs_the_attribute) {
  std::vector<float> out(3, 0);
  const size_t big = 100 * 1024;
  // Above 48 KB without the attribute: rejected, as on a GPU.
  cudaError_t e = VLMK_LAUNCH(big_smem, 3, 128, big, nullptr, out.data());
  CHECK_EQ(int(e), int(cudaErrorInvalidValue));
  CHECK_CONTAINS(cudaGetErrorString(e), "cudaFuncSetAttribute");
  CHECK_CUDA(VLMK_LAUNCH(big_smem, 3, 128, 48 * 1024, nullptr, out.data()));
  CHECK_EQ(out[0], 12288.0f);
  // Raised limit: accepted.
  CHECK_CUDA(cudaFuncSetAttribute(big_smem, cudaFuncAttributeMaxDynamicSharedMemorySize, int(big)));
  CHECK_CUDA(VLMK_LAUNCH(big_smem, 3, 128, big, nullptr, out.data()));
  for (float v : out) CHECK_EQ(v, float(big / 4));
  // Beyond what the device has: the attribute itself is refused.
  e = cudaFuncSetAttribute(big_smem, cudaFuncAttributeMaxDynamicSharedMemorySize, 228 * 1024);
  CHECK_EQ(int(e), int(cudaErrorInvalidValue));
  CHECK_EQ(int(cudaGetLastError()), int(cudaErrorInvalidValue));
  CHECK_CUDA(
      cudaFuncSetAttribute(big_smem, cudaFuncAttributeMaxDynamicSharedMemorySize, 227 * 1024));
  CHECK_CUDA(VLMK_LAUNCH(big_smem, 1, 1024, 227 * 1024, nullptr, out.data()));
  CHECK_EQ(out[0], float(227 * 256));
}
