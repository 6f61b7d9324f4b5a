// __half and __nv_bfloat16 on the host: round trips, round-to-nearest-even, specials, and use
// inside a kernel.
#include <random>

#include "simt/tests/check.h"

static uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

static float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

SIMT_TEST(half_round_trip_all_values) {
  for (uint32_t b = 0; b < 0x10000u; ++b) {
    const __half h = __ushort_as_half(static_cast<unsigned short>(b));
    const float f = __half2float(h);
    const unsigned short back = __half_as_ushort(__float2half(f));
    if ((b & 0x7fffu) > 0x7c00u) {
      CHECK(std::isnan(f));
      CHECK_EQ(unsigned(back), 0x7fffu);  // canonical NaN, as CUDA
    } else if (back != b) {
      simt_test::fail(__FILE__, __LINE__, "half round trip of " + std::to_string(b));
    }
  }
}

SIMT_TEST(bf16_round_trip_all_values) {
  for (uint32_t b = 0; b < 0x10000u; ++b) {
    const __nv_bfloat16 h = __ushort_as_bfloat16(static_cast<unsigned short>(b));
    const float f = __bfloat162float(h);
    CHECK_EQ(bits_of(f), b << 16);
    const unsigned short back = __bfloat16_as_ushort(__float2bfloat16(f));
    if ((b & 0x7fffu) > 0x7f80u) {
      CHECK_EQ(unsigned(back), 0x7fffu);
    } else if (back != b) {
      simt_test::fail(__FILE__, __LINE__, "bf16 round trip of " + std::to_string(b));
    }
  }
}

// Correctly rounded float -> half, found by search over the 65536 encodings (as a double).
static unsigned short nearest_half(float f) {
  const double x = f;
  unsigned short best = 0;
  double best_err = INFINITY;
  for (uint32_t b = 0; b < 0x7c00u; ++b) {  // finite non-negative halves
    const double v = __half2float(__ushort_as_half(static_cast<unsigned short>(b)));
    const double err = std::fabs(v - std::fabs(x));
    if (err < best_err || (err == best_err && (b & 1u) == 0)) {
      best_err = err;
      best = static_cast<unsigned short>(b);
    }
  }
  // Beyond the largest half (65504) by half an ulp or more: infinity.
  if (std::fabs(x) >= 65520.0) best = 0x7c00u;
  return static_cast<unsigned short>(best | (std::signbit(f) ? 0x8000u : 0u));
}

SIMT_TEST(float_to_half_rounds_to_nearest_even) {
  std::mt19937 rng(1234);
  std::vector<float> samples = {0.0f,
                                -0.0f,
                                1.0f,
                                65504.0f,
                                65519.99f,
                                65520.0f,
                                1e-8f,
                                2.98023224e-8f /* 2^-25: ties to 0 */,
                                2.98023259e-8f,
                                5.96046448e-8f /* 2^-24 */,
                                6.1035156e-5f,
                                3.14159265f,
                                1.00048828125f /* tie between 1 and 1+2^-10 */,
                                1.00146484375f /* tie, rounds up to even */};
  std::uniform_int_distribution<uint32_t> any_bits(0, 0xffffffffu);
  for (int i = 0; i < 300; ++i) {
    float f = float_of(any_bits(rng));
    if (!std::isfinite(f)) continue;
    // Map into the half range (and below) with random exponents.
    int exponent = 0;
    f = std::ldexp(std::frexp(f, &exponent), int(any_bits(rng) % 44) - 28);
    samples.push_back(f);
  }
  for (float f : samples) {
    const unsigned got = __half_as_ushort(__float2half(f));
    const unsigned want = nearest_half(f);
    if (got != want) {
      simt_test::fail(__FILE__, __LINE__,
                      "__float2half(" + std::to_string(f) + ") = " + std::to_string(got) +
                          ", want " + std::to_string(want));
    }
#if defined(__FLT16_MAX__)
    _Float16 native = static_cast<_Float16>(f);
    unsigned short native_bits;
    std::memcpy(&native_bits, &native, 2);
    CHECK_EQ(got, unsigned(native_bits));
#endif
  }
  CHECK_EQ(unsigned(__half_as_ushort(__float2half(INFINITY))), 0x7c00u);
  CHECK_EQ(unsigned(__half_as_ushort(__float2half(-INFINITY))), 0xfc00u);
  CHECK_EQ(unsigned(__half_as_ushort(__float2half(1e6f))), 0x7c00u);
  CHECK(std::isnan(__half2float(__float2half(NAN))));
}

SIMT_TEST(float_to_bf16_rounds_to_nearest_even) {
  CHECK_EQ(unsigned(__bfloat16_as_ushort(__float2bfloat16(1.0f))), 0x3f80u);
  // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even (1.0).
  CHECK_EQ(__bfloat162float(__float2bfloat16(1.00390625f)), 1.0f);
  // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: ties to even (1 + 2^-6).
  CHECK_EQ(__bfloat162float(__float2bfloat16(1.01171875f)), 1.015625f);
  CHECK_EQ(__bfloat162float(__float2bfloat16(1.0040f)), 1.0078125f);  // above the tie: up
  CHECK_EQ(unsigned(__bfloat16_as_ushort(__float2bfloat16(float_of(0x7f61b1e6u)))), 0x7f62u);
  CHECK_EQ(unsigned(__bfloat16_as_ushort(__float2bfloat16(float_of(0x3f808000u)))), 0x3f80u);
  CHECK_EQ(unsigned(__bfloat16_as_ushort(__float2bfloat16(float_of(0x3f818000u)))), 0x3f82u);
  CHECK_EQ(unsigned(__bfloat16_as_ushort(__float2bfloat16(float_of(0x3f808001u)))), 0x3f81u);
  CHECK_EQ(unsigned(__bfloat16_as_ushort(__float2bfloat16(float_of(0x00008000u)))), 0u);
  CHECK(std::isinf(__bfloat162float(__float2bfloat16(3.4e38f))));  // rounds past the largest
  CHECK(std::isnan(__bfloat162float(__float2bfloat16(NAN))));
  CHECK_EQ(__bfloat162float(__float2bfloat16(-2.5f)), -2.5f);
}

SIMT_TEST(arithmetic_and_pairs) {
  const __half a = __float2half(1.5f), b = __float2half(2.25f);
  CHECK_EQ(__half2float(__hadd(a, b)), 3.75f);
  CHECK_EQ(__half2float(__hmul(a, b)), 3.375f);
  CHECK_EQ(__half2float(__hsub(a, b)), -0.75f);
  CHECK_EQ(__half2float(__hfma(a, b, a)), 4.875f);
  CHECK_EQ(__half2float(__hneg(a)), -1.5f);
  CHECK_EQ(__half2float(__hmax(a, b)), 2.25f);
  const __half2 p = __floats2half2_rn(1.0f, -2.0f);
  const float2 q = __half22float2(__hmul2(p, p));
  CHECK_EQ(q.x, 1.0f);
  CHECK_EQ(q.y, 4.0f);
  const __nv_bfloat162 r = __floats2bfloat162_rn(3.0f, 0.5f);
  CHECK_EQ(__low2float(r), 3.0f);
  CHECK_EQ(__high2float(r), 0.5f);
  const __nv_bfloat16 c = __float2bfloat16(3.0f), d = __float2bfloat16(0.5f);
  CHECK_EQ(__bfloat162float(__hadd(c, d)), 3.5f);
#if !defined(__CUDA_NO_HALF_CONVERSIONS__) && !defined(__CUDA_NO_HALF_OPERATORS__)
  __half e = 2.0f;  // implicit conversions and operators, as CUDA's headers provide them
  e += __half(1.0f);
  CHECK_EQ(float(e), 3.0f);
  CHECK(e > a);
  __nv_bfloat16 g = 2.0f;
  g *= __nv_bfloat16(4.0f);
  CHECK_EQ(float(g), 8.0f);
#endif
  CHECK_EQ(sizeof(__half), 2u);
  CHECK_EQ(sizeof(__nv_bfloat162), 4u);
}

// A mixed-precision kernel: bf16 in, fp32 accumulate, fp16 out.
__global__ void dot_rows(const __nv_bfloat16* x, const __nv_bfloat16* w, __half* out, int cols) {
  float acc = 0.0f;
  for (int c = int(threadIdx.x); c < cols; c += int(blockDim.x)) {
    acc += __bfloat162float(x[blockIdx.x * cols + c]) * __bfloat162float(w[c]);
  }
  for (int offset = 16; offset > 0; offset /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
  if (threadIdx.x == 0) out[blockIdx.x] = __float2half_rn(acc);
}

SIMT_TEST(half_and_bf16_in_a_kernel) {
  const int rows = 6, cols = 100;
  std::vector<__nv_bfloat16> x(rows * cols), w(cols);
  for (int i = 0; i < rows * cols; ++i) x[i] = __float2bfloat16(float(i % 7) * 0.5f);
  for (int c = 0; c < cols; ++c) w[c] = __float2bfloat16(c % 2 ? 1.0f : -0.25f);
  std::vector<__half> out(rows);
  CHECK_CUDA(VLMK_LAUNCH(dot_rows, rows, 32, 0, nullptr, x.data(), w.data(), out.data(), cols));
  for (int r = 0; r < rows; ++r) {
    float expect = 0;
    for (int c = 0; c < cols; ++c) {
      expect += __bfloat162float(x[r * cols + c]) * __bfloat162float(w[c]);
    }
    CHECK_EQ(__half2float(out[r]), __half2float(__float2half(expect)));
  }
}
