// Torch glue of the perceiver_attention CPU kernels (csrc/cpu/perceiver_attention.cpp): argument
// checks, output allocation, empty sizes, dtype dispatch (float16 runs through float32).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace vlmk {

// Whether this CPU runs the kernels (they are built for AVX-512 on x86-64; elsewhere they raise).
bool perceiver_attention_cpu_supported();

// (out [B, Nl, Hq, Dh] contiguous in q's dtype, lse [B, Hq, Nl] float32 contiguous).
std::tuple<at::Tensor, at::Tensor> perceiver_attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k_media, const at::Tensor& v_media,
    const at::Tensor& k_latents, const at::Tensor& v_latents,
    const std::optional<at::Tensor>& media_padding_mask, double scale);

// (dq, dk_media, dv_media, dk_latents, dv_latents), contiguous, each in its input's dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> perceiver_attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k_media,
    const at::Tensor& v_media, const at::Tensor& k_latents, const at::Tensor& v_latents,
    const std::optional<at::Tensor>& media_padding_mask, const at::Tensor& out,
    const at::Tensor& lse, double scale);

}  // namespace vlmk
