// Pieces of torch glue shared by the CPU attention ops (image_text_attention_cpu.cpp,
// perceiver_attention_cpu.cpp): the per-tensor check and the dtype the kernels compute in.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Context.h>

#include "cpu/attention_types.h"

namespace vlmk {
namespace attention_glue {

// A [B, N, H, Dh] CPU tensor of float32, bfloat16 or float16 with a contiguous last dim; `op` names
// the op in the message ("image_text_attention (cpu): ").
inline void check_floating(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), op, name, " must be a CPU tensor, got one on ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16 ||
                  t.scalar_type() == at::kHalf,
              op, name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 4, op, name, " must be 4-D, got shape ", t.sizes());
  TORCH_CHECK(t.size(3) <= 1 || t.stride(3) == 1, op, name,
              " must have a contiguous last dim (stride(-1) == 1), got strides ", t.strides());
}

// The kernels compute in float32 or bfloat16; float16 goes through float32, and so does bfloat16
// when oneDNN is switched off (torch.backends.mkldnn.enabled = False: no bfloat16 brgemm then).
inline bool runs_as_float32(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf ||
         (t.scalar_type() == at::kBFloat16 && !at::globalContext().userEnabledMkldnn());
}

// t in the dtype the kernels compute in (a float32 copy when runs_as_float32).
inline at::Tensor compute_view(const at::Tensor& t) {
  return runs_as_float32(t) ? t.to(at::kFloat) : t;
}

inline AttentionDtype kernel_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kBFloat16 ? AttentionDtype::kBFloat16 : AttentionDtype::kFloat32;
}

}  // namespace attention_glue
}  // namespace vlmk
