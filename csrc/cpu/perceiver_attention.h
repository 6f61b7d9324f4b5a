// perceiver_attention on the CPU: declarations of the forward and backward kernels (raw pointers
// and strides in; torch tensors stay in csrc/torch). Semantics: the reference,
// vlm_kernels/reference/perceiver_attention.py.
//
//   q [B, Nl, Hq, Dh], k_media/v_media [B, Nm, Hkv, Dh], k_latents/v_latents [B, Nl, Hkv, Dh],
//   Hq % Hkv == 0, media_padding_mask [B, Nm] bool (true = real token; absent = all real)
//   keys/values are the two segments [media ; latents], read in place (never concatenated)
//   out [B, Nl, Hq, Dh] = softmax(scale q K^T over the real media tokens and every latent) V,
//   softmax in float32; lse [B, Hq, Nl]. The latents are always visible, so no row is empty: an
//   item whose media is all padding attends to its latents only.
#pragma once

#include <cstdint>

#include "cpu/attention_types.h"

namespace vlmk {

struct PerceiverAttentionFwdParams {
  AttentionDtype dtype;
  const void* q;                      // [B, Nl, Hq, Dh], strides below
  const void* k_media;                // [B, Nm, Hkv, Dh], strides below
  const void* v_media;                // [B, Nm, Hkv, Dh], strides below
  const void* k_latents;              // [B, Nl, Hkv, Dh], strides below
  const void* v_latents;              // [B, Nl, Hkv, Dh], strides below
  const uint8_t* media_padding_mask;  // [B, Nm] bool, 1 = real token; nullptr: every token real
  void* out;                          // [B, Nl, Hq, Dh] contiguous
  float* lse;                         // [B, Hq, Nl] contiguous
  TokenStrides q_strides;             // in elements; last dims contiguous
  TokenStrides k_media_strides;
  TokenStrides v_media_strides;
  TokenStrides k_latents_strides;
  TokenStrides v_latents_strides;
  int64_t mask_stride_batch;  // media_padding_mask strides, in elements (bytes)
  int64_t mask_stride_token;
  int64_t batch;        // B
  int64_t num_latents;  // Nl: queries, and keys of the latent segment
  int64_t num_media;    // Nm: keys of the media segment
  int64_t heads_q;      // Hq
  int64_t heads_kv;     // Hkv
  int64_t head_dim;     // Dh
  float scale;          // softmax scale applied to q . k
};

struct PerceiverAttentionBwdParams {
  PerceiverAttentionFwdParams fwd;  // the forward's inputs (its out / lse fields are unused)
  const void* grad_out;             // [B, Nl, Hq, Dh], strides below
  const void* out;                  // [B, Nl, Hq, Dh], strides below (the forward's output)
  const float* lse;                 // [B, Hq, Nl] contiguous (the forward's log-sum-exp)
  TokenStrides grad_out_strides;
  TokenStrides out_strides;
  void* grad_q;          // [B, Nl, Hq, Dh] contiguous
  void* grad_k_media;    // [B, Nm, Hkv, Dh] contiguous
  void* grad_v_media;    // [B, Nm, Hkv, Dh] contiguous
  void* grad_k_latents;  // [B, Nl, Hkv, Dh] contiguous
  void* grad_v_latents;  // [B, Nl, Hkv, Dh] contiguous
};

namespace cpu {

// True when this CPU runs the instruction set the kernels were compiled for (AVX-512 on x86-64).
bool perceiver_attention_supported();

// Both expect B, Nl, Hq, Hkv, Dh >= 1 (Nm may be 0); the glue handles empty sizes.
void perceiver_attention_fwd(const PerceiverAttentionFwdParams& params);
void perceiver_attention_bwd(const PerceiverAttentionBwdParams& params);

}  // namespace cpu
}  // namespace vlmk
