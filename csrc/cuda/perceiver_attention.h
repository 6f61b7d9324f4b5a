// perceiver_attention, CUDA kernels (forward and backward): Perceiver-resampler latents attend to
// [media tokens ; latents], the two key/value segments read in place (no concat).
//
//   q [B, Nl, Hq, Dh], k_media/v_media [B, Nm, Hkv, Dh], k_latents/v_latents [B, Nl, Hkv, Dh]
//   (Hq % Hkv == 0), media_padding_mask [B, Nm] bool (True = real token; null = all real).
//   out [B, Nl, Hq, Dh] (contiguous, q's dtype) = softmax(scale * q [k_media ; k_latents]^T,
//   padded media tokens excluded) [v_media ; v_latents];
//   lse [B, Hq, Nl] (contiguous, float32) = log sum_j exp(scale * q k_j) over the visible keys.
// The latent keys are always visible, so no row is empty: a media item that is all padding leaves
// its latents attending to themselves only. Softmax in float32; GQA/MQA.
//
// Kernels (FA2-style on tensor cores, tile steps shared with image_text_attention in
// attention_tiles.cuh), in perceiver_attention.cu and perceiver_attention_bwd.cu; the same source
// runs on the CPU through the SIMT emulator (namespace vlmk::sim, the cuda_sim backend).
//
// Torch-free: shared by the CUDA build, the emulator build and the torch glue.
#pragma once

#include <cstdint>

#include "cuda/image_text_attention.h"

namespace vlmk {

// The element types of the attention kernels (float32, float16, bfloat16), shared with
// image_text_attention so that both dispatch through image_text_attention_dispatch.cuh.
using PerceiverAttentionDtype = ImageTextAttentionDtype;

constexpr int kPerceiverAttentionBlockM = 64;     // query rows per forward / dq block
constexpr int kPerceiverAttentionBlockN = 32;     // keys per K/V tile of the forward / dq pass
constexpr int kPerceiverAttentionBwdBlockN = 64;  // keys per dk/dv block
constexpr int kPerceiverAttentionBwdBlockM = 32;  // query rows per dk/dv step

// Head dims with a compiled instantiation (those of the image_text_attention kernels).
inline bool perceiver_attention_head_dim_supported(int64_t head_dim) {
  return image_text_attention_head_dim_supported(head_dim);
}

struct PerceiverAttentionParams {
  const void* q;                      // [B, Nl, Hq, Dh] of `dtype`, any strides, stride of Dh == 1
  const void* k_media;                // [B, Nm, Hkv, Dh] of `dtype`, any strides, stride of Dh == 1
  const void* v_media;                // [B, Nm, Hkv, Dh]
  const void* k_latents;              // [B, Nl, Hkv, Dh]
  const void* v_latents;              // [B, Nl, Hkv, Dh]
  const uint8_t* media_padding_mask;  // [B, Nm] bool as bytes, any strides; null: all real
  void* out;                          // [B, Nl, Hq, Dh] of `dtype`, contiguous
  float* lse;                         // [B, Hq, Nl], contiguous, natural log

  // Backward only (null in the forward):
  const void* grad_out;  // [B, Nl, Hq, Dh] of `dtype`, any strides, stride of Dh == 1
  const void* fwd_out;   // the forward's out, [B, Nl, Hq, Dh], any strides, stride of Dh == 1
  float* delta;          // [B, Hq, Nl] workspace, contiguous
  void* dq;              // [B, Nl, Hq, Dh] of `dtype`, contiguous
  void* dk_media;        // [B, Nm, Hkv, Dh] of `dtype`, contiguous
  void* dv_media;        // [B, Nm, Hkv, Dh], contiguous
  void* dk_latents;      // [B, Nl, Hkv, Dh], contiguous
  void* dv_latents;      // [B, Nl, Hkv, Dh], contiguous

  // Element strides (batch, token, head) of each input; the stride of Dh is 1.
  int64_t q_stride_batch, q_stride_token, q_stride_head;
  int64_t k_media_stride_batch, k_media_stride_token, k_media_stride_head;
  int64_t v_media_stride_batch, v_media_stride_token, v_media_stride_head;
  int64_t k_latents_stride_batch, k_latents_stride_token, k_latents_stride_head;
  int64_t v_latents_stride_batch, v_latents_stride_token, v_latents_stride_head;
  int64_t grad_stride_batch, grad_stride_token, grad_stride_head;  // backward
  int64_t out_stride_batch, out_stride_token, out_stride_head;     // backward (fwd_out)
  int64_t mask_stride_batch, mask_stride_token;                    // media_padding_mask

  int64_t batch;                  // B
  int64_t num_latents;            // Nl >= 1
  int64_t num_media;              // Nm >= 0
  int64_t heads_q;                // Hq
  int64_t heads_kv;               // Hkv, divides Hq
  int64_t head_dim;               // Dh, one of 64, 80, 96, 128
  float scale;                    // softmax scale applied to q k^T
  PerceiverAttentionDtype dtype;  // element type of q, k/v, out (and the backward's tensors)
};

// Each returns 0 on success, else a cudaError_t value (the emulator uses the same codes):
// cudaErrorInvalidValue for an unsupported dtype / head dim, inconsistent or empty sizes (the glue
// handles empty inputs itself: B, Hq or Nl of 0), Nl * Hq or Nm above 2^30, or a missing pointer.
namespace cuda {
int launch_perceiver_attention_fwd(const PerceiverAttentionParams& params, void* stream);
int launch_perceiver_attention_bwd(const PerceiverAttentionParams& params, void* stream);
}  // namespace cuda
namespace sim {
int launch_perceiver_attention_fwd(const PerceiverAttentionParams& params, void* stream);
int launch_perceiver_attention_bwd(const PerceiverAttentionParams& params, void* stream);
// The emulator's message for this host thread's last failed launch, else CUDA's text.
const char* perceiver_attention_error_string(int status);
}  // namespace sim

}  // namespace vlmk
