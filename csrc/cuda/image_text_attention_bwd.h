// image_text_attention backward, CUDA kernels (FA2-style on tensor cores): dq, dk, dv of
//
//   out = softmax(scale * q k^T over the visible keys) v          (semantics:
//   image_text_attention.h)
//
// for the output cotangent grad_out, given the forward's out and lse (natural log, -inf on rows
// that see nothing). Three kernels, launched in order by launch_image_text_attention_bwd:
//   preprocess  delta = rowsum(grad_out * out)                       [B, Hq, Lq] float32
//   dk/dv       a block owns kImageTextAttentionBwdBlockN keys of one media chunk and one kv head
//               and walks the query blocks that see the chunk (the transposed schedule qb_*) times
//               the query heads of the kv group: GQA sums in registers, no atomics (deterministic)
//   dq          a block owns kImageTextAttentionBwdDqBlockM query rows of one query head and walks
//               the key tiles of the chunks its rows see (the forward's schedule chunk_*)
// The caller applies the empty-row rule to media_mask (empty_rows="uniform": a row that sees no
// chunk sees every chunk) and builds both schedules from that mask; the kernels know one rule:
// a row contributes only to the keys of the chunks its mask row marks, a row that sees nothing
// gets dq = 0 and adds nothing to dk/dv.
//
// Torch-free: shared by the CUDA build, the emulator build (namespace sim) and the torch glue.
#pragma once

#include <cstdint>

#include "cuda/image_text_attention.h"

namespace vlmk {

constexpr int kImageTextAttentionBwdBlockN = 64;      // keys per dk/dv block
constexpr int kImageTextAttentionBwdDkdvBlockM = 32;  // query rows per dk/dv step (its schedule)
constexpr int kImageTextAttentionBwdDqBlockM = 64;    // query rows per dq block (its schedule)

struct ImageTextAttentionBwdParams {
  const void* q;              // [B, Lq, Hq, Dh] of `dtype`, any strides, stride of Dh == 1
  const void* k;              // [B, Lk, Hkv, Dh] of `dtype`, any strides, stride of Dh == 1
  const void* v;              // [B, Lk, Hkv, Dh] of `dtype`, any strides, stride of Dh == 1
  const void* out;            // [B, Lq, Hq, Dh] of `dtype`, any strides, stride of Dh == 1
  const void* grad_out;       // [B, Lq, Hq, Dh] of `dtype`, any strides, stride of Dh == 1
  const float* lse;           // [B, Hq, Lq], contiguous, natural log
  const uint8_t* media_mask;  // [B, Lq, M] bool as bytes, any strides, empty-row rule applied
  // Forward schedule for the dq pass (block of kImageTextAttentionBwdDqBlockM rows):
  const int32_t* chunk_count;  // [B, nQB_dq], contiguous
  const int32_t* chunk_ids;    // [B, nQB_dq, M], contiguous, ascending
  // Transposed schedule for the dk/dv pass (query blocks of kImageTextAttentionBwdDkdvBlockM):
  const int32_t* qb_count;  // [B, M], contiguous: query blocks that see each chunk
  const int32_t* qb_ids;    // [B, M, nQB_dkdv], contiguous, ascending
  float* delta;             // [B, Hq, Lq] workspace, contiguous
  void* dq;                 // [B, Lq, Hq, Dh] of `dtype`, contiguous
  void* dk;                 // [B, Lk, Hkv, Dh] of `dtype`, contiguous
  void* dv;                 // [B, Lk, Hkv, Dh] of `dtype`, contiguous

  int64_t q_stride_batch, q_stride_query, q_stride_head;  // element strides
  int64_t k_stride_batch, k_stride_key, k_stride_head;
  int64_t v_stride_batch, v_stride_key, v_stride_head;
  int64_t out_stride_batch, out_stride_query, out_stride_head;
  int64_t grad_stride_batch, grad_stride_query, grad_stride_head;
  int64_t mask_stride_batch, mask_stride_query, mask_stride_chunk;

  int64_t batch;                  // B
  int64_t query_len;              // Lq
  int64_t key_len;                // Lk == num_chunks * media_len
  int64_t heads_q;                // Hq
  int64_t heads_kv;               // Hkv, divides Hq
  int64_t head_dim;               // Dh, one of 64, 80, 96, 128
  int64_t num_chunks;             // M
  int64_t media_len;              // keys per chunk, >= 1
  int64_t num_query_blocks_dq;    // ceil(Lq / kImageTextAttentionBwdDqBlockM)
  int64_t num_query_blocks_dkdv;  // ceil(Lq / kImageTextAttentionBwdDkdvBlockM)
  float scale;
  ImageTextAttentionDtype dtype;  // of q, k, v, out, grad_out, dq, dk, dv
};

// Each returns 0 on success, else a cudaError_t value (the emulator uses the same codes):
// cudaErrorInvalidValue for an unsupported dtype / head dim, Lq * Hq or Lk above 2^30, or empty
// sizes (the glue handles empty inputs itself).
namespace cuda {
int launch_image_text_attention_bwd(const ImageTextAttentionBwdParams& params, void* stream);
}  // namespace cuda
namespace sim {
int launch_image_text_attention_bwd(const ImageTextAttentionBwdParams& params, void* stream);
// The emulator's message for this host thread's last failed launch, else CUDA's text.
const char* image_text_attention_bwd_error_string(int status);
}  // namespace sim

}  // namespace vlmk
