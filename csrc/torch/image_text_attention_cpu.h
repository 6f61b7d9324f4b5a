// Torch glue of the image_text_attention CPU kernels (csrc/cpu/image_text_attention.cpp): argument
// checks, output allocation, empty sizes, dtype dispatch (float16 runs through float32).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace vlmk {

// (out [B, Lq, Hq, Dh] contiguous in q's dtype, lse [B, Hq, Lq] float32 contiguous).
std::tuple<at::Tensor, at::Tensor> image_text_attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& media_mask,
    int64_t media_len, double scale, int64_t empty_rows);

// Whether this CPU runs the kernels (they are built for AVX-512 on x86-64; elsewhere they raise).
bool image_text_attention_cpu_supported();

// (dq, dk, dv), contiguous, each in its input's dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> image_text_attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& media_mask, const at::Tensor& out, const at::Tensor& lse, int64_t media_len,
    double scale, int64_t empty_rows);

}  // namespace vlmk
