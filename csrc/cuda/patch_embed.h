// patch_embed, CUDA kernels: image -> patch tokens as one implicit GEMM on tensor cores, forward
// and backward (semantics: vlm_kernels/reference/patch_embed.py, DESIGN §3.1).
//
//   pixels [B, C, H, W] (uint8, float16, bfloat16, float32 or float64; any element strides),
//   weight [D, K] = [D, C, P, P] flattened, K = C*P*P, feature k = (c*P + u)*P + v (contiguous),
//   bias [D], cls [D], pos [N, D] (contiguous, weight's dtype, each optional),
//   N = Np + o, Np = (H/P)*(W/P), o = 1 with a CLS token, else 0; patch i = r*(W/P) + s.
//
//   x[b, i, k]    = pixels[b, c, P*r+u, P*s+v] * scale[c] + shift[c]     (in the A-tile load)
//   out[b, o+i]   = sum_k x[b, i, k] weight[:, k] + bias + pos[o+i]         [B*N, K] x [K, D]
//   out[b, 0]     = cls + pos[0]                                            (CLS row: no pixels)
//
//   backward, for dY = grad_out [B, N, D] (contiguous, weight's dtype), dYp its patch rows:
//   grad_weight [D, K] = dYp^T X        (split over B*Np into float32 partials, summed in order)
//   grad_pixels        = scatter(dYp W) * scale[c]                    (float pixels only)
//   grad_pos [N, D]    = sum_b dY[b],   grad_bias = sum of grad_pos over the patch tokens,
//   grad_cls           = grad_pos[0]    (the torch glue copies it)
//
// scale / shift are float32 [C] (scale = 1/(255 std) or 1/std, shift = -mean/std; null: the
// identity, float pixels without mean/std). float32 weights run 3xTF32 (common/mma_ops.cuh),
// bfloat16 / float16 run m16n8k16 with the pixels converted to the weight's dtype in the load (what
// a PyTorch user of that dtype computes); accumulation is float32 everywhere. Deterministic: every
// output element is written by one thread, partials are summed in a fixed order, no atomics.
// Kernels and launchers: patch_embed.cu (forward), patch_embed_bwd.cu (backward); the same
// sources run on the CPU through the SIMT emulator (namespace vlmk::sim, csrc/sim/).
//
// Torch-free: shared by the CUDA build, the emulator build and the torch glue.
#pragma once

#include <cstdint>

namespace vlmk {

enum class PatchEmbedDtype : int32_t {  // weight, bias, cls, pos, out and the gradients but pixels
  kFloat32 = 0,
  kFloat16 = 1,
  kBFloat16 = 2,
};

enum class PatchEmbedPixelDtype : int32_t {  // pixels (and grad_pixels)
  kUInt8 = 0,
  kFloat16 = 1,
  kBFloat16 = 2,
  kFloat32 = 3,
  kFloat64 = 4,
};

// Tiles the host needs for planning (the kernels use the same constants).
constexpr int kPatchEmbedBlockRows = 64;       // output rows per block (tokens / patches / D)
constexpr int kPatchEmbedBlockCols = 64;       // output columns per block (D / K)
constexpr int kPatchEmbedBlockDepth = 32;      // reduction step (K / patches / D)
constexpr int kPatchEmbedTokensPerBlock = 16;  // tokens per block of the pos / bias reduction
constexpr int kPatchEmbedMaxSplits = 64;       // most B*Np ranges of the weight gradient
// Fewest reduction steps per B*Np range: a range also writes and re-reads a float32 D x K partial,
// about the memory traffic of the range's own 16-bit dY and X tiles at 4 steps of 32 patches.
constexpr int kPatchEmbedMinStepsPerSplit = 4;

// The image and its on-load normalization (forward and backward).
struct PatchEmbedPixels {
  const void* pixels;    // [B, C, H, W] of `pixel_dtype`
  int64_t stride_batch;  // element strides of pixels
  int64_t stride_channel;
  int64_t stride_height;
  int64_t stride_width;
  const float* scale;         // [C] or null (with shift: the identity)
  const float* shift;         // [C] or null
  int64_t batch;              // B
  int64_t channels;           // C
  int64_t patch;              // P
  int64_t patches_w;          // W / P
  int64_t patches_per_image;  // Np = (H/P) * (W/P)
  int64_t features;           // K = C * P * P
  PatchEmbedPixelDtype pixel_dtype;
};

struct PatchEmbedParams {
  PatchEmbedPixels image;
  const void* weight;  // [D, K] contiguous
  const void* bias;    // [D] or null
  const void* cls;     // [D] or null (then no CLS row)
  const void* pos;     // [N, D] or null
  void* out;           // [B, N, D] contiguous
  int64_t dim;         // D
  int64_t tokens;      // N = Np + (cls != null)
  PatchEmbedDtype dtype;
};

struct PatchEmbedBwdParams {
  PatchEmbedPixels image;
  const void* grad_out;  // [B, N, D] contiguous, `dtype`
  const void* weight;    // [D, K] contiguous
  void* grad_pixels;     // [B, C, H, W] contiguous in `image.pixel_dtype` (float), or null
  void* grad_weight;     // [D, K] contiguous
  void* grad_bias;       // [D]
  void* grad_pos;        // [N, D] contiguous
  // float32 workspace (patch_embed_bwd_workspace_floats): the weight partials
  // [num_splits, D, K], then the bias partials [ceil(N / kPatchEmbedTokensPerBlock), D].
  float* workspace;
  int64_t dim;             // D
  int64_t tokens;          // N
  bool has_cls;            // token 0 is the CLS token
  int64_t num_splits;      // B*Np ranges of the weight gradient, set by plan_patch_embed_bwd
  int64_t rows_per_split;  // patches per range, a multiple of kPatchEmbedBlockDepth
  PatchEmbedDtype dtype;
};

// Splits the B*Np reduction of the weight gradient so that the grid (K tiles x D tiles x splits)
// fills about two waves of `num_sms` multiprocessors, each range at least
// kPatchEmbedMinStepsPerSplit reduction steps (but the last one).
inline void plan_patch_embed_bwd(PatchEmbedBwdParams& p, int num_sms) {
  const int64_t depth = kPatchEmbedBlockDepth;
  const int64_t rows = p.image.batch * p.image.patches_per_image;
  const int64_t features = p.image.features;
  const int64_t tiles = ((features + kPatchEmbedBlockCols - 1) / kPatchEmbedBlockCols) *
                        ((p.dim + kPatchEmbedBlockRows - 1) / kPatchEmbedBlockRows);
  int64_t splits = tiles > 0 ? (2 * static_cast<int64_t>(num_sms) + tiles - 1) / tiles : 1;
  const int64_t steps = (rows + depth - 1) / depth;
  const int64_t most = steps / kPatchEmbedMinStepsPerSplit;
  if (splits > most) splits = most;
  if (splits > kPatchEmbedMaxSplits) splits = kPatchEmbedMaxSplits;
  if (splits < 1) splits = 1;
  const int64_t steps_per_split = (steps + splits - 1) / splits;
  p.rows_per_split = (steps_per_split > 0 ? steps_per_split : 1) * depth;
  p.num_splits = rows > 0 ? (rows + p.rows_per_split - 1) / p.rows_per_split : 1;
}

// Floats of workspace the backward launch needs.
inline int64_t patch_embed_bwd_workspace_floats(const PatchEmbedBwdParams& p) {
  const int64_t token_blocks =
      (p.tokens + kPatchEmbedTokensPerBlock - 1) / kPatchEmbedTokensPerBlock;
  return p.num_splits * p.dim * p.image.features + token_blocks * p.dim;
}

// Each returns 0 on success, else a cudaError_t value (the emulator uses the same codes):
// cudaErrorInvalidValue for an unsupported dtype, inconsistent sizes or a missing workspace.
namespace cuda {
int launch_patch_embed_fwd(const PatchEmbedParams& params, void* stream);
int launch_patch_embed_bwd(const PatchEmbedBwdParams& params, void* stream);
}  // namespace cuda
namespace sim {
int launch_patch_embed_fwd(const PatchEmbedParams& params, void* stream);
int launch_patch_embed_bwd(const PatchEmbedBwdParams& params, void* stream);
// The emulator's message for a failed launch of this host thread, else CUDA's text for `status`.
const char* patch_embed_error_string(int status);
}  // namespace sim

}  // namespace vlmk
