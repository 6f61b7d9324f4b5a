// Torch glue of the perceiver_attention CPU kernels: checks (naming the tensor and its shape),
// output allocation, the empty-size paths, and dtype dispatch. float16 runs the float32 kernels on
// converted copies. The Python op validates first; these checks guard direct callers of
// vlm_kernels._C.
#include "torch/perceiver_attention_cpu.h"

#include <cmath>
#include <limits>
#include <vector>

#include "cpu/perceiver_attention.h"
#include "torch/attention_cpu_glue.h"

namespace vlmk {
namespace {

constexpr const char* kOp = "perceiver_attention (cpu): ";

void check_floating(const char* name, const at::Tensor& t) {
  attention_glue::check_floating(kOp, name, t);
}

struct Sizes {
  int64_t batch, num_latents, heads_q, head_dim, num_media, heads_kv;
};

Sizes check_inputs(const at::Tensor& q, const at::Tensor& k_media, const at::Tensor& v_media,
                   const at::Tensor& k_latents, const at::Tensor& v_latents,
                   const std::optional<at::Tensor>& media_padding_mask, double scale) {
  check_floating("q", q);
  check_floating("k_media", k_media);
  check_floating("v_media", v_media);
  check_floating("k_latents", k_latents);
  check_floating("v_latents", v_latents);
  for (const at::Tensor* t : {&k_media, &v_media, &k_latents, &v_latents}) {
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), kOp,
                "q, k_media, v_media, k_latents, v_latents must share a dtype, got q ",
                q.scalar_type(), " and ", t->scalar_type());
  }
  const Sizes s{q.size(0), q.size(1), q.size(2), q.size(3), k_media.size(1), k_media.size(2)};
  TORCH_CHECK(k_media.size(0) == s.batch && k_media.size(3) == s.head_dim, kOp,
              "k_media must be [B, Nm, Hkv, Dh] = [", s.batch, ", Nm, Hkv, ", s.head_dim,
              "] to match q ", q.sizes(), ", got ", k_media.sizes());
  TORCH_CHECK(v_media.sizes() == k_media.sizes(), kOp, "v_media must have k_media's shape ",
              k_media.sizes(), ", got ", v_media.sizes());
  const std::vector<int64_t> latent_shape{s.batch, s.num_latents, s.heads_kv, s.head_dim};
  TORCH_CHECK(k_latents.sizes() == at::IntArrayRef(latent_shape), kOp,
              "k_latents must be [B, Nl, Hkv, Dh] = ", latent_shape, ", got ", k_latents.sizes());
  TORCH_CHECK(v_latents.sizes() == at::IntArrayRef(latent_shape), kOp,
              "v_latents must be [B, Nl, Hkv, Dh] = ", latent_shape, ", got ", v_latents.sizes());
  TORCH_CHECK(s.heads_kv >= 1 && s.heads_q % s.heads_kv == 0, kOp, "Hq = ", s.heads_q,
              " (q) must be a multiple of Hkv = ", s.heads_kv, " (k_media) and Hkv >= 1");
  if (media_padding_mask.has_value()) {
    const at::Tensor& mask = *media_padding_mask;
    TORCH_CHECK(mask.device().is_cpu(), kOp, "media_padding_mask must be a CPU tensor, got one on ",
                mask.device());
    TORCH_CHECK(mask.scalar_type() == at::kBool, kOp, "media_padding_mask must be bool, got ",
                mask.scalar_type());
    TORCH_CHECK(mask.dim() == 2 && mask.size(0) == s.batch && mask.size(1) == s.num_media, kOp,
                "media_padding_mask must be [B, Nm] = [", s.batch, ", ", s.num_media, "], got ",
                mask.sizes());
  }
  TORCH_CHECK(std::isfinite(scale), kOp, "scale must be finite, got ", scale);
  TORCH_CHECK(cpu::perceiver_attention_supported(), kOp,
              "this CPU lacks AVX-512 (F, BW, VL, DQ), which the CPU kernels are built for; use "
              "backend=\"reference\"");
  return s;
}

using attention_glue::compute_view;
using attention_glue::kernel_dtype;
using attention_glue::runs_as_float32;

TokenStrides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

// The forward params of the (converted) inputs; out and lse left null.
PerceiverAttentionFwdParams make_params(const at::Tensor& q, const at::Tensor& k_media,
                                        const at::Tensor& v_media, const at::Tensor& k_latents,
                                        const at::Tensor& v_latents,
                                        const std::optional<at::Tensor>& media_padding_mask,
                                        const Sizes& s, double scale) {
  PerceiverAttentionFwdParams p{};
  p.dtype = kernel_dtype(q);
  p.q = q.const_data_ptr();
  p.k_media = k_media.const_data_ptr();
  p.v_media = v_media.const_data_ptr();
  p.k_latents = k_latents.const_data_ptr();
  p.v_latents = v_latents.const_data_ptr();
  if (media_padding_mask.has_value()) {
    p.media_padding_mask =
        reinterpret_cast<const uint8_t*>(media_padding_mask->const_data_ptr<bool>());
    p.mask_stride_batch = media_padding_mask->stride(0);
    p.mask_stride_token = media_padding_mask->stride(1);
  }
  p.q_strides = strides_of(q);
  p.k_media_strides = strides_of(k_media);
  p.v_media_strides = strides_of(v_media);
  p.k_latents_strides = strides_of(k_latents);
  p.v_latents_strides = strides_of(v_latents);
  p.batch = s.batch;
  p.num_latents = s.num_latents;
  p.num_media = s.num_media;
  p.heads_q = s.heads_q;
  p.heads_kv = s.heads_kv;
  p.head_dim = s.head_dim;
  p.scale = static_cast<float>(scale);
  return p;
}

}  // namespace

bool perceiver_attention_cpu_supported() { return cpu::perceiver_attention_supported(); }

std::tuple<at::Tensor, at::Tensor> perceiver_attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k_media, const at::Tensor& v_media,
    const at::Tensor& k_latents, const at::Tensor& v_latents,
    const std::optional<at::Tensor>& media_padding_mask, double scale) {
  const Sizes s =
      check_inputs(q, k_media, v_media, k_latents, v_latents, media_padding_mask, scale);
  at::Tensor out = at::empty({s.batch, s.num_latents, s.heads_q, s.head_dim}, q.options());
  at::Tensor lse = at::empty({s.batch, s.heads_q, s.num_latents}, q.options().dtype(at::kFloat));
  if (lse.numel() == 0) return {out, lse};
  if (s.head_dim == 0) {  // every score is 0: lse = log(#real media tokens + Nl)
    at::Tensor keys =
        media_padding_mask.has_value()
            ? media_padding_mask->sum(-1).to(at::kFloat) + s.num_latents
            : at::full({s.batch}, static_cast<double>(s.num_media + s.num_latents), lse.options());
    lse.copy_(at::log(keys).view({s.batch, 1, 1}).expand_as(lse));
    return {out, lse};
  }
  const at::Tensor qc = compute_view(q), kmc = compute_view(k_media), vmc = compute_view(v_media);
  const at::Tensor klc = compute_view(k_latents), vlc = compute_view(v_latents);
  at::Tensor out_c = runs_as_float32(q) ? at::empty(out.sizes(), qc.options()) : out;
  PerceiverAttentionFwdParams p = make_params(qc, kmc, vmc, klc, vlc, media_padding_mask, s, scale);
  p.out = out_c.data_ptr();
  p.lse = lse.data_ptr<float>();
  cpu::perceiver_attention_fwd(p);
  if (!out_c.is_same(out)) out.copy_(out_c);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> perceiver_attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k_media,
    const at::Tensor& v_media, const at::Tensor& k_latents, const at::Tensor& v_latents,
    const std::optional<at::Tensor>& media_padding_mask, const at::Tensor& out,
    const at::Tensor& lse, double scale) {
  const Sizes s =
      check_inputs(q, k_media, v_media, k_latents, v_latents, media_padding_mask, scale);
  check_floating("grad_out", grad_out);
  check_floating("out", out);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(), kOp, "grad_out ",
              grad_out.sizes(), " and out ", out.sizes(), " must have q's shape ", q.sizes());
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
              kOp, "grad_out (", grad_out.scalar_type(), ") and out (", out.scalar_type(),
              ") must have q's dtype ", q.scalar_type());
  TORCH_CHECK(lse.device().is_cpu() && lse.scalar_type() == at::kFloat &&
                  lse.sizes() == at::IntArrayRef({s.batch, s.heads_q, s.num_latents}),
              kOp, "lse must be a float32 CPU tensor [B, Hq, Nl] = [", s.batch, ", ", s.heads_q,
              ", ", s.num_latents, "], got ", lse.scalar_type(), " ", lse.sizes());
  // No query (Nl = 0 or B = 0) or no head dim: every gradient is 0.
  if (q.numel() == 0) {
    return {at::zeros(q.sizes(), q.options()), at::zeros(k_media.sizes(), k_media.options()),
            at::zeros(v_media.sizes(), v_media.options()),
            at::zeros(k_latents.sizes(), k_latents.options()),
            at::zeros(v_latents.sizes(), v_latents.options())};
  }
  const at::Tensor qc = compute_view(q), kmc = compute_view(k_media), vmc = compute_view(v_media);
  const at::Tensor klc = compute_view(k_latents), vlc = compute_view(v_latents);
  const at::Tensor grad_out_c = compute_view(grad_out), out_c = compute_view(out);
  const at::Tensor lse_c = lse.contiguous();
  at::Tensor dq = at::empty(qc.sizes(), qc.options());
  at::Tensor dk_media = at::empty(kmc.sizes(), kmc.options());
  at::Tensor dv_media = at::empty(vmc.sizes(), vmc.options());
  at::Tensor dk_latents = at::empty(klc.sizes(), klc.options());
  at::Tensor dv_latents = at::empty(vlc.sizes(), vlc.options());

  PerceiverAttentionBwdParams p{};
  p.fwd = make_params(qc, kmc, vmc, klc, vlc, media_padding_mask, s, scale);
  p.grad_out = grad_out_c.const_data_ptr();
  p.out = out_c.const_data_ptr();
  p.lse = lse_c.const_data_ptr<float>();
  p.grad_out_strides = strides_of(grad_out_c);
  p.out_strides = strides_of(out_c);
  p.grad_q = dq.data_ptr();
  p.grad_k_media = dk_media.data_ptr();
  p.grad_v_media = dv_media.data_ptr();
  p.grad_k_latents = dk_latents.data_ptr();
  p.grad_v_latents = dv_latents.data_ptr();
  cpu::perceiver_attention_bwd(p);
  if (runs_as_float32(q)) {
    const at::ScalarType dtype = q.scalar_type();
    return {dq.to(dtype), dk_media.to(dtype), dv_media.to(dtype), dk_latents.to(dtype),
            dv_latents.to(dtype)};
  }
  return {dq, dk_media, dv_media, dk_latents, dv_latents};
}

}  // namespace vlmk
