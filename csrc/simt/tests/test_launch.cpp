// Launch configuration errors, cudaGetLastError semantics, VLMK_LAUNCH forms, launches from
// several host threads at once, and the speed of a typical launch.
#include <thread>

#include "simt/tests/check.h"

#if defined(__x86_64__)
#include <xmmintrin.h>
#endif

__global__ void fill(int* out, int value) { out[blockIdx.x * blockDim.x + threadIdx.x] = value; }

SIMT_TEST(bad_block_shapes_are_rejected) {
  std::vector<int> out(2048, 0);
  const dim3 bad_blocks[] = {dim3(1025), dim3(32, 33), dim3(1, 1, 65), dim3(0), dim3(2048, 1)};
  for (const dim3& block : bad_blocks) {
    const cudaError_t e = VLMK_LAUNCH(fill, 1, block, 0, nullptr, out.data(), 1);
    CHECK_EQ(int(e), int(cudaErrorInvalidConfiguration));
    CHECK_CONTAINS(cudaGetErrorString(e), "1 to 1024 threads");
  }
  for (const dim3& grid : {dim3(0), dim3(1, 65536), dim3(1, 1, 0)}) {
    CHECK_EQ(int(VLMK_LAUNCH(fill, grid, 32, 0, nullptr, out.data(), 1)),
             int(cudaErrorInvalidConfiguration));
  }
  for (int v : out) CHECK_EQ(v, 0);  // nothing ran
  CHECK_CUDA(VLMK_LAUNCH(fill, 2, 1024, 0, nullptr, out.data(), 1));
  CHECK_CUDA(VLMK_LAUNCH(fill, 1, dim3(4, 4, 64), 0, nullptr, out.data(), 2));
}

SIMT_TEST(last_error_semantics) {
  std::vector<int> out(32, 0);
  // simt::launch reports and keeps the error, like a kernel<<<>>> launch ...
  const cudaError_t e = simt::launch(fill, 1, 2000, 0, out.data(), 1);
  CHECK_EQ(int(e), int(cudaErrorInvalidConfiguration));
  CHECK_EQ(int(cudaPeekAtLastError()), int(cudaErrorInvalidConfiguration));
  // ... cudaGetLastError returns it once.
  CHECK_EQ(int(cudaGetLastError()), int(cudaErrorInvalidConfiguration));
  CHECK_EQ(int(cudaGetLastError()), int(cudaSuccess));
  CHECK_EQ(std::string(cudaGetErrorName(e)), std::string("cudaErrorInvalidConfiguration"));
  CHECK_CONTAINS(cudaGetErrorString(e), "<kernel>");
  CHECK_EQ(std::string(cudaGetErrorString(cudaSuccess)), std::string("no error"));
  CHECK_EQ(std::string(cudaGetErrorString(cudaErrorIllegalAddress)),
           std::string("an illegal memory access was encountered"));
}

template <class T, int kScale>
__global__ void scaled_copy(const T* in, T* out) {
  out[threadIdx.x] = in[threadIdx.x] * T(kScale);
}

__global__ void no_arguments() {}

struct Params {
  const float* in;  // input
  float* out;       // output
  int n;            // elements
  float scale;      // multiplier
};

__global__ void with_params(const Params p) {
  const int i = int(blockIdx.x * blockDim.x + threadIdx.x);
  if (i < p.n) p.out[i] = p.in[i] * p.scale;
}

SIMT_TEST(vlmk_launch_forms) {
  std::vector<float> in(64), out(64, 0);
  for (int i = 0; i < 64; ++i) in[i] = float(i);
  // A template instance in parentheses (its comma would split the macro arguments).
  CHECK_CUDA(VLMK_LAUNCH((scaled_copy<float, 3>), 1, 64, 0, nullptr, in.data(), out.data()));
  for (int i = 0; i < 64; ++i) CHECK_EQ(out[i], 3.0f * float(i));
  // Through a function pointer.
  auto kernel = scaled_copy<float, 5>;
  CHECK_CUDA(VLMK_LAUNCH(kernel, 1, 64, 0, nullptr, in.data(), out.data()));
  CHECK_EQ(out[10], 50.0f);
  // No kernel arguments; a stream argument that is evaluated and ignored.
  cudaStream_t stream = nullptr;
  CHECK_CUDA(VLMK_LAUNCH(no_arguments, 3, 3, 0, stream));
  // A params struct passed by value; int64 sizes converted like a call.
  const long long blocks = 2;
  CHECK_CUDA(
      VLMK_LAUNCH(with_params, blocks, 40, 0, stream, Params{in.data(), out.data(), 64, -1.0f}));
  for (int i = 0; i < 64; ++i) CHECK_EQ(out[i], -float(i));
}

__global__ void nested_launch(int* result) {
  if (threadIdx.x == 0) *result = int(simt::launch(no_arguments, 1, 1, 0));
}

SIMT_TEST(launch_from_a_kernel_is_refused) {
  int result = -1;
  CHECK_CUDA(VLMK_LAUNCH(nested_launch, 1, 1, 0, nullptr, &result));
  CHECK_EQ(result, int(cudaErrorNotSupported));
}

// A block-wide sum with a few barriers, the shape of a typical reduction kernel.
__global__ void reduce_rows(const float* in, float* out, int cols) {
  __shared__ float partial[256];
  float acc = 0.0f;
  for (int c = int(threadIdx.x); c < cols; c += int(blockDim.x)) acc += in[blockIdx.x * cols + c];
  partial[threadIdx.x] = acc;
  __syncthreads();
  for (unsigned stride = blockDim.x / 2; stride >= 32; stride /= 2) {
    if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x < 32) {
    float v = partial[threadIdx.x];
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
    if (threadIdx.x == 0) out[blockIdx.x] = v;
  }
}

static bool rows_ok(const std::vector<float>& in, const std::vector<float>& out, int cols) {
  for (size_t r = 0; r < out.size(); ++r) {
    float expect = 0;
    for (int c = 0; c < cols; ++c) expect += in[r * cols + c];
    if (std::fabs(out[r] - expect) > 1e-3f * std::fabs(expect) + 1e-3f) return false;
  }
  return true;
}

SIMT_TEST(launches_from_several_host_threads) {
  const int rows = 64, cols = 1000;
  std::vector<float> in(rows * cols);
  for (size_t i = 0; i < in.size(); ++i) in[i] = float(i % 13) * 0.5f;
  std::vector<std::vector<float>> outs(6, std::vector<float>(rows, -1));
  std::vector<int> errors(6, 0);
  std::vector<std::thread> threads;
  for (int h = 0; h < 6; ++h) {
    threads.emplace_back([&, h] {
      for (int rep = 0; rep < 5; ++rep) {
        if (VLMK_LAUNCH(reduce_rows, rows, 256, 0, nullptr, in.data(), outs[h].data(), cols) !=
                cudaSuccess ||
            !rows_ok(in, outs[h], cols)) {
          ++errors[h];
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  for (int e : errors) CHECK_EQ(e, 0);
}

SIMT_TEST(typical_launch_is_fast) {
  const int rows = 64, cols = 4096;
  std::vector<float> in(rows * cols), out(rows);
  for (size_t i = 0; i < in.size(); ++i) in[i] = float(i % 5);
  CHECK_CUDA(VLMK_LAUNCH(reduce_rows, rows, 256, 0, nullptr, in.data(), out.data(), cols));  // warm
  const auto start = std::chrono::steady_clock::now();
  const int reps = 5;
  for (int rep = 0; rep < reps; ++rep) {
    CHECK_CUDA(VLMK_LAUNCH(reduce_rows, rows, 256, 0, nullptr, in.data(), out.data(), cols));
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / reps;
  std::printf("grid 64 x block 256, 5 barriers + 5 shuffles: %.2f ms per launch\n", 1e3 * seconds);
  CHECK(rows_ok(in, out, cols));
  CHECK(seconds < 0.5);
}

__global__ void multiply(const float* in, float* out) {
  out[blockIdx.x * blockDim.x + threadIdx.x] = in[0] * in[1];
}

#if defined(__x86_64__)
SIMT_TEST(blocks_use_the_launching_threads_float_mode) {
  const simt::Config saved = simt::get_config();
  simt::Config c = saved;
  c.num_threads = 3;
  simt::set_config(c);
  const float denormal = 1e-40f;
  const float in[2] = {denormal, 1.0f};
  std::vector<float> out(64 * 32, -1.0f);
  const unsigned csr = _mm_getcsr();
  _mm_setcsr(csr | 0x8040u);  // flush denormals to zero (FTZ | DAZ), as torch.set_flush_denormal
  const cudaError_t e = VLMK_LAUNCH(multiply, 64, 32, 0, nullptr, in, out.data());
  _mm_setcsr(csr);
  CHECK_CUDA(e);
  for (float v : out) CHECK_EQ(v, 0.0f);
  CHECK_CUDA(VLMK_LAUNCH(multiply, 64, 32, 0, nullptr, in, out.data()));
  for (float v : out) CHECK_EQ(v, denormal);
  simt::set_config(saved);
}
#endif

SIMT_TEST(runtime_api_subset) {
  int value = 0;
  CHECK_CUDA(cudaDeviceGetAttribute(&value, cudaDevAttrMaxSharedMemoryPerBlockOptin, 0));
  CHECK_EQ(value, 232448);
  CHECK_CUDA(cudaDeviceGetAttribute(&value, cudaDevAttrWarpSize, 0));
  CHECK_EQ(value, 32);
  CHECK_CUDA(cudaDeviceGetAttribute(&value, cudaDevAttrMultiProcessorCount, 0));
  CHECK(value > 0);
  int* buffer = nullptr;
  CHECK_CUDA(cudaMalloc(&buffer, 64 * sizeof(int)));
  CHECK_CUDA(cudaMemsetAsync(buffer, 0, 64 * sizeof(int), nullptr));
  CHECK_CUDA(VLMK_LAUNCH(fill, 2, 16, 0, nullptr, buffer + 8, 3));
  std::vector<int> host(64, -1);
  CHECK_CUDA(cudaMemcpy(host.data(), buffer, 64 * sizeof(int), cudaMemcpyDeviceToHost));
  for (int i = 0; i < 64; ++i) CHECK_EQ(host[i], i >= 8 && i < 40 ? 3 : 0);
  CHECK_CUDA(cudaFree(buffer));
  CHECK_CUDA(cudaDeviceSynchronize());
  CHECK_CUDA(cudaStreamSynchronize(nullptr));
}
