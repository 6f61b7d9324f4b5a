// Torch glue of the image_text_attention CUDA kernels: the entry points (cuda and cuda_sim
// backends) and the tensor checks, output/workspace allocation and params they share. The Python
// op has already validated; these checks guard direct callers of vlm_kernels._C.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "cuda/image_text_attention.h"

namespace vlmk {

// Forward of image_text_attention (DESIGN §3.3) on the CUDA kernels:
//   q [B, Lq, Hq, Dh], k/v [B, Lk, Hkv, Dh] (float32/float16/bfloat16, stride(-1) == 1, Dh in
//   {64, 80, 96, 128}), media_mask [B, Lq, M] bool, Lk == M * media_len
//   -> (out [B, Lq, Hq, Dh] contiguous in q's dtype, lse [B, Hq, Lq] float32 contiguous).
// uniform: rows that see no chunk attend to all keys (empty_rows="uniform"), else they give 0 and
// lse -inf. cuda_sim runs the same kernels on CPU tensors through the SIMT emulator.
std::tuple<at::Tensor, at::Tensor> image_text_attention_fwd_cuda_sim(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& media_mask,
    int64_t media_len, double scale, bool uniform);
#if defined(VLMK_WITH_CUDA)
std::tuple<at::Tensor, at::Tensor> image_text_attention_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& media_mask,
    int64_t media_len, double scale, bool uniform);
#endif

// Outputs, decode workspace and kernel params of one forward call.
struct ImageTextAttentionLaunch {
  at::Tensor out;
  at::Tensor lse;
  at::Tensor workspace;  // decode partials (undefined when the plan needs none)
  ImageTextAttentionParams params;
};

inline ImageTextAttentionDtype image_text_attention_dtype(at::ScalarType type) {
  switch (type) {
    case at::kFloat:
      return ImageTextAttentionDtype::kFloat32;
    case at::kHalf:
      return ImageTextAttentionDtype::kFloat16;
    case at::kBFloat16:
      return ImageTextAttentionDtype::kBFloat16;
    default:
      TORCH_CHECK(false, "image_text_attention: q must be float32, float16 or bfloat16, got ",
                  type);
  }
}

// Checks the arguments, allocates out/lse (and the decode workspace for `num_sms`
// multiprocessors) on q's device and fills the params.
inline ImageTextAttentionLaunch prepare_image_text_attention(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& media_mask,
    int64_t media_len, double scale, bool uniform, int num_sms) {
  TORCH_CHECK(q.dim() == 4, "image_text_attention: q must be [B, Lq, Hq, Dh], got shape ",
              q.sizes());
  TORCH_CHECK(k.dim() == 4, "image_text_attention: k must be [B, Lk, Hkv, Dh], got shape ",
              k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), "image_text_attention: v must have k's shape ", k.sizes(),
              ", got ", v.sizes());
  const int64_t batch = q.size(0), query_len = q.size(1), heads_q = q.size(2);
  const int64_t head_dim = q.size(3);
  const int64_t key_len = k.size(1), heads_kv = k.size(2);
  TORCH_CHECK(k.size(0) == batch && k.size(3) == head_dim,
              "image_text_attention: k must be [B, Lk, Hkv, Dh] with q's B and Dh (q ", q.sizes(),
              "), got ", k.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "image_text_attention: q, k and v must share a dtype, got ", q.scalar_type(), ", ",
              k.scalar_type(), ", ", v.scalar_type());
  const ImageTextAttentionDtype dtype = image_text_attention_dtype(q.scalar_type());
  TORCH_CHECK(image_text_attention_head_dim_supported(head_dim),
              "image_text_attention: head dim Dh must be 64, 80, 96 or 128, got ", head_dim);
  TORCH_CHECK(heads_kv > 0 && heads_q % heads_kv == 0, "image_text_attention: Hq=", heads_q, " (q ",
              q.sizes(), ") must be a multiple of Hkv=", heads_kv, " (k ", k.sizes(), ")");
  TORCH_CHECK(
      media_mask.dim() == 3 && media_mask.size(0) == batch && media_mask.size(1) == query_len,
      "image_text_attention: media_mask must be [B, Lq, M] = [", batch, ", ", query_len,
      ", M], got ", media_mask.sizes());
  TORCH_CHECK(media_mask.scalar_type() == at::kBool,
              "image_text_attention: media_mask must be bool, got ", media_mask.scalar_type());
  TORCH_CHECK(media_len >= 1, "image_text_attention: media_len must be >= 1, got ", media_len);
  const int64_t num_chunks = media_mask.size(2);
  TORCH_CHECK(key_len == num_chunks * media_len, "image_text_attention: k has Lk=", key_len,
              " keys but media_mask has M=", num_chunks, " chunks of media_len=", media_len);
  TORCH_CHECK(query_len * heads_q <= (int64_t{1} << 30) && key_len <= (int64_t{1} << 30),
              "image_text_attention: the CUDA kernels index Lq * Hq and Lk in int; got Lq * Hq = ",
              query_len * heads_q, " and Lk = ", key_len, " (limit 2^30)");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
              "image_text_attention: q, k and v need a contiguous last dim, got strides ",
              q.strides(), ", ", k.strides(), ", ", v.strides());
  TORCH_CHECK(
      k.device() == q.device() && v.device() == q.device() && media_mask.device() == q.device(),
      "image_text_attention: q, k, v and media_mask must be on one device, got ", q.device(), ", ",
      k.device(), ", ", v.device(), ", ", media_mask.device());

  ImageTextAttentionLaunch launch;
  launch.out = at::empty({batch, query_len, heads_q, head_dim}, q.options());
  launch.lse = at::empty({batch, heads_q, query_len}, q.options().dtype(at::kFloat));
  ImageTextAttentionParams& p = launch.params;
  p = ImageTextAttentionParams{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.media_mask = reinterpret_cast<const uint8_t*>(media_mask.data_ptr<bool>());
  p.out = launch.out.data_ptr();
  p.lse = launch.lse.data_ptr<float>();
  p.q_stride_batch = q.stride(0);
  p.q_stride_query = q.stride(1);
  p.q_stride_head = q.stride(2);
  p.q_stride_dim = q.stride(3);
  p.k_stride_batch = k.stride(0);
  p.k_stride_key = k.stride(1);
  p.k_stride_head = k.stride(2);
  p.k_stride_dim = k.stride(3);
  p.v_stride_batch = v.stride(0);
  p.v_stride_key = v.stride(1);
  p.v_stride_head = v.stride(2);
  p.v_stride_dim = v.stride(3);
  p.mask_stride_batch = media_mask.stride(0);
  p.mask_stride_query = media_mask.stride(1);
  p.mask_stride_chunk = media_mask.stride(2);
  p.batch = batch;
  p.query_len = query_len;
  p.key_len = key_len;
  p.heads_q = heads_q;
  p.heads_kv = heads_kv;
  p.head_dim = head_dim;
  p.num_chunks = num_chunks;
  p.media_len = media_len;
  p.scale = static_cast<float>(scale);
  p.uniform = uniform;
  p.dtype = dtype;
  plan_image_text_attention_decode(p, num_sms);
  const int64_t workspace_floats = image_text_attention_workspace_floats(p);
  if (workspace_floats > 0) {
    launch.workspace = at::empty({workspace_floats}, q.options().dtype(at::kFloat));
    p.partial_out = launch.workspace.data_ptr<float>();
    p.partial_lse = p.partial_out + batch * query_len * heads_q * p.num_splits * head_dim;
  }
  return launch;
}

}  // namespace vlmk
