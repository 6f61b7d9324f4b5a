// image_text_attention on the CPU: declarations of the forward and backward kernels (raw pointers
// and strides in; torch tensors stay in csrc/torch). Semantics: the reference,
// vlm_kernels/reference/image_text_attention.py.
//
//   q [B, Lq, Hq, Dh], k/v [B, Lk, Hkv, Dh] with Hq % Hkv == 0, media_mask [B, Lq, M]
//   Lk == M * media_len; query t of batch b may attend key j iff media_mask[b, t, j / media_len]
//   out [B, Lq, Hq, Dh] = softmax(scale q k^T) v over those keys, softmax in float32
//   lse [B, Hq, Lq]; a row that sees no chunk follows `empty_rows` (EmptyRows below)
#pragma once

#include <cstdint>

#include "cpu/attention_types.h"

namespace vlmk {

// What a row that sees no chunk computes (values match the Python glue's empty_rows codes).
enum class EmptyRows : int32_t {
  kZero = 0,     // out = 0, lse = -inf, no gradient (Meta / torchtune)
  kUniform = 1,  // attends to every key with its real scores (Hugging Face Mllama)
  kMean = 2,     // out = mean of all Lk values, lse = log(Lk); gradient to v only: dv[j] += dO / Lk
                 // (OpenFlamingo's all-previous-media mode fills the row's scores with one value)
};

struct ImageTextAttentionFwdParams {
  AttentionDtype dtype;
  const void* q;              // [B, Lq, Hq, Dh], strides below, last dim contiguous
  const void* k;              // [B, Lk, Hkv, Dh], strides below, last dim contiguous
  const void* v;              // [B, Lk, Hkv, Dh], strides below, last dim contiguous
  const uint8_t* media_mask;  // [B, Lq, M] bool, strides below
  void* out;                  // [B, Lq, Hq, Dh] contiguous
  float* lse;                 // [B, Hq, Lq] contiguous
  int64_t q_stride_batch;     // elements between q[b] and q[b + 1]
  int64_t q_stride_token;     // elements between q[b, t] and q[b, t + 1]
  int64_t q_stride_head;      // elements between q[b, t, h] and q[b, t, h + 1]
  int64_t k_stride_batch;     // the same three for k
  int64_t k_stride_token;
  int64_t k_stride_head;
  int64_t v_stride_batch;  // the same three for v
  int64_t v_stride_token;
  int64_t v_stride_head;
  int64_t mask_stride_batch;  // media_mask strides, in elements (bytes)
  int64_t mask_stride_query;
  int64_t mask_stride_chunk;
  int64_t batch;         // B
  int64_t query_len;     // Lq
  int64_t heads_q;       // Hq
  int64_t heads_kv;      // Hkv
  int64_t head_dim;      // Dh
  int64_t num_chunks;    // M
  int64_t media_len;     // keys per chunk; Lk = M * media_len
  float scale;           // softmax scale applied to q . k
  EmptyRows empty_rows;  // what rows that see no chunk compute
};

struct ImageTextAttentionBwdParams {
  AttentionDtype dtype;
  const void* grad_out;  // [B, Lq, Hq, Dh], strides below
  const void* q;         // as in the forward
  const void* k;
  const void* v;
  const uint8_t* media_mask;
  const void* out;   // [B, Lq, Hq, Dh], strides below (the forward's output)
  const float* lse;  // [B, Hq, Lq] contiguous (the forward's log-sum-exp)
  void* grad_q;      // [B, Lq, Hq, Dh] contiguous
  void* grad_k;      // [B, Lk, Hkv, Dh] contiguous
  void* grad_v;      // [B, Lk, Hkv, Dh] contiguous
  int64_t grad_out_stride_batch;
  int64_t grad_out_stride_token;
  int64_t grad_out_stride_head;
  int64_t out_stride_batch;
  int64_t out_stride_token;
  int64_t out_stride_head;
  int64_t q_stride_batch;
  int64_t q_stride_token;
  int64_t q_stride_head;
  int64_t k_stride_batch;
  int64_t k_stride_token;
  int64_t k_stride_head;
  int64_t v_stride_batch;
  int64_t v_stride_token;
  int64_t v_stride_head;
  int64_t mask_stride_batch;
  int64_t mask_stride_query;
  int64_t mask_stride_chunk;
  int64_t batch;
  int64_t query_len;
  int64_t heads_q;
  int64_t heads_kv;
  int64_t head_dim;
  int64_t num_chunks;
  int64_t media_len;
  float scale;
  EmptyRows empty_rows;
};

namespace cpu {

// True when this CPU runs the instruction set the kernels were compiled for (AVX-512 on x86-64).
bool image_text_attention_supported();

// Both expect non-empty sizes (B, Lq, Hq, Hkv, Dh, M, media_len >= 1); the glue handles empty ones.
void image_text_attention_fwd(const ImageTextAttentionFwdParams& params);
void image_text_attention_bwd(const ImageTextAttentionBwdParams& params);

}  // namespace cpu
}  // namespace vlmk
