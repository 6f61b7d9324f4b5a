// Device math and bit intrinsics on the host.
#include "simt/tests/check.h"

__global__ void math_kernel(float* out) {
  const float x = 0.75f;
  out[0] = __expf(x);
  out[1] = expf(x);
  out[2] = exp2f(x);
  out[3] = __logf(x);
  out[4] = rsqrtf(4.0f);
  out[5] = fmaxf(x, -1.0f);
  out[6] = fminf(x, -1.0f);
  out[7] = __fdividef(3.0f, 4.0f);
  out[8] = max(2.0f, 3.0f);
  out[9] = min(2.0f, 3.0f);
  out[10] = -INFINITY;
  out[11] = __ldg(&out[0]);
  out[12] = __saturatef(1.5f);
  out[13] = __powf(2.0f, 10.0f);
  float s, c;
  __sincosf(0.0f, &s, &c);
  out[14] = s + c;
  out[15] = sqrt(16.0f);
  out[16] = __log2f(8.0f);
  out[17] = __fmaf_rn(2.0f, 3.0f, 1.0f);
}

SIMT_TEST(float_math) {
  std::vector<float> out(18);
  CHECK_CUDA(VLMK_LAUNCH(math_kernel, 1, 1, 0, nullptr, out.data()));
  CHECK_NEAR(out[0], std::exp(0.75), 1e-6);
  CHECK_NEAR(out[1], std::exp(0.75), 1e-6);
  CHECK_NEAR(out[2], std::exp2(0.75), 1e-6);
  CHECK_NEAR(out[3], std::log(0.75), 1e-6);
  CHECK_EQ(out[4], 0.5f);
  CHECK_EQ(out[5], 0.75f);
  CHECK_EQ(out[6], -1.0f);
  CHECK_EQ(out[7], 0.75f);
  CHECK_EQ(out[8], 3.0f);
  CHECK_EQ(out[9], 2.0f);
  CHECK(std::isinf(out[10]) && out[10] < 0);
  CHECK_EQ(out[11], out[0]);
  CHECK_EQ(out[12], 1.0f);
  CHECK_EQ(out[13], 1024.0f);
  CHECK_EQ(out[14], 1.0f);
  CHECK_EQ(out[15], 4.0f);
  CHECK_NEAR(out[16], 3.0, 1e-6);
  CHECK_EQ(out[17], 7.0f);
}

SIMT_TEST(integer_min_max_overloads) {
  CHECK_EQ(min(3, -4), -4);
  CHECK_EQ(max(3, -4), 3);
  CHECK_EQ(min(3u, 7u), 3u);
  CHECK_EQ(max(5ll, 9ll), 9ll);
  CHECK_EQ(min(2.5, 1.5), 1.5);
  CHECK_EQ(max(1ull << 40, 3ull), 1ull << 40);
  CHECK_EQ(umin(4u, 9u), 4u);
}

SIMT_TEST(bit_intrinsics) {
  CHECK_EQ(__popc(0xf0f0u), 8);
  CHECK_EQ(__popcll(0xffffffffffull), 40);
  CHECK_EQ(__ffs(0), 0);
  CHECK_EQ(__ffs(8), 4);
  CHECK_EQ(__ffsll(1ll << 40), 41);
  CHECK_EQ(__clz(0), 32);
  CHECK_EQ(__clz(1), 31);
  CHECK_EQ(__clz(-1), 0);
  CHECK_EQ(__clzll(1ll), 63);
  CHECK_EQ(__brev(1u), 0x80000000u);
  CHECK_EQ(__brev(0x12345678u), 0x1e6a2c48u);
  CHECK_EQ(__brevll(1ull), 1ull << 63);
  CHECK_EQ(__float_as_uint(1.0f), 0x3f800000u);
  CHECK_EQ(__int_as_float(0x40000000), 2.0f);
  CHECK_EQ(__umulhi(0x80000000u, 4u), 2u);
  CHECK_EQ(__mul24(-3, 5), -15);
  CHECK_EQ(__byte_perm(0x33221100u, 0x77665544u, 0x5410u), 0x55441100u);
  CHECK_EQ(__funnelshift_l(0x80000000u, 1u, 1u), 3u);
  CHECK_EQ(__float2int_rn(2.5f), 2);
  CHECK_EQ(__float2int_rn(3.5f), 4);
  CHECK_EQ(warpSize, 32);
}

// Vector types: sizes, alignment and vectorised loads.
__global__ void vector_loads(const float* in, float* out) {
  const float4 v = reinterpret_cast<const float4*>(in)[threadIdx.x];
  out[threadIdx.x] = v.x + v.y + v.z + v.w;
}

SIMT_TEST(vector_types) {
  CHECK_EQ(sizeof(float4), 16u);
  CHECK_EQ(alignof(float4), 16u);
  CHECK_EQ(alignof(float2), 8u);
  CHECK_EQ(alignof(int4), 16u);
  CHECK_EQ(sizeof(float3), 12u);
  alignas(16) float in[32];
  for (int i = 0; i < 32; ++i) in[i] = float(i);
  std::vector<float> out(8);
  CHECK_CUDA(VLMK_LAUNCH(vector_loads, 1, 8, 0, nullptr, in, out.data()));
  for (int t = 0; t < 8; ++t) CHECK_EQ(out[t], float(16 * t + 6));
  const dim3 d(4);
  CHECK(d.x == 4 && d.y == 1 && d.z == 1);
  const float2 f2 = make_float2(1, 2);
  CHECK_EQ(f2.y, 2.0f);
}
