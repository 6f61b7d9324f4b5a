// Torch glue of the concat_project CUDA kernels: the entry points (cuda and cuda_sim backends) and
// the checks, source tables, chunking, outputs and workspace they share. The Python op has already
// validated; these checks guard direct callers of vlm_kernels._C.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "cuda/concat_project.h"

namespace vlmk {

// Forward of concat_project (DESIGN §3.2) on the CUDA kernels: features = L >= 1 tensors
// [..., D_l] (one leading shape; any strides, a non-contiguous last dim is copied), weight
// [N, sum_l D_l], bias [N] or None, all float32 / float16 / bfloat16 of one dtype -> [..., N]
// contiguous. cuda_sim runs the same kernels on CPU tensors through the SIMT emulator.
at::Tensor concat_project_fwd_cuda_sim(const std::vector<at::Tensor>& features,
                                       const at::Tensor& weight,
                                       const std::optional<at::Tensor>& bias);
// Backward for the output cotangent grad_out [..., N]: (grad of each feature, contiguous in its
// shape; grad_weight [N, sum_l D_l]; grad_bias [N]).
using ConcatProjectGrads = std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor>;
ConcatProjectGrads concat_project_bwd_cuda_sim(const at::Tensor& grad_out,
                                               const std::vector<at::Tensor>& features,
                                               const at::Tensor& weight);
#if defined(VLMK_WITH_CUDA)
at::Tensor concat_project_fwd_cuda(const std::vector<at::Tensor>& features,
                                   const at::Tensor& weight, const std::optional<at::Tensor>& bias);
ConcatProjectGrads concat_project_bwd_cuda(const at::Tensor& grad_out,
                                           const std::vector<at::Tensor>& features,
                                           const at::Tensor& weight);
#endif

inline ConcatProjectDtype concat_project_dtype(at::ScalarType type) {
  switch (type) {
    case at::kFloat:
      return ConcatProjectDtype::kFloat32;
    case at::kHalf:
      return ConcatProjectDtype::kFloat16;
    case at::kBFloat16:
      return ConcatProjectDtype::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, "concat_project: weight must be float32, float16 or bfloat16, got ",
                       type);
  }
}

inline bool concat_project_aligned(const void* ptr, int64_t elements, int64_t element_bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && (elements * element_bytes) % 16 == 0;
}

// The sources as [T, D_l] row views of the features (kept alive here) and the leading shape.
struct ConcatProjectInputs {
  std::vector<at::Tensor> rows;  // [T, D_l], last dim contiguous
  std::vector<int64_t> leading;  // the features' shape without D_l
  int64_t tokens = 0;            // T
  int64_t features = 0;          // K = sum_l D_l
  ConcatProjectDtype dtype{};
};

inline ConcatProjectInputs concat_project_inputs(const std::vector<at::Tensor>& features,
                                                 const at::Tensor& weight) {
  TORCH_CHECK_VALUE(!features.empty(), "concat_project: features must hold at least one tensor");
  TORCH_CHECK_VALUE(weight.dim() == 2, "concat_project: weight must be [N, sum_l D_l], got ",
                    weight.sizes());
  ConcatProjectInputs in;
  in.dtype = concat_project_dtype(weight.scalar_type());
  const at::Tensor& first = features[0];
  TORCH_CHECK_VALUE(first.dim() >= 1,
                    "concat_project: features[0] must be [..., D_0], got a scalar");
  const at::IntArrayRef leading = first.sizes().slice(0, first.dim() - 1);
  in.leading = leading.vec();
  in.tokens = c10::multiply_integers(leading);
  for (size_t l = 0; l < features.size(); ++l) {
    const at::Tensor& f = features[l];
    TORCH_CHECK_VALUE(f.dim() >= 1 && f.sizes().slice(0, f.dim() - 1) == leading,
                      "concat_project: features[", l, "] must be [", leading, ", D_", l,
                      "] like features[0] ", first.sizes(), ", got ", f.sizes());
    TORCH_CHECK_TYPE(f.scalar_type() == weight.scalar_type(), "concat_project: features[", l,
                     "] is ", f.scalar_type(), " but weight is ", weight.scalar_type());
    TORCH_CHECK_VALUE(f.device() == weight.device(), "concat_project: features[", l, "] on ",
                      f.device(), " but weight on ", weight.device());
    const int64_t width = f.size(-1);
    // A view when the leading dims merge into one row stride; otherwise reshape copies this one
    // source (never the concatenation).
    at::Tensor rows = f.reshape({in.tokens, width});
    if (width > 1 && rows.stride(1) != 1) rows = rows.contiguous();
    in.rows.push_back(rows);
    in.features += width;
  }
  TORCH_CHECK_VALUE(weight.size(1) == in.features, "concat_project: weight must be [N, ",
                    in.features, "] (sum of the feature widths), got ", weight.sizes());
  return in;
}

// The table of sources [begin, end) of `in` for one launch. `grads`: their gradient tensors
// (backward) or empty.
inline ConcatProjectSources concat_project_sources(const ConcatProjectInputs& in,
                                                   const at::Tensor& weight,
                                                   const std::vector<at::Tensor>& grads,
                                                   size_t begin, size_t end) {
  const int64_t bytes = weight.element_size();
  ConcatProjectSources s{};
  int64_t column = 0;
  for (size_t l = 0; l < begin; ++l) column += in.rows[l].size(1);
  const bool weight_rows = concat_project_aligned(weight.data_ptr(), in.features, bytes);
  for (size_t l = begin; l < end; ++l) {
    const at::Tensor& x = in.rows[l];
    ConcatProjectSource& src = s.source[s.count++];
    src.data = x.data_ptr();
    src.grad = grads.empty() ? nullptr : grads[l].data_ptr();
    src.width = x.size(1);
    src.row_stride = x.stride(0);
    src.column = column;
    src.vector = concat_project_aligned(src.data, src.row_stride, bytes) &&
                 concat_project_aligned(src.data, src.width, bytes);
    src.weight_vector = weight_rows && (column * bytes) % 16 == 0 && (src.width * bytes) % 16 == 0;
    column += src.width;
  }
  concat_project_plan_sources(s);
  return s;
}

// Runs the forward in chunks of kConcatProjectMaxSources sources; `launch(params)` returns the
// status, `error(status)` its text.
template <typename Launch, typename Error>
at::Tensor concat_project_forward(const std::vector<at::Tensor>& features, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, const Launch& launch,
                                  const Error& error) {
  const ConcatProjectInputs in = concat_project_inputs(features, weight);
  const int64_t dim = weight.size(0);
  at::Tensor bias_c;
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(
        bias->dim() == 1 && bias->size(0) == dim && bias->scalar_type() == weight.scalar_type() &&
            bias->device() == weight.device(),
        "concat_project: bias must be ", weight.scalar_type(), " [", dim, "] on ", weight.device(),
        ", got ", bias->scalar_type(), " ", bias->sizes(), " on ", bias->device());
    bias_c = bias->contiguous();
  }
  const at::Tensor weight_c = weight.contiguous();
  at::Tensor out = at::empty({in.tokens, dim}, weight.options());
  std::vector<int64_t> out_shape = in.leading;
  out_shape.push_back(dim);
  if (in.tokens == 0 || dim == 0) return out.view(out_shape);
  const size_t count = in.rows.size();
  const size_t chunks = (count + kConcatProjectMaxSources - 1) / kConcatProjectMaxSources;
  // Chunks before the last carry their float32 sum in one [T, N] buffer.
  const at::Tensor partial =
      chunks > 1 ? at::empty({in.tokens, dim}, weight.options().dtype(at::kFloat)) : at::Tensor();
  for (size_t c = 0; c < chunks; ++c) {
    const size_t begin = c * kConcatProjectMaxSources;
    const size_t end = std::min(count, begin + kConcatProjectMaxSources);
    const bool last = c + 1 == chunks;
    ConcatProjectParams p{};
    p.sources = concat_project_sources(in, weight_c, {}, begin, end);
    p.weight = weight_c.data_ptr();
    p.bias = last && bias_c.defined() ? bias_c.data_ptr() : nullptr;
    p.partial_in = c > 0 ? partial.data_ptr<float>() : nullptr;
    p.partial_out = last ? nullptr : partial.data_ptr<float>();
    p.out = out.data_ptr();
    p.rows = in.tokens;
    p.dim = dim;
    p.features = in.features;
    p.dtype = in.dtype;
    const int status = launch(p);
    TORCH_CHECK(status == 0, "concat_project launch failed: ", error(status));
  }
  return out.view(out_shape);
}

// Runs the backward in chunks of kConcatProjectMaxSources sources over one weight-partial
// workspace; the last chunk sums it. `num_sms` sizes the T splits of the weight gradient.
template <typename Launch, typename Error>
ConcatProjectGrads concat_project_backward(const at::Tensor& grad_out,
                                           const std::vector<at::Tensor>& features,
                                           const at::Tensor& weight, int num_sms,
                                           const Launch& launch, const Error& error) {
  const ConcatProjectInputs in = concat_project_inputs(features, weight);
  const int64_t dim = weight.size(0);
  TORCH_CHECK_VALUE(grad_out.numel() == in.tokens * dim && grad_out.dim() >= 1 &&
                        grad_out.size(-1) == dim && grad_out.device() == weight.device(),
                    "concat_project backward: grad_out must be [..., N=", dim, "] with ", in.tokens,
                    " rows on ", weight.device(), ", got ", grad_out.sizes(), " on ",
                    grad_out.device());
  const at::Tensor dy = grad_out.to(weight.scalar_type()).contiguous().view({in.tokens, dim});
  const at::Tensor weight_c = weight.contiguous();
  std::vector<at::Tensor> grads;
  for (const at::Tensor& x : in.rows)
    grads.push_back(at::empty({in.tokens, x.size(1)}, x.options()));
  at::Tensor grad_weight = at::empty({dim, in.features}, weight.options());
  at::Tensor grad_bias = at::empty({dim}, weight.options());
  std::vector<at::Tensor> grad_features;
  const auto shaped = [&] {
    for (size_t l = 0; l < grads.size(); ++l)
      grad_features.push_back(grads[l].view(features[l].sizes()));
    return ConcatProjectGrads{grad_features, grad_weight, grad_bias};
  };
  if (in.tokens == 0 || dim == 0) {  // no grad_out element: every gradient is zero
    for (at::Tensor& g : grads) g.zero_();
    grad_weight.zero_();
    grad_bias.zero_();
    return shaped();
  }
  const size_t count = in.rows.size();
  ConcatProjectBwdParams p{};
  p.grad_out = dy.data_ptr();
  p.weight = weight_c.data_ptr();
  p.grad_vector = concat_project_aligned(p.grad_out, dim, weight.element_size());
  p.grad_weight = grad_weight.data_ptr();
  p.grad_bias = grad_bias.data_ptr();
  p.rows = in.tokens;
  p.dim = dim;
  p.features = in.features;
  p.dtype = in.dtype;
  int64_t column_blocks = 0;
  for (const at::Tensor& x : in.rows) {
    column_blocks += (x.size(1) + kConcatProjectBlock - 1) / kConcatProjectBlock;
  }
  concat_project_plan_bwd(p, column_blocks, num_sms);
  const at::Tensor workspace =
      at::empty({concat_project_bwd_workspace_floats(p)}, weight.options().dtype(at::kFloat));
  p.workspace = workspace.data_ptr<float>();
  const size_t chunks = (count + kConcatProjectMaxSources - 1) / kConcatProjectMaxSources;
  for (size_t c = 0; c < chunks; ++c) {
    const size_t begin = c * kConcatProjectMaxSources;
    p.sources = concat_project_sources(in, weight_c, grads, begin,
                                       std::min(count, begin + kConcatProjectMaxSources));
    p.finish = c + 1 == chunks;
    const int status = launch(p);
    TORCH_CHECK(status == 0, "concat_project backward launch failed: ", error(status));
  }
  return shaped();
}

}  // namespace vlmk
