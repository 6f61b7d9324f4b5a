// Torch glue of the concat_project CPU kernels (csrc/torch/concat_project_cpu.cpp): GEMMs on the
// weight's column blocks through ATen's CPU GEMM, with no concatenated buffer.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

namespace vlmk {

// out [..., N] contiguous in weight's dtype = concat(features, -1) @ weight^T + bias, for features
// L tensors [..., D_l] (one leading shape, unit stride along D_l), weight [N, sum_l D_l], bias [N].
at::Tensor concat_project_fwd_cpu(const std::vector<at::Tensor>& features, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias);

// (grad of each feature [..., D_l], grad_weight [N, sum_l D_l], grad_bias [N]), contiguous, in the
// weight's dtype, for the output cotangent grad_out [..., N].
std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> concat_project_bwd_cpu(
    const at::Tensor& grad_out, const std::vector<at::Tensor>& features, const at::Tensor& weight);

}  // namespace vlmk
