// Torch glue of the perceiver_attention CUDA kernels (cuda and cuda_sim backends): the entry
// points, and the tensor checks, output allocation and params they share. The Python op has
// already validated; these checks guard direct callers of vlm_kernels._C.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "cuda/perceiver_attention.h"
#include "torch/image_text_attention_gpu.h"

namespace vlmk {

// Forward of perceiver_attention (DESIGN §3.4) on the CUDA kernels:
//   q [B, Nl, Hq, Dh], k_media/v_media [B, Nm, Hkv, Dh], k_latents/v_latents [B, Nl, Hkv, Dh]
//   (float32/float16/bfloat16, stride(-1) == 1, Dh in {64, 80, 96, 128}), media_padding_mask
//   [B, Nm] bool or None -> (out [B, Nl, Hq, Dh] contiguous in q's dtype, lse [B, Hq, Nl] float32).
// cuda_sim runs the same kernels on CPU tensors through the SIMT emulator.
std::tuple<at::Tensor, at::Tensor> perceiver_attention_fwd_cuda_sim(
    const at::Tensor& q, const at::Tensor& k_media, const at::Tensor& v_media,
    const at::Tensor& k_latents, const at::Tensor& v_latents,
    const std::optional<at::Tensor>& media_padding_mask, double scale);
// Backward: grad_out and out [B, Nl, Hq, Dh] (q's dtype, stride(-1) == 1), lse [B, Hq, Nl] float32
// (the forward's) -> (dq, dk_media, dv_media, dk_latents, dv_latents), contiguous, q's dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
perceiver_attention_bwd_cuda_sim(const at::Tensor& grad_out, const at::Tensor& q,
                                 const at::Tensor& k_media, const at::Tensor& v_media,
                                 const at::Tensor& k_latents, const at::Tensor& v_latents,
                                 const std::optional<at::Tensor>& media_padding_mask,
                                 const at::Tensor& out, const at::Tensor& lse, double scale);
#if defined(VLMK_WITH_CUDA)
std::tuple<at::Tensor, at::Tensor> perceiver_attention_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k_media, const at::Tensor& v_media,
    const at::Tensor& k_latents, const at::Tensor& v_latents,
    const std::optional<at::Tensor>& media_padding_mask, double scale);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> perceiver_attention_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k_media,
    const at::Tensor& v_media, const at::Tensor& k_latents, const at::Tensor& v_latents,
    const std::optional<at::Tensor>& media_padding_mask, const at::Tensor& out,
    const at::Tensor& lse, double scale);
#endif

// Checks q, the four key/value tensors and the mask, and fills the params' input fields.
inline PerceiverAttentionParams perceiver_attention_input_params(
    const char* what, const at::Tensor& q, const at::Tensor& k_media, const at::Tensor& v_media,
    const at::Tensor& k_latents, const at::Tensor& v_latents,
    const std::optional<at::Tensor>& media_padding_mask, double scale) {
  TORCH_CHECK(q.dim() == 4, what, ": q must be [B, Nl, Hq, Dh], got shape ", q.sizes());
  const int64_t batch = q.size(0), num_latents = q.size(1), heads_q = q.size(2);
  const int64_t head_dim = q.size(3);
  TORCH_CHECK(k_media.dim() == 4 && k_media.size(0) == batch && k_media.size(3) == head_dim, what,
              ": k_media must be [B, Nm, Hkv, Dh] with q's B and Dh (q ", q.sizes(), "), got ",
              k_media.sizes());
  const int64_t num_media = k_media.size(1), heads_kv = k_media.size(2);
  TORCH_CHECK(v_media.sizes() == k_media.sizes(), what, ": v_media must have k_media's shape ",
              k_media.sizes(), ", got ", v_media.sizes());
  const std::vector<int64_t> latent_shape = {batch, num_latents, heads_kv, head_dim};
  TORCH_CHECK(k_latents.sizes() == at::IntArrayRef(latent_shape) &&
                  v_latents.sizes() == at::IntArrayRef(latent_shape),
              what, ": k_latents and v_latents must be [B, Nl, Hkv, Dh] = ", latent_shape, ", got ",
              k_latents.sizes(), " and ", v_latents.sizes());
  for (const at::Tensor* t : {&k_media, &v_media, &k_latents, &v_latents}) {
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), what,
                ": q, k_media, v_media, k_latents and v_latents must share a dtype, got ",
                q.scalar_type(), " and ", t->scalar_type());
    TORCH_CHECK(t->device() == q.device(), what, ": every input must be on q's device ", q.device(),
                ", got ", t->device());
  }
  TORCH_CHECK(perceiver_attention_head_dim_supported(head_dim), what,
              ": head dim Dh must be 64, 80, 96 or 128, got ", head_dim);
  TORCH_CHECK(heads_kv > 0 && heads_q % heads_kv == 0, what, ": Hq=", heads_q, " (q ", q.sizes(),
              ") must be a multiple of Hkv=", heads_kv, " (k_media ", k_media.sizes(), ")");
  TORCH_CHECK(num_latents * heads_q <= (int64_t{1} << 30) && num_media <= (int64_t{1} << 30), what,
              ": the CUDA kernels index Nl * Hq and Nm in int (limit 2^30), got Nl * Hq = ",
              num_latents * heads_q, " and Nm = ", num_media);
  TORCH_CHECK(batch <= 65535 && heads_q <= 65535, what,
              ": B and Hq must be at most 65535 (grid dims), got ", batch, " and ", heads_q);
  TORCH_CHECK(q.stride(3) == 1 && k_media.stride(3) == 1 && v_media.stride(3) == 1 &&
                  k_latents.stride(3) == 1 && v_latents.stride(3) == 1,
              what, ": q, k_media, v_media, k_latents and v_latents need a contiguous last dim");

  PerceiverAttentionParams p{};
  p.dtype = image_text_attention_dtype(q.scalar_type());
  if (media_padding_mask.has_value()) {
    const at::Tensor& mask = *media_padding_mask;
    TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 2 && mask.size(0) == batch &&
                    mask.size(1) == num_media,
                what, ": media_padding_mask must be bool [B, Nm] = [", batch, ", ", num_media,
                "], got ", mask.scalar_type(), " ", mask.sizes());
    TORCH_CHECK(mask.device() == q.device(), what, ": media_padding_mask must be on q's device ",
                q.device(), ", got ", mask.device());
    p.media_padding_mask = reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>());
    p.mask_stride_batch = mask.stride(0);
    p.mask_stride_token = mask.stride(1);
  }
  p.q = q.data_ptr();
  p.k_media = k_media.data_ptr();
  p.v_media = v_media.data_ptr();
  p.k_latents = k_latents.data_ptr();
  p.v_latents = v_latents.data_ptr();
  p.q_stride_batch = q.stride(0);
  p.q_stride_token = q.stride(1);
  p.q_stride_head = q.stride(2);
  p.k_media_stride_batch = k_media.stride(0);
  p.k_media_stride_token = k_media.stride(1);
  p.k_media_stride_head = k_media.stride(2);
  p.v_media_stride_batch = v_media.stride(0);
  p.v_media_stride_token = v_media.stride(1);
  p.v_media_stride_head = v_media.stride(2);
  p.k_latents_stride_batch = k_latents.stride(0);
  p.k_latents_stride_token = k_latents.stride(1);
  p.k_latents_stride_head = k_latents.stride(2);
  p.v_latents_stride_batch = v_latents.stride(0);
  p.v_latents_stride_token = v_latents.stride(1);
  p.v_latents_stride_head = v_latents.stride(2);
  p.batch = batch;
  p.num_latents = num_latents;
  p.num_media = num_media;
  p.heads_q = heads_q;
  p.heads_kv = heads_kv;
  p.head_dim = head_dim;
  p.scale = static_cast<float>(scale);
  return p;
}

// Outputs and params of one forward call; `launch` false: empty input, out / lse are final.
struct PerceiverAttentionLaunch {
  at::Tensor out, lse;
  bool launch = true;
  PerceiverAttentionParams params{};
};

inline PerceiverAttentionLaunch prepare_perceiver_attention(
    const at::Tensor& q, const at::Tensor& k_media, const at::Tensor& v_media,
    const at::Tensor& k_latents, const at::Tensor& v_latents,
    const std::optional<at::Tensor>& media_padding_mask, double scale) {
  PerceiverAttentionLaunch l;
  l.params = perceiver_attention_input_params("perceiver_attention", q, k_media, v_media, k_latents,
                                              v_latents, media_padding_mask, scale);
  l.out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  l.lse = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  l.launch = q.numel() > 0;
  l.params.out = l.out.data_ptr();
  l.params.lse = l.lse.data_ptr<float>();
  return l;
}

// Outputs, the tensors the launch reads (kept alive until it is queued) and params of one
// backward call; `launch` false: empty input, the gradients are final.
struct PerceiverAttentionBwdLaunch {
  at::Tensor dq, dk_media, dv_media, dk_latents, dv_latents, delta, lse;
  bool launch = true;
  PerceiverAttentionParams params{};
};

inline PerceiverAttentionBwdLaunch prepare_perceiver_attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k_media,
    const at::Tensor& v_media, const at::Tensor& k_latents, const at::Tensor& v_latents,
    const std::optional<at::Tensor>& media_padding_mask, const at::Tensor& out,
    const at::Tensor& lse, double scale) {
  PerceiverAttentionBwdLaunch l;
  PerceiverAttentionParams& p = l.params;
  p = perceiver_attention_input_params("perceiver_attention backward", q, k_media, v_media,
                                       k_latents, v_latents, media_padding_mask, scale);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(),
              "perceiver_attention backward: grad_out and out must have q's shape ", q.sizes(),
              ", got ", grad_out.sizes(), " and ", out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
              "perceiver_attention backward: grad_out and out must have q's dtype ",
              q.scalar_type(), ", got ", grad_out.scalar_type(), " and ", out.scalar_type());
  TORCH_CHECK(grad_out.stride(3) == 1 && out.stride(3) == 1,
              "perceiver_attention backward: grad_out and out need a contiguous last dim, got "
              "strides ",
              grad_out.strides(), " and ", out.strides());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(2) &&
                  lse.size(2) == q.size(1) && lse.scalar_type() == at::kFloat,
              "perceiver_attention backward: lse must be float32 [B, Hq, Nl], got ",
              lse.scalar_type(), " ", lse.sizes());
  TORCH_CHECK(
      grad_out.device() == q.device() && out.device() == q.device() && lse.device() == q.device(),
      "perceiver_attention backward: grad_out, out and lse must be on q's device ", q.device());
  const auto contiguous = at::MemoryFormat::Contiguous;
  l.dq = at::empty(q.sizes(), q.options().memory_format(contiguous));
  l.dk_media = at::empty(k_media.sizes(), k_media.options().memory_format(contiguous));
  l.dv_media = at::empty(k_media.sizes(), k_media.options().memory_format(contiguous));
  l.dk_latents = at::empty(k_latents.sizes(), k_latents.options().memory_format(contiguous));
  l.dv_latents = at::empty(k_latents.sizes(), k_latents.options().memory_format(contiguous));
  if (q.numel() == 0) {  // no query: nothing attends, every key gradient is 0
    l.dk_media.zero_();
    l.dv_media.zero_();
    l.dk_latents.zero_();
    l.dv_latents.zero_();
    l.launch = false;
    return l;
  }
  l.lse = lse.contiguous();
  l.delta = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  p.grad_out = grad_out.data_ptr();
  p.fwd_out = out.data_ptr();
  p.lse = l.lse.data_ptr<float>();
  p.delta = l.delta.data_ptr<float>();
  p.dq = l.dq.data_ptr();
  p.dk_media = l.dk_media.data_ptr();
  p.dv_media = l.dv_media.data_ptr();
  p.dk_latents = l.dk_latents.data_ptr();
  p.dv_latents = l.dv_latents.data_ptr();
  p.grad_stride_batch = grad_out.stride(0);
  p.grad_stride_token = grad_out.stride(1);
  p.grad_stride_head = grad_out.stride(2);
  p.out_stride_batch = out.stride(0);
  p.out_stride_token = out.stride(1);
  p.out_stride_head = out.stride(2);
  return l;
}

}  // namespace vlmk
