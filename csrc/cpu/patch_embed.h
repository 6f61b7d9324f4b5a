// patch_embed on the CPU: declarations of the forward and backward kernels (raw pointers and
// strides in; torch tensors stay in csrc/torch). Semantics: the reference,
// vlm_kernels/reference/patch_embed.py.
//
//   pixels [B, C, H, W] (any strides), weight [D, C, P, P], K = C*P*P, Np = (H/P)*(W/P),
//   o = 1 with a CLS token (else 0), N = Np + o
//   x[b, c, h, w]     = pixels[b, c, h, w] * pixel_scale[c] + pixel_shift[c]
//                       (the glue folds uint8's 1/255, mean and std into scale and shift)
//   X[b, i, k]        = x[b, c, P*r + u, P*s + v], i = r*(W/P) + s, k = (c*P + u)*P + v
//   out[b, o + i]     = X[b, i] W^T + bias + pos[o + i];   out[b, 0] = cls + pos[0]
// Backward, for grad_out dY [B, N, D] (dYp = its patch rows):
//   grad_weight^T [K, D] = sum_{b,i} X[b, i]^T dYp[b, i]             (float32, deterministic)
//   grad_pos [N, D]      = sum_b dY[b]  (float32); grad_bias = sum_{t >= o} grad_pos[t]
//   grad_pixels          = scatter(dYp W) * pixel_scale[c]            (when asked)
#pragma once

#include <cstdint>

namespace vlmk {

// Element types. kCompute: the GEMM operand type (float32, or bfloat16 with float32 accumulation);
// the glue packs the weight in it. kOut: the weight's dtype (out, bias, cls, pos, grad_out).
enum class PatchEmbedType : int32_t {
  kFloat32 = 0,
  kBFloat16 = 1,
  kFloat16 = 2,
  kFloat64 = 3,
  kUInt8 = 4,
};

// bfloat16 forward GEMMs pad K = C*P*P with zeros to a multiple of this: AMX tiles take K in steps
// of 32 bfloat16, and a K tail costs more than the padding (588 -> 608 at P = 14: measured ~20%
// faster on mllama-11b, min of 12 interleaved runs on a loaded machine).
constexpr int64_t kPatchEmbedBf16KAlign = 32;
// The forward packs its weight in blocks of this many output columns, [Dp / nb][Kp (/ 2)][nb]
// ([2]), and runs one brgemm per block: B rows nb * 4 bytes apart rather than D * 4 (with D = 1024
// those sat 4 KiB apart, all in one L1 set).
constexpr int64_t kPatchEmbedWeightBlockN = 64;

struct PatchEmbedFwdParams {
  PatchEmbedType pixel_type;    // uint8, float32, bfloat16, float16 or float64
  PatchEmbedType compute_type;  // float32 or bfloat16
  PatchEmbedType out_type;      // float32, bfloat16 or float16 (the weight's dtype)
  const void* pixels;           // [B, C, H, W], strides below
  const float* pixel_scale;     // [C]: x = pixel * scale + shift
  const float* pixel_shift;     // [C]
  // The weight [D, C, P, P] as [D, K] (K = C*P*P), contiguous, in out_type; the kernel packs it
  // as its GEMM's B operand (compute_type, blocked by kPatchEmbedWeightBlockN columns).
  const void* weight;
  const void* bias;            // [D] in out_type, or nullptr
  const void* cls_token;       // [D] in out_type, or nullptr
  const void* pos_embed;       // [N, D] in out_type, contiguous, or nullptr
  void* out;                   // [B, N, D] in out_type, contiguous
  int64_t pixel_stride_batch;  // element strides of pixels
  int64_t pixel_stride_channel;
  int64_t pixel_stride_row;
  int64_t pixel_stride_col;
  int64_t batch;     // B
  int64_t channels;  // C
  int64_t height;    // H, a multiple of P
  int64_t width;     // W, a multiple of P
  int64_t patch;     // P
  int64_t dim;       // D
};

struct PatchEmbedBwdParams {
  PatchEmbedType pixel_type;    // as in the forward
  PatchEmbedType compute_type;  // float32 or bfloat16
  PatchEmbedType out_type;      // the weight's dtype: grad_out's
  const void* grad_out;         // [B, N, D] in out_type, contiguous
  const void* pixels;           // [B, C, H, W], strides below
  const float* pixel_scale;     // [C], as in the forward
  const float* pixel_shift;     // [C]
  // The weight as the B operand of grad_pixels = dYp W: [Dp, K] in compute_type, row-major for
  // float32, VNNI pairs [Dp / 2][K][2] for bfloat16 (Dp = D rounded up to the pair size, pad rows
  // zero). nullptr when grad_pixels is not asked for.
  const void* weight_packed;
  float* grad_weight_t;  // [K, D] float32 contiguous: grad_weight transposed
  float* grad_pos;       // [N, D] float32 contiguous
  float* grad_bias;      // [D] float32
  void* grad_pixels;     // [B, C, H, W] contiguous in pixel_type (a float type), or nullptr
  int64_t pixel_stride_batch;
  int64_t pixel_stride_channel;
  int64_t pixel_stride_row;
  int64_t pixel_stride_col;
  int64_t batch;
  int64_t channels;
  int64_t height;
  int64_t width;
  int64_t patch;
  int64_t dim;
  bool has_cls;  // token 0 of grad_out is the CLS token's
};

namespace cpu {

// Sizes may be empty (B, C, H, W or D = 0); P >= 1.
// Built for AVX-512 (x86-64 with GCC; call only where cpu::avx512::supported()).
void patch_embed_fwd(const PatchEmbedFwdParams& params);
void patch_embed_bwd(const PatchEmbedBwdParams& params);
// The same kernels built for the baseline ISA (cpu/patch_embed_portable.cpp): any CPU.
void patch_embed_fwd_portable(const PatchEmbedFwdParams& params);
void patch_embed_bwd_portable(const PatchEmbedBwdParams& params);

}  // namespace cpu
}  // namespace vlmk
