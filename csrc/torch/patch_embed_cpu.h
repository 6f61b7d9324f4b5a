// Torch glue of the patch_embed CPU kernels (csrc/cpu/patch_embed.cpp): argument checks, the
// per-channel normalization folded into (scale, shift), the weight packed as the GEMM operand once
// per call, output allocation and dtype dispatch.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace vlmk {

// out [B, N, D] contiguous in weight's dtype (semantics: vlm_kernels/reference/patch_embed.py).
at::Tensor patch_embed_fwd_cpu(const at::Tensor& pixels, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& cls_token,
                               const std::optional<at::Tensor>& pos_embed,
                               const std::optional<at::Tensor>& pixel_mean,
                               const std::optional<at::Tensor>& pixel_std);

// (grad_pixels [B, C, H, W] in pixels' dtype or empty, grad_weight, grad_bias [D], grad_cls [D] or
// empty, grad_pos [N, D]), contiguous, the last four in weight's dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> patch_embed_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& pixels, const at::Tensor& weight,
    const std::optional<at::Tensor>& pixel_mean, const std::optional<at::Tensor>& pixel_std,
    bool has_cls, bool need_pixels_grad);

// Whether the kernels built for AVX-512 run here (else their portable build does: any CPU).
bool patch_embed_cpu_avx512();

}  // namespace vlmk
