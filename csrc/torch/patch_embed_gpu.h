// Torch glue of the patch_embed CUDA kernels: the entry points (cuda and cuda_sim backends) and the
// checks, normalization constants, outputs, workspace and params they share. The Python op has
// already validated; these checks guard direct callers of vlm_kernels._C.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "cuda/patch_embed.h"

namespace vlmk {

// Forward of patch_embed (DESIGN §3.1) on the CUDA kernels:
//   pixels [B, C, H, W] uint8 / float16 / bfloat16 / float32 / float64, any strides;
//   weight [D, C, P, P] float32 / float16 / bfloat16; bias [D], cls_token [D], pos_embed [N, D]
//   in weight's dtype; pixel_mean / pixel_std [C] any float dtype -> out [B, N, D] contiguous in
//   weight's dtype. cuda_sim runs the same kernels on CPU tensors through the SIMT emulator.
at::Tensor patch_embed_fwd_cuda_sim(const at::Tensor& pixels, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias,
                                    const std::optional<at::Tensor>& cls_token,
                                    const std::optional<at::Tensor>& pos_embed,
                                    const std::optional<at::Tensor>& pixel_mean,
                                    const std::optional<at::Tensor>& pixel_std);
// Backward for the output cotangent grad_out [B, N, D]: (grad_pixels [B, C, H, W] contiguous in
// the pixels' dtype, or empty without need_pixels_grad; grad_weight [D, C, P, P]; grad_bias [D];
// grad_cls [D] or empty without has_cls; grad_pos [N, D]), all but grad_pixels in weight's dtype.
using PatchEmbedGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
PatchEmbedGrads patch_embed_bwd_cuda_sim(const at::Tensor& grad_out, const at::Tensor& pixels,
                                         const at::Tensor& weight,
                                         const std::optional<at::Tensor>& pixel_mean,
                                         const std::optional<at::Tensor>& pixel_std, bool has_cls,
                                         bool need_pixels_grad);
#if defined(VLMK_WITH_CUDA)
at::Tensor patch_embed_fwd_cuda(const at::Tensor& pixels, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias,
                                const std::optional<at::Tensor>& cls_token,
                                const std::optional<at::Tensor>& pos_embed,
                                const std::optional<at::Tensor>& pixel_mean,
                                const std::optional<at::Tensor>& pixel_std);
PatchEmbedGrads patch_embed_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& pixels,
                                     const at::Tensor& weight,
                                     const std::optional<at::Tensor>& pixel_mean,
                                     const std::optional<at::Tensor>& pixel_std, bool has_cls,
                                     bool need_pixels_grad);
#endif

inline PatchEmbedDtype patch_embed_dtype(at::ScalarType type) {
  switch (type) {
    case at::kFloat:
      return PatchEmbedDtype::kFloat32;
    case at::kHalf:
      return PatchEmbedDtype::kFloat16;
    case at::kBFloat16:
      return PatchEmbedDtype::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, "patch_embed: weight must be float32, float16 or bfloat16, got ",
                       type);
  }
}

inline PatchEmbedPixelDtype patch_embed_pixel_dtype(at::ScalarType type) {
  switch (type) {
    case at::kByte:
      return PatchEmbedPixelDtype::kUInt8;
    case at::kHalf:
      return PatchEmbedPixelDtype::kFloat16;
    case at::kBFloat16:
      return PatchEmbedPixelDtype::kBFloat16;
    case at::kFloat:
      return PatchEmbedPixelDtype::kFloat32;
    case at::kDouble:
      return PatchEmbedPixelDtype::kFloat64;
    default:
      TORCH_CHECK_TYPE(false, "patch_embed: pixels must be uint8 or a float dtype, got ", type);
  }
}

// The image, its normalization constants (kept alive here) and the geometry the kernels read.
struct PatchEmbedImage {
  at::Tensor scale, shift;  // float32 [C], undefined for the identity
  PatchEmbedPixels view{};
};

// Checks pixels against weight [D, C, P, P] and fills the image view: x = x * scale + shift with
// scale = 1/(255 std) or 1/std and shift = -mean/std, computed in float64 then rounded to float32
// (uint8 without mean/std: 1/255 and 0; float pixels without them: the identity).
inline PatchEmbedImage patch_embed_image(const at::Tensor& pixels, const at::Tensor& weight,
                                         const std::optional<at::Tensor>& pixel_mean,
                                         const std::optional<at::Tensor>& pixel_std) {
  TORCH_CHECK_VALUE(weight.dim() == 4 && weight.size(2) == weight.size(3) && weight.size(2) > 0,
                    "patch_embed: weight must be [D, C, P, P] with P > 0, got ", weight.sizes());
  const int64_t channels = weight.size(1), patch = weight.size(2);
  TORCH_CHECK_VALUE(pixels.dim() == 4 && pixels.size(1) == channels &&
                        pixels.size(2) % patch == 0 && pixels.size(3) % patch == 0,
                    "patch_embed: pixels must be [B, C=", channels,
                    ", H, W] with H and W multiples "
                    "of P=",
                    patch, " (weight ", weight.sizes(), "), got ", pixels.sizes());
  TORCH_CHECK_VALUE(pixels.device() == weight.device(), "patch_embed: pixels on ", pixels.device(),
                    " but weight on ", weight.device());
  PatchEmbedImage image;
  PatchEmbedPixels& v = image.view;
  v.pixels = pixels.data_ptr();
  v.pixel_dtype = patch_embed_pixel_dtype(pixels.scalar_type());
  v.stride_batch = pixels.stride(0);
  v.stride_channel = pixels.stride(1);
  v.stride_height = pixels.stride(2);
  v.stride_width = pixels.stride(3);
  v.batch = pixels.size(0);
  v.channels = channels;
  v.patch = patch;
  v.patches_w = pixels.size(3) / patch;
  v.patches_per_image = (pixels.size(2) / patch) * v.patches_w;
  v.features = channels * patch * patch;
  const bool is_uint8 = pixels.scalar_type() == at::kByte;
  if (!is_uint8 && !pixel_mean.has_value() && !pixel_std.has_value()) return image;
  const auto options = pixels.options().dtype(at::kDouble);
  at::Tensor scale = at::full({channels}, is_uint8 ? 1.0 / 255.0 : 1.0, options);
  at::Tensor shift = at::zeros({channels}, options);
  for (const auto& [name, value] :
       {std::pair{"pixel_mean", &pixel_mean}, std::pair{"pixel_std", &pixel_std}}) {
    if (value->has_value()) {
      const at::Tensor& t = value->value();
      TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == channels && t.is_floating_point() &&
                            t.device() == pixels.device(),
                        "patch_embed: ", name, " must be a float [C=", channels, "] tensor on ",
                        pixels.device(), ", got ", t.scalar_type(), " ", t.sizes(), " on ",
                        t.device());
    }
  }
  if (pixel_mean.has_value()) shift = shift - pixel_mean->to(at::kDouble);
  if (pixel_std.has_value()) {
    const at::Tensor std_dev = pixel_std->to(at::kDouble);
    scale = scale / std_dev;
    shift = shift / std_dev;
  }
  image.scale = scale.to(at::kFloat).contiguous();
  image.shift = shift.to(at::kFloat).contiguous();
  v.scale = image.scale.data_ptr<float>();
  v.shift = image.shift.data_ptr<float>();
  return image;
}

// `value` (optional) checked as a contiguous tensor of weight's dtype with `shape`.
inline at::Tensor patch_embed_operand(const char* name, const std::optional<at::Tensor>& value,
                                      const at::Tensor& weight, at::IntArrayRef shape) {
  if (!value.has_value()) return at::Tensor();
  const at::Tensor& t = *value;
  TORCH_CHECK_VALUE(t.sizes() == shape && t.scalar_type() == weight.scalar_type() &&
                        t.device() == weight.device(),
                    "patch_embed: ", name, " must be ", weight.scalar_type(), " ", shape, " on ",
                    weight.device(), ", got ", t.scalar_type(), " ", t.sizes(), " on ", t.device());
  return t.contiguous();
}

// Inputs (kept alive until the launch is queued), output and params of one forward call.
struct PatchEmbedLaunch {
  PatchEmbedImage image;
  at::Tensor weight, bias, cls, pos, out;
  PatchEmbedParams params{};
};

inline PatchEmbedLaunch prepare_patch_embed(const at::Tensor& pixels, const at::Tensor& weight,
                                            const std::optional<at::Tensor>& bias,
                                            const std::optional<at::Tensor>& cls_token,
                                            const std::optional<at::Tensor>& pos_embed,
                                            const std::optional<at::Tensor>& pixel_mean,
                                            const std::optional<at::Tensor>& pixel_std) {
  PatchEmbedLaunch launch;
  const PatchEmbedDtype dtype = patch_embed_dtype(weight.scalar_type());
  launch.image = patch_embed_image(pixels, weight, pixel_mean, pixel_std);
  const PatchEmbedPixels& view = launch.image.view;
  const int64_t dim = weight.size(0);
  const int64_t tokens = view.patches_per_image + (cls_token.has_value() ? 1 : 0);
  launch.weight = weight.contiguous();
  launch.bias = patch_embed_operand("bias", bias, weight, {dim});
  launch.cls = patch_embed_operand("cls_token", cls_token, weight, {dim});
  launch.pos = patch_embed_operand("pos_embed", pos_embed, weight, {tokens, dim});
  launch.out = at::empty({view.batch, tokens, dim}, weight.options());
  PatchEmbedParams& p = launch.params;
  p.image = view;
  p.weight = launch.weight.data_ptr();
  p.bias = launch.bias.defined() ? launch.bias.data_ptr() : nullptr;
  p.cls = launch.cls.defined() ? launch.cls.data_ptr() : nullptr;
  p.pos = launch.pos.defined() ? launch.pos.data_ptr() : nullptr;
  p.out = launch.out.data_ptr();
  p.dim = dim;
  p.tokens = tokens;
  p.dtype = dtype;
  return launch;
}

// Inputs, outputs, workspace and params of one backward call.
struct PatchEmbedBwdLaunch {
  PatchEmbedImage image;
  at::Tensor grad_out, weight, workspace;
  at::Tensor grad_pixels, grad_weight, grad_bias, grad_pos;
  bool done = false;  // no grad_out element: the (zero) outputs are final, nothing to launch
  PatchEmbedBwdParams params{};
};

inline PatchEmbedBwdLaunch prepare_patch_embed_bwd(
    const at::Tensor& grad_out, const at::Tensor& pixels, const at::Tensor& weight,
    const std::optional<at::Tensor>& pixel_mean, const std::optional<at::Tensor>& pixel_std,
    bool has_cls, bool need_pixels_grad, int num_sms) {
  PatchEmbedBwdLaunch launch;
  const PatchEmbedDtype dtype = patch_embed_dtype(weight.scalar_type());
  launch.image = patch_embed_image(pixels, weight, pixel_mean, pixel_std);
  const PatchEmbedPixels& view = launch.image.view;
  const int64_t dim = weight.size(0);
  const int64_t tokens = view.patches_per_image + (has_cls ? 1 : 0);
  TORCH_CHECK_VALUE(
      grad_out.dim() == 3 && grad_out.size(0) == view.batch && grad_out.size(1) == tokens &&
          grad_out.size(2) == dim && grad_out.device() == weight.device(),
      "patch_embed backward: grad_out must be [B, N, D] = [", view.batch, ", ", tokens, ", ", dim,
      "] on ", weight.device(), ", got ", grad_out.sizes(), " on ", grad_out.device());
  TORCH_CHECK_VALUE(!need_pixels_grad || pixels.scalar_type() != at::kByte,
                    "patch_embed backward: uint8 pixels have no gradient");
  launch.grad_out = grad_out.to(weight.scalar_type()).contiguous();
  launch.weight = weight.contiguous();
  const auto contiguous = weight.options().memory_format(at::MemoryFormat::Contiguous);
  if (need_pixels_grad) {
    launch.grad_pixels =
        at::empty(pixels.sizes(), pixels.options().memory_format(at::MemoryFormat::Contiguous));
  }
  launch.grad_weight = at::empty(weight.sizes(), contiguous);
  launch.grad_bias = at::empty({dim}, weight.options());
  launch.grad_pos = at::empty({tokens, dim}, weight.options());
  if (view.batch == 0 || tokens == 0 || dim == 0) {
    launch.grad_weight.zero_();
    launch.grad_bias.zero_();
    launch.grad_pos.zero_();
    if (need_pixels_grad) launch.grad_pixels.zero_();
    launch.done = true;
    return launch;
  }
  PatchEmbedBwdParams& p = launch.params;
  p.image = view;
  p.grad_out = launch.grad_out.data_ptr();
  p.weight = launch.weight.data_ptr();
  p.grad_pixels = need_pixels_grad ? launch.grad_pixels.data_ptr() : nullptr;
  p.grad_weight = launch.grad_weight.data_ptr();
  p.grad_bias = launch.grad_bias.data_ptr();
  p.grad_pos = launch.grad_pos.data_ptr();
  p.dim = dim;
  p.tokens = tokens;
  p.has_cls = has_cls;
  p.dtype = dtype;
  plan_patch_embed_bwd(p, num_sms);
  launch.workspace =
      at::empty({patch_embed_bwd_workspace_floats(p)}, weight.options().dtype(at::kFloat));
  p.workspace = launch.workspace.data_ptr<float>();
  return launch;
}

// The tuple the Python op returns.
inline PatchEmbedGrads patch_embed_grads(const PatchEmbedBwdLaunch& launch, bool has_cls) {
  const at::Tensor grad_pixels =
      launch.grad_pixels.defined() ? launch.grad_pixels : launch.grad_pos.new_empty({0});
  const at::Tensor grad_cls = has_cls ? launch.grad_pos[0].clone() : launch.grad_pos.new_empty({0});
  return {grad_pixels, launch.grad_weight, launch.grad_bias, grad_cls, launch.grad_pos};
}

}  // namespace vlmk
