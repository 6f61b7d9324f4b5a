// Warp shuffles: __shfl_sync, __shfl_up_sync, __shfl_down_sync, __shfl_xor_sync, with and
// without the width argument, on several value types, against PTX's definition of shfl.sync.
#include "simt/tests/check.h"

enum Mode { kIdx = 0, kUp = 1, kDown = 2, kXor = 3 };

// The lane whose value `lane` receives (its own when the source is outside its segment).
int expected_source(Mode mode, int lane, int b, int width) {
  const int first = lane / width * width, last = first + width - 1;
  switch (mode) {
    case kIdx:
      return first + (b % width);
    case kUp:
      return lane - b >= first ? lane - b : lane;
    case kDown:
      return lane + b <= last ? lane + b : lane;
    case kXor:
      return (lane ^ b) <= last ? (lane ^ b) : lane;
  }
  return -1;
}

__global__ void shuffle_all(int mode, int b, int width, float* out) {
  const float v = float(threadIdx.x) + 0.25f;
  float r = 0;
  switch (mode) {
    case kIdx:
      r = width == 32 ? __shfl_sync(0xffffffffu, v, b) : __shfl_sync(0xffffffffu, v, b, width);
      break;
    case kUp:
      r = width == 32 ? __shfl_up_sync(0xffffffffu, v, b)
                      : __shfl_up_sync(0xffffffffu, v, b, width);
      break;
    case kDown:
      r = width == 32 ? __shfl_down_sync(0xffffffffu, v, b)
                      : __shfl_down_sync(0xffffffffu, v, b, width);
      break;
    case kXor:
      r = width == 32 ? __shfl_xor_sync(0xffffffffu, v, b)
                      : __shfl_xor_sync(0xffffffffu, v, b, width);
      break;
  }
  out[threadIdx.x] = r;
}

SIMT_TEST(every_flavour_every_width) {
  std::vector<float> out(64);
  for (int mode = 0; mode < 4; ++mode) {
    for (int width : {1, 2, 4, 8, 16, 32}) {
      for (int b : {0, 1, 3, 5, 8, 16, 31}) {
        CHECK_CUDA(VLMK_LAUNCH(shuffle_all, 1, 64, 0, nullptr, mode, b, width, out.data()));
        for (int t = 0; t < 64; ++t) {
          const int warp_base = t / 32 * 32;
          const int src = expected_source(Mode(mode), t % 32, b, width);
          if (out[t] != float(warp_base + src) + 0.25f) {
            simt_test::fail(__FILE__, __LINE__,
                            "mode " + std::to_string(mode) + " width " + std::to_string(width) +
                                " b " + std::to_string(b) + " thread " + std::to_string(t) +
                                ": got " + std::to_string(out[t]));
          }
        }
      }
    }
  }
}

// Butterfly and shift-down warp reductions, a broadcast, on several types.
template <class T>
__global__ void warp_reductions(const T* in, T* xor_sum, T* down_sum, T* broadcast) {
  const unsigned lane = threadIdx.x % 32;
  T v = in[threadIdx.x];
  T a = v;
  for (int offset = 16; offset > 0; offset /= 2) a += __shfl_xor_sync(0xffffffffu, a, offset);
  T d = v;
  for (unsigned offset = 16; offset > 0; offset /= 2) d += __shfl_down_sync(0xffffffffu, d, offset);
  xor_sum[threadIdx.x] = a;
  if (lane == 0) down_sum[threadIdx.x / 32] = d;
  broadcast[threadIdx.x] = __shfl_sync(0xffffffffu, v, 7);
}

template <class T>
void check_reductions() {
  const int n = 96;
  std::vector<T> in(n), xs(n), ds(n / 32), bc(n);
  for (int i = 0; i < n; ++i) in[i] = T(i * 3 % 17);
  CHECK_CUDA(VLMK_LAUNCH((warp_reductions<T>), 1, n, 0, nullptr, in.data(), xs.data(), ds.data(),
                         bc.data()));
  for (int w = 0; w < n / 32; ++w) {
    T sum = 0;
    for (int l = 0; l < 32; ++l) sum += in[w * 32 + l];
    CHECK(ds[w] == sum);
    for (int l = 0; l < 32; ++l) {
      CHECK(xs[w * 32 + l] == sum);
      CHECK(bc[w * 32 + l] == in[w * 32 + 7]);
    }
  }
}

SIMT_TEST(reductions_on_several_types) {
  check_reductions<float>();
  check_reductions<double>();
  check_reductions<int>();
  check_reductions<unsigned>();
  check_reductions<long long>();
  check_reductions<unsigned long long>();
}

// 16-bit pairs travel as one 32-bit value.
__global__ void shuffle_half2(__half2* out) {
  const __half2 v = __floats2half2_rn(float(threadIdx.x), -float(threadIdx.x));
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, v, 1);
}

__global__ void shuffle_bf16(__nv_bfloat16* out) {
  const __nv_bfloat16 v = __float2bfloat16(float(threadIdx.x) * 2.0f);
  out[threadIdx.x] = __shfl_up_sync(0xffffffffu, v, 2);
}

SIMT_TEST(sixteen_bit_types) {
  std::vector<__half2> h(32);
  CHECK_CUDA(VLMK_LAUNCH(shuffle_half2, 1, 32, 0, nullptr, h.data()));
  for (int t = 0; t < 32; ++t) {
    CHECK_EQ(__low2float(h[t]), float(t ^ 1));
    CHECK_EQ(__high2float(h[t]), -float(t ^ 1));
  }
  std::vector<__nv_bfloat16> b(32);
  CHECK_CUDA(VLMK_LAUNCH(shuffle_bf16, 1, 32, 0, nullptr, b.data()));
  for (int t = 0; t < 32; ++t) CHECK_EQ(__bfloat162float(b[t]), 2.0f * float(t >= 2 ? t - 2 : t));
}

// Two half-warps exchange independently under their own masks.
__global__ void half_warp_groups(int* out) {
  const unsigned lane = threadIdx.x % 32;
  const unsigned mask = lane < 16 ? 0x0000ffffu : 0xffff0000u;
  int v = int(lane);
  for (int offset = 8; offset > 0; offset /= 2) v += __shfl_xor_sync(mask, v, offset);
  out[threadIdx.x] = v;
}

SIMT_TEST(disjoint_masks) {
  std::vector<int> out(32);
  CHECK_CUDA(VLMK_LAUNCH(half_warp_groups, 1, 32, 0, nullptr, out.data()));
  for (int t = 0; t < 32; ++t) CHECK_EQ(out[t], t < 16 ? 120 : 376);
}

// Values are exchanged at each call: lanes that run ahead cannot overwrite what a slower lane
// has yet to read (a thread runs until it blocks, so lane 0 reaches the second shuffle first).
__global__ void back_to_back(int* out) {
  int v = int(threadIdx.x);
  v = __shfl_down_sync(0xffffffffu, v, 1);
  v = __shfl_down_sync(0xffffffffu, v, 1);
  v = __shfl_up_sync(0xffffffffu, v, 3);
  out[threadIdx.x] = v;
}

SIMT_TEST(back_to_back_shuffles) {
  std::vector<int> out(32);
  CHECK_CUDA(VLMK_LAUNCH(back_to_back, 1, 32, 0, nullptr, out.data()));
  for (int t = 0; t < 32; ++t) {
    auto down1 = [](int l) { return l + 1 <= 31 ? l + 1 : l; };
    const int up_src = t >= 3 ? t - 3 : t;
    CHECK_EQ(out[t], down1(down1(up_src)));
  }
}

__global__ void bad_width(int* out) { out[threadIdx.x] = __shfl_sync(0xffffffffu, 1, 0, 12); }

SIMT_TEST(width_must_be_a_power_of_two) {
  std::vector<int> out(32);
  const cudaError_t e = VLMK_LAUNCH(bad_width, 1, 32, 0, nullptr, out.data());
  CHECK_EQ(int(e), int(cudaErrorLaunchFailure));
  CHECK_CONTAINS(cudaGetErrorString(e), "width 12 is not a power of two");
}
