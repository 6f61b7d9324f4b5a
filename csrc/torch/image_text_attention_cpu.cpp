// Torch glue of the image_text_attention CPU kernels: checks (naming the tensor and its shape),
// output allocation, the empty-size paths, and dtype dispatch. float16 runs the float32 kernels on
// converted copies. The Python op validates first; these checks guard direct callers of
// vlm_kernels._C.
#include "torch/image_text_attention_cpu.h"

#include <cmath>
#include <limits>

#include "cpu/image_text_attention.h"
#include "torch/attention_cpu_glue.h"

namespace vlmk {
namespace {

constexpr const char* kOp = "image_text_attention (cpu): ";

void check_floating(const char* name, const at::Tensor& t) {
  attention_glue::check_floating(kOp, name, t);
}

// Sizes shared by the forward and the backward.
struct Sizes {
  int64_t batch, query_len, heads_q, head_dim, keys, heads_kv, chunks;
};

Sizes check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& media_mask, int64_t media_len, double scale) {
  check_floating("q", q);
  check_floating("k", k);
  check_floating("v", v);
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "image_text_attention (cpu): q, k, v must share a dtype, got ", q.scalar_type(), ", ",
              k.scalar_type(), ", ", v.scalar_type());
  const Sizes s{q.size(0), q.size(1), q.size(2), q.size(3), k.size(1), k.size(2), 0};
  TORCH_CHECK(k.size(0) == s.batch && k.size(3) == s.head_dim,
              "image_text_attention (cpu): k must be [B, Lk, Hkv, Dh] = [", s.batch, ", Lk, Hkv, ",
              s.head_dim, "] to match q ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), "image_text_attention (cpu): v must have k's shape ",
              k.sizes(), ", got ", v.sizes());
  TORCH_CHECK(s.heads_kv >= 1 && s.heads_q % s.heads_kv == 0,
              "image_text_attention (cpu): Hq = ", s.heads_q,
              " (q) must be a multiple of Hkv = ", s.heads_kv, " (k) and Hkv >= 1");
  TORCH_CHECK(media_mask.device().is_cpu(),
              "image_text_attention (cpu): media_mask must be a CPU tensor, got one on ",
              media_mask.device());
  TORCH_CHECK(media_mask.scalar_type() == at::kBool,
              "image_text_attention (cpu): media_mask must be bool, got ",
              media_mask.scalar_type());
  TORCH_CHECK(
      media_mask.dim() == 3 && media_mask.size(0) == s.batch && media_mask.size(1) == s.query_len,
      "image_text_attention (cpu): media_mask must be [B, Lq, M] = [", s.batch, ", ", s.query_len,
      ", M], got ", media_mask.sizes());
  TORCH_CHECK(media_len >= 1, "image_text_attention (cpu): media_len must be >= 1, got ",
              media_len);
  TORCH_CHECK(s.keys == media_mask.size(2) * media_len,
              "image_text_attention (cpu): k has Lk = ", s.keys,
              " keys but media_mask has M = ", media_mask.size(2),
              " chunks of media_len = ", media_len, " (expected Lk == M * media_len)");
  TORCH_CHECK(std::isfinite(scale), "image_text_attention (cpu): scale must be finite, got ",
              scale);
  TORCH_CHECK(cpu::image_text_attention_supported(),
              "image_text_attention (cpu): this CPU lacks AVX-512 (F, BW, VL, DQ), which the CPU "
              "kernels are built for; use backend=\"reference\"");
  Sizes out = s;
  out.chunks = media_mask.size(2);
  return out;
}

using attention_glue::compute_view;
using attention_glue::kernel_dtype;
using attention_glue::runs_as_float32;

const uint8_t* mask_data(const at::Tensor& media_mask) {
  return reinterpret_cast<const uint8_t*>(media_mask.const_data_ptr<bool>());
}

// The fields the forward and backward params share (same names in both structs).
template <typename Params>
void set_shared_fields(Params& p, const at::Tensor& qc, const at::Tensor& kc, const at::Tensor& vc,
                       const at::Tensor& media_mask, const Sizes& s, int64_t media_len,
                       double scale, EmptyRows empty_rows) {
  p.q_stride_batch = qc.stride(0);
  p.q_stride_token = qc.stride(1);
  p.q_stride_head = qc.stride(2);
  p.k_stride_batch = kc.stride(0);
  p.k_stride_token = kc.stride(1);
  p.k_stride_head = kc.stride(2);
  p.v_stride_batch = vc.stride(0);
  p.v_stride_token = vc.stride(1);
  p.v_stride_head = vc.stride(2);
  p.mask_stride_batch = media_mask.stride(0);
  p.mask_stride_query = media_mask.stride(1);
  p.mask_stride_chunk = media_mask.stride(2);
  p.batch = s.batch;
  p.query_len = s.query_len;
  p.heads_q = s.heads_q;
  p.heads_kv = s.heads_kv;
  p.head_dim = s.head_dim;
  p.num_chunks = s.chunks;
  p.media_len = media_len;
  p.scale = static_cast<float>(scale);
  p.empty_rows = empty_rows;
}

// The Python glue's empty_rows code (0 zero, 1 uniform, 2 mean) as the kernels' enum.
EmptyRows empty_rows_mode(int64_t code) {
  TORCH_CHECK(code >= 0 && code <= 2,
              "image_text_attention (cpu): empty_rows must be 0 (zero), 1 (uniform) or 2 (mean), "
              "got ",
              code);
  return static_cast<EmptyRows>(code);
}

}  // namespace

bool image_text_attention_cpu_supported() { return cpu::image_text_attention_supported(); }

std::tuple<at::Tensor, at::Tensor> image_text_attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& media_mask,
    int64_t media_len, double scale, int64_t empty_rows) {
  const Sizes s = check_inputs(q, k, v, media_mask, media_len, scale);
  const EmptyRows mode = empty_rows_mode(empty_rows);
  at::Tensor out = at::empty({s.batch, s.query_len, s.heads_q, s.head_dim}, q.options());
  at::Tensor lse = at::empty({s.batch, s.heads_q, s.query_len}, q.options().dtype(at::kFloat));
  if (lse.numel() == 0) return {out, lse};
  if (s.keys == 0) {  // nothing to attend to, even for uniform or mean rows
    out.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {out, lse};
  }
  if (s.head_dim == 0) {  // every score is 0: lse = log(#visible keys)
    at::Tensor seen = media_mask.sum(-1);
    // Uniform rows see every chunk; mean rows take lse = log(Lk) (their scores count as 0).
    if (mode != EmptyRows::kZero) seen = at::where(seen == 0, media_mask.size(2), seen);
    lse.copy_(at::log(seen.to(at::kFloat) * static_cast<double>(media_len))
                  .unsqueeze(1)
                  .expand({s.batch, s.heads_q, s.query_len}));
    return {out, lse};
  }
  const at::Tensor qc = compute_view(q), kc = compute_view(k), vc = compute_view(v);
  at::Tensor out_c = runs_as_float32(q) ? at::empty(out.sizes(), qc.options()) : out;

  ImageTextAttentionFwdParams p{};
  p.dtype = kernel_dtype(qc);
  p.q = qc.const_data_ptr();
  p.k = kc.const_data_ptr();
  p.v = vc.const_data_ptr();
  p.media_mask = mask_data(media_mask);
  p.out = out_c.data_ptr();
  p.lse = lse.data_ptr<float>();
  set_shared_fields(p, qc, kc, vc, media_mask, s, media_len, scale, mode);
  cpu::image_text_attention_fwd(p);
  if (!out_c.is_same(out)) out.copy_(out_c);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> image_text_attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& media_mask, const at::Tensor& out, const at::Tensor& lse, int64_t media_len,
    double scale, int64_t empty_rows) {
  const Sizes s = check_inputs(q, k, v, media_mask, media_len, scale);
  const EmptyRows mode = empty_rows_mode(empty_rows);
  check_floating("grad_out", grad_out);
  check_floating("out", out);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(),
              "image_text_attention (cpu): grad_out ", grad_out.sizes(), " and out ", out.sizes(),
              " must have q's shape ", q.sizes());
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
              "image_text_attention (cpu): grad_out (", grad_out.scalar_type(), ") and out (",
              out.scalar_type(), ") must have q's dtype ", q.scalar_type());
  TORCH_CHECK(lse.device().is_cpu() && lse.scalar_type() == at::kFloat &&
                  lse.sizes() == at::IntArrayRef({s.batch, s.heads_q, s.query_len}),
              "image_text_attention (cpu): lse must be a float32 CPU tensor [B, Hq, Lq] = [",
              s.batch, ", ", s.heads_q, ", ", s.query_len, "], got ", lse.scalar_type(), " ",
              lse.sizes());

  // Keys no query sees (or no query at all) get zero gradients; rows of no key get zero dq.
  if (q.numel() == 0 || k.numel() == 0) {
    return {at::zeros(q.sizes(), q.options()), at::zeros(k.sizes(), k.options()),
            at::zeros(v.sizes(), v.options())};
  }
  const at::Tensor qc = compute_view(q), kc = compute_view(k), vc = compute_view(v);
  const at::Tensor grad_out_c = compute_view(grad_out), out_c = compute_view(out);
  const at::Tensor lse_c = lse.contiguous();
  at::Tensor dq = at::empty(qc.sizes(), qc.options());
  at::Tensor dk = at::empty(kc.sizes(), kc.options());
  at::Tensor dv = at::empty(vc.sizes(), vc.options());

  ImageTextAttentionBwdParams p{};
  p.dtype = kernel_dtype(qc);
  p.grad_out = grad_out_c.const_data_ptr();
  p.q = qc.const_data_ptr();
  p.k = kc.const_data_ptr();
  p.v = vc.const_data_ptr();
  p.media_mask = mask_data(media_mask);
  p.out = out_c.const_data_ptr();
  p.lse = lse_c.const_data_ptr<float>();
  p.grad_q = dq.data_ptr();
  p.grad_k = dk.data_ptr();
  p.grad_v = dv.data_ptr();
  p.grad_out_stride_batch = grad_out_c.stride(0);
  p.grad_out_stride_token = grad_out_c.stride(1);
  p.grad_out_stride_head = grad_out_c.stride(2);
  p.out_stride_batch = out_c.stride(0);
  p.out_stride_token = out_c.stride(1);
  p.out_stride_head = out_c.stride(2);
  set_shared_fields(p, qc, kc, vc, media_mask, s, media_len, scale, mode);
  cpu::image_text_attention_bwd(p);
  if (runs_as_float32(q)) {
    return {dq.to(q.scalar_type()), dk.to(q.scalar_type()), dv.to(q.scalar_type())};
  }
  return {dq, dk, dv};
}

}  // namespace vlmk
