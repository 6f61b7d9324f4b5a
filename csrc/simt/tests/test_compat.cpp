// The portability header under the emulator: the kernels of compat_kernels.cuh (which nvcc also
// compiles) run and give the right answers.
#include "simt/tests/check.h"
#include "simt/tests/compat_kernels.cuh"

SIMT_TEST(portable_kernels_run) {
  const int n = 300;
  std::vector<float> in(n), out(n, -1.0f);
  for (int i = 0; i < n; ++i) in[i] = float(i % 10) - 4.0f;
  CHECK_CUDA(compat::launch_scaled_reverse(in.data(), out.data(), n, nullptr));
  // Block b covers [128 b, 128 b + 128): thread t reads element t and writes element 127 - t.
  for (int j = 0; j < n; ++j) {
    const int block_start = j / 128 * 128;
    const int i = block_start + (127 - (j - block_start));
    if (i < n) CHECK_EQ(out[j], 3.0f * in[i] * in[i]);
  }
  std::vector<float> small(32), sums(32);
  for (int i = 0; i < 32; ++i) small[i] = 0.5f * float(i);
  CHECK_CUDA(compat::launch_sixteen_bit(small.data(), sums.data(), nullptr));
  for (int i = 0; i < 32; ++i) CHECK_EQ(sums[i], 2.0f * (0.5f * 496.0f));
  CHECK_CUDA(compat::launch_no_arguments(nullptr));
}
