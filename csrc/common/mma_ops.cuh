// mma_ops.cuh — warp-level matrix multiply-accumulate steps built on tensor_core.cuh, shared by
// the CUDA kernels (torch-free, namespace vlmk::tc):
//
//   mma_m16n8k16<T>(acc, a, b)          acc += A B on m16n8k16 for T = __nv_bfloat16 or __half
//                                       (fragments as in tensor_core.cuh, fp32 accumulate)
//   mma_m16n8k8_3xtf32(acc, a[4], b[2]) acc += A B on m16n8k8 tf32 at ~fp32 accuracy (3xTF32);
//                                       a / b are the raw fp32 values of the A / B fragments
//                                       (the m16n8k8 tf32 layouts of tensor_core.cuh)
//
// 3xTF32: x = hi + lo with hi = tf32(x), lo = tf32(x - hi); a b ~ a_hi b_hi + (a_lo b_hi + a_hi
// b_lo). One TF32 rounding leaves ~1e-4..1e-3 relative error on long dots, far over the float32
// tolerance (DESIGN §6); three MMAs keep float32-grade error. The two small cross terms go to a
// separate accumulator that is added only when it is not NaN: with an inf operand x - hi is NaN and
// a_lo * inf + a_hi * b_lo can be inf - inf where fp32 gives +-inf. Dropping a NaN of the small
// terms loses nothing: a NaN or inf operand also reaches the hi * hi product, as in fp32.
#pragma once

#include <cfloat>
#include <type_traits>

#include "common/cuda_compat.cuh"
#include "common/tensor_core.cuh"

namespace vlmk {
namespace tc {

template <typename T>
__device__ __forceinline__ void mma_m16n8k16(FragC& acc, const FragA& a, const FragB& b) {
  static_assert(std::is_same<T, __nv_bfloat16>::value || std::is_same<T, __half>::value,
                "m16n8k16 takes bfloat16 or float16 operands");
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    mma_m16n8k16_bf16(acc, a, b, acc);
  } else {
    mma_m16n8k16_f16(acc, a, b, acc);
  }
}

__device__ __forceinline__ void mma_m16n8k8_3xtf32(FragC& acc, const float (&a)[4],
                                                   const float (&b)[2]) {
  FragA a_hi, a_lo;
  FragB b_hi, b_lo;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    a_hi.x[i] = to_tf32(a[i]);
    a_lo.x[i] = to_tf32(a[i] - __uint_as_float(a_hi.x[i]));
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    b_hi.x[i] = to_tf32(b[i]);
    b_lo.x[i] = to_tf32(b[i] - __uint_as_float(b_hi.x[i]));
  }
  FragC small;
#pragma unroll
  for (int i = 0; i < 4; ++i) small.x[i] = 0.0f;
  mma_m16n8k8_tf32(small, a_lo, b_hi, small);
  mma_m16n8k8_tf32(small, a_hi, b_lo, small);
  mma_m16n8k8_tf32(acc, a_hi, b_hi, acc);
#pragma unroll
  for (int i = 0; i < 4; ++i) acc.x[i] += fminf(fmaxf(small.x[i], -FLT_MAX), FLT_MAX);
}

}  // namespace tc
}  // namespace vlmk
