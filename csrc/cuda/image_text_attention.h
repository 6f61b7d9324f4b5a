// image_text_attention forward, CUDA kernels: text queries attend to media keys under a per-token
// media mask, doing only the visible work.
//
//   q [B, Lq, Hq, Dh], k/v [B, Lk, Hkv, Dh] (Hq % Hkv == 0), media_mask [B, Lq, M] bool,
//   Lk == M * media_len.  Query t of batch b sees key j iff media_mask[b, t, j / media_len].
//   out [B, Lq, Hq, Dh] (contiguous, q's dtype) = softmax(scale * q k^T over visible keys) v,
//   lse [B, Hq, Lq] (contiguous, float32) = log sum_j exp(scale * q k_j) over the visible keys.
//   A row that sees no key: out = 0, lse = -inf; with `uniform` a row that sees no chunk attends
//   to all Lk keys instead (Hugging Face Mllama). Softmax in float32; GQA/MQA.
//
// Two paths, chosen by the launcher, both FA2-style on tensor cores (mma.sync m16n8k16 for
// bf16/fp16, 3xTF32 m16n8k8 for float32): a prefill kernel (Lq >
// kImageTextAttentionDecodeMaxQueryLen) with one thread block per tile of 64 (query, head) rows,
// and a split-KV decode kernel whose blocks each take an even share of the *visible* key tiles of a
// kv head (every query row of the GQA group packed into the row tile), followed by a combine kernel
// when there is more than one split. Both visit only the media chunks that some query row of the
// block may see. Kernels and launcher: image_text_attention.cu; the same source runs on the CPU
// through the SIMT emulator (namespace vlmk::sim, csrc/sim/image_text_attention_sim.cpp).
//
// Torch-free: shared by the CUDA build, the emulator build and the torch glue.
#pragma once

#include <cstdint>

namespace vlmk {

enum class ImageTextAttentionDtype : int32_t {
  kFloat32 = 0,
  kFloat16 = 1,
  kBFloat16 = 2,
};

// Tile sizes the host needs for planning (the kernels use the same constants).
constexpr int kImageTextAttentionBlockN = 32;  // keys per K/V tile (16-bit types; float32: 8)
constexpr int kImageTextAttentionDecodeMaxQueryLen = 16;  // Lq <= this: split-KV decode path
constexpr int kImageTextAttentionMaxSplits = 256;         // most key splits of the decode path

// Head dims with a compiled instantiation.
inline bool image_text_attention_head_dim_supported(int64_t head_dim) {
  return head_dim == 64 || head_dim == 80 || head_dim == 96 || head_dim == 128;
}

struct ImageTextAttentionParams {
  const void* q;              // [B, Lq, Hq, Dh] of `dtype`, any strides, stride of Dh == 1
  const void* k;              // [B, Lk, Hkv, Dh] of `dtype`, any strides, stride of Dh == 1
  const void* v;              // [B, Lk, Hkv, Dh] of `dtype`, any strides, stride of Dh == 1
  const uint8_t* media_mask;  // [B, Lq, M], bool stored as one byte, any strides
  void* out;                  // [B, Lq, Hq, Dh] of `dtype`, contiguous
  float* lse;                 // [B, Hq, Lq], contiguous
  // Decode workspace (num_splits > 1 only, else null): per query row (b, t, h), flattened as
  // row = (b * Lq + t) * Hq + h, and per key split s.
  float* partial_out;  // [B * Lq * Hq, num_splits, Dh]: the split's softmax-normalized output
  float* partial_lse;  // [B * Lq * Hq, num_splits]: the split's log2-sum-exp2 (-inf if empty)

  int64_t q_stride_batch;  // element strides of q
  int64_t q_stride_query;
  int64_t q_stride_head;
  int64_t q_stride_dim;    // must be 1
  int64_t k_stride_batch;  // element strides of k
  int64_t k_stride_key;
  int64_t k_stride_head;
  int64_t k_stride_dim;    // must be 1
  int64_t v_stride_batch;  // element strides of v
  int64_t v_stride_key;
  int64_t v_stride_head;
  int64_t v_stride_dim;       // must be 1
  int64_t mask_stride_batch;  // element strides of media_mask
  int64_t mask_stride_query;
  int64_t mask_stride_chunk;

  int64_t batch;       // B
  int64_t query_len;   // Lq
  int64_t key_len;     // Lk == num_chunks * media_len
  int64_t heads_q;     // Hq
  int64_t heads_kv;    // Hkv, divides Hq
  int64_t head_dim;    // Dh, one of 64, 80, 96, 128
  int64_t num_chunks;  // M
  int64_t media_len;   // keys per media chunk, >= 1
  float scale;         // softmax scale applied to q k^T
  bool uniform;        // rows that see no chunk attend to all keys (else they output 0, lse -inf)
  ImageTextAttentionDtype dtype;  // element type of q, k, v and out

  // Decode path only (query_len <= kImageTextAttentionDecodeMaxQueryLen), set by
  // plan_image_text_attention_decode. A decode block counts the key tiles its rows can see (the
  // chunk schedule, no key is read for it) and split s takes tiles [s * T / S, (s + 1) * T / S) of
  // those T visible tiles, so the work is split evenly over the visible keys only; a split with no
  // tile writes an empty partial (lse -inf) that the combine ignores.
  int64_t num_splits;  // S >= 1; 1 writes out/lse directly, > 1 goes through the workspace
};

inline bool image_text_attention_uses_decode(const ImageTextAttentionParams& p) {
  return p.query_len <= kImageTextAttentionDecodeMaxQueryLen;
}

// Chooses num_splits for the decode path so that the grid (splits x Hkv x B) fills about two
// waves of `num_sms` multiprocessors, capped by the key tiles (at most one split per tile of 32
// keys). The mask lives on the device, so the host bounds the visible work by Lk; each block then
// splits the tiles its rows actually see (min(S, visible tiles) splits do work, the others exit
// after the schedule scan). Sets 1 split on the prefill path. The caller then allocates
// image_text_attention_workspace_floats() floats.
inline void plan_image_text_attention_decode(ImageTextAttentionParams& p, int num_sms) {
  const int64_t tile = kImageTextAttentionBlockN;
  const int64_t key_tiles = (p.key_len + tile - 1) / tile;
  p.num_splits = 1;
  if (!image_text_attention_uses_decode(p) || key_tiles <= 1) return;
  const int64_t blocks = p.batch * p.heads_kv;
  int64_t splits = blocks > 0 ? (2 * static_cast<int64_t>(num_sms) + blocks - 1) / blocks : 1;
  if (splits > key_tiles) splits = key_tiles;
  if (splits > kImageTextAttentionMaxSplits) splits = kImageTextAttentionMaxSplits;
  if (splits < 1) splits = 1;
  p.num_splits = splits;
}

// Floats of decode workspace the launch needs (partial_out then partial_lse); 0 when none.
inline int64_t image_text_attention_workspace_floats(const ImageTextAttentionParams& p) {
  if (!image_text_attention_uses_decode(p) || p.num_splits <= 1) return 0;
  return p.batch * p.query_len * p.heads_q * p.num_splits * (p.head_dim + 1);
}

// Each returns 0 on success, else a cudaError_t value (the emulator uses the same codes):
// cudaErrorInvalidValue for an unsupported dtype / head dim, a stride of Dh other than 1,
// inconsistent sizes, Lq * Hq or Lk above 2^30 (the kernels index them in int), or a decode plan
// without its workspace.
namespace cuda {
int launch_image_text_attention_fwd(const ImageTextAttentionParams& params, void* stream);
}  // namespace cuda
namespace sim {
int launch_image_text_attention_fwd(const ImageTextAttentionParams& params, void* stream);
// The emulator's message for a failed launch of this host thread (names the kernel, block and
// source line of a deadlock or trap), else CUDA's text for `status`.
const char* image_text_attention_error_string(int status);
}  // namespace sim

}  // namespace vlmk
