// Torch glue of the patch_embed CPU kernels: checks (naming the tensor and its shape), the pixel
// normalization as per-channel (scale, shift), the weight packed as the backward GEMM's B operand
// (the forward kernel packs its own), output allocation, dtype dispatch. The Python op validates
// first; these checks guard direct callers of vlm_kernels._C.
//
// GEMM operands are bfloat16 (float32 accumulation) for bfloat16 weights where oneDNN runs bfloat16
// brgemm, float32 otherwise (float32 and float16 weights, and bfloat16 with oneDNN switched off).
#include "torch/patch_embed_cpu.h"

#include <ATen/Context.h>
#include <ATen/native/CPUBlas.h>

#include <array>
#include <utility>

#include "cpu/avx512_util.h"
#include "cpu/patch_embed.h"

namespace vlmk {
namespace {

PatchEmbedType element_type(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return PatchEmbedType::kFloat32;
    case at::kBFloat16:
      return PatchEmbedType::kBFloat16;
    case at::kHalf:
      return PatchEmbedType::kFloat16;
    case at::kDouble:
      return PatchEmbedType::kFloat64;
    case at::kByte:
      return PatchEmbedType::kUInt8;
    default:
      TORCH_CHECK(false, "patch_embed (cpu): unsupported dtype ", t.scalar_type());
  }
}

at::ScalarType compute_dtype(const at::Tensor& weight) {
  const bool bf16_gemm = weight.scalar_type() == at::kBFloat16 &&
                         at::globalContext().userEnabledMkldnn() &&
                         at::native::cpublas::could_pack(at::kBFloat16);
  return bf16_gemm ? at::kBFloat16 : at::kFloat;
}

void check_cpu(const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), "patch_embed (cpu): ", name,
              " must be a CPU tensor, got one on ", t.device());
}

// Checks pixels / weight / mean / std; returns (B, C, H, W, P, D).
std::array<int64_t, 6> check_image(const at::Tensor& pixels, const at::Tensor& weight,
                                   const std::optional<at::Tensor>& pixel_mean,
                                   const std::optional<at::Tensor>& pixel_std) {
  check_cpu("pixels", pixels);
  check_cpu("weight", weight);
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16 ||
                  weight.scalar_type() == at::kHalf,
              "patch_embed (cpu): weight must be float32, bfloat16 or float16, got ",
              weight.scalar_type());
  TORCH_CHECK(weight.dim() == 4 && weight.size(2) == weight.size(3) && weight.size(2) >= 1,
              "patch_embed (cpu): weight must be [D, C, P, P] with P >= 1, got ", weight.sizes());
  TORCH_CHECK(pixels.scalar_type() == at::kByte || at::isFloatingType(pixels.scalar_type()),
              "patch_embed (cpu): pixels must be uint8 or a float dtype, got ",
              pixels.scalar_type());
  element_type(pixels);
  const int64_t patch = weight.size(2);
  TORCH_CHECK(pixels.dim() == 4 && pixels.size(1) == weight.size(1) &&
                  pixels.size(2) % patch == 0 && pixels.size(3) % patch == 0,
              "patch_embed (cpu): pixels must be [B, C, H, W] with C = ", weight.size(1),
              " (weight ", weight.sizes(), ") and H, W multiples of P = ", patch, ", got ",
              pixels.sizes());
  for (const auto& [name, value] :
       {std::pair{"pixel_mean", &pixel_mean}, {"pixel_std", &pixel_std}}) {
    if (value->has_value()) {
      const at::Tensor& t = **value;
      check_cpu(name, t);
      TORCH_CHECK(
          at::isFloatingType(t.scalar_type()) && t.dim() == 1 && t.size(0) == weight.size(1),
          "patch_embed (cpu): ", name, " must be a float [C] = [", weight.size(1), "] tensor, got ",
          t.scalar_type(), " ", t.sizes());
    }
  }
  return {pixels.size(0), pixels.size(1), pixels.size(2), pixels.size(3), patch, weight.size(0)};
}

// x = pixel * scale + shift per channel: (1/255 for uint8) / std and -mean / std, in float64 first.
std::pair<at::Tensor, at::Tensor> normalization(const at::Tensor& pixels, int64_t channels,
                                                const std::optional<at::Tensor>& pixel_mean,
                                                const std::optional<at::Tensor>& pixel_std) {
  const auto options = pixels.options().dtype(at::kDouble);
  at::Tensor scale =
      at::full({channels}, pixels.scalar_type() == at::kByte ? 1.0 / 255 : 1.0, options);
  at::Tensor shift = at::zeros({channels}, options);
  if (pixel_mean.has_value()) shift = -pixel_mean->to(at::kDouble);
  if (pixel_std.has_value()) {
    const at::Tensor std = pixel_std->to(at::kDouble);
    scale = scale / std;
    shift = shift / std;
  }
  return {scale.to(at::kFloat).contiguous(), shift.to(at::kFloat).contiguous()};
}

// [K, N] row-major in `dtype`, as a brgemm B operand: unchanged for float32; for bfloat16, K padded
// to a multiple of k_align (even) with zero rows and stored in VNNI pairs [K / 2][N][2].
at::Tensor pack_b_operand(const at::Tensor& rows, at::ScalarType dtype, int64_t k_align) {
  if (dtype == at::kFloat) return rows.to(at::kFloat).contiguous();
  const int64_t k = rows.size(0), n = rows.size(1);
  const int64_t k_padded = (k + k_align - 1) / k_align * k_align;
  at::Tensor padded = at::zeros({k_padded, n}, rows.options().dtype(dtype));
  padded.narrow(0, 0, k).copy_(rows);
  return padded.view({k_padded / 2, 2, n}).permute({0, 2, 1}).contiguous();
}

void set_pixels(const at::Tensor& pixels, const std::array<int64_t, 6>& s, auto& p) {
  p.pixel_type = element_type(pixels);
  p.pixels = pixels.const_data_ptr();
  p.pixel_stride_batch = pixels.stride(0);
  p.pixel_stride_channel = pixels.stride(1);
  p.pixel_stride_row = pixels.stride(2);
  p.pixel_stride_col = pixels.stride(3);
  p.batch = s[0];
  p.channels = s[1];
  p.height = s[2];
  p.width = s[3];
  p.patch = s[4];
  p.dim = s[5];
}

void check_vector(const char* name, const std::optional<at::Tensor>& t, const at::Tensor& weight,
                  at::IntArrayRef shape, const char* doc) {
  if (!t.has_value()) return;
  check_cpu(name, *t);
  TORCH_CHECK(t->scalar_type() == weight.scalar_type() && t->sizes() == shape,
              "patch_embed (cpu): ", name, " must be ", doc, " = ", shape, " in weight's dtype ",
              weight.scalar_type(), ", got ", t->scalar_type(), " ", t->sizes());
}

}  // namespace

bool patch_embed_cpu_avx512() {
#if VLMK_HAVE_AVX512_UTIL
  return cpu::avx512::supported();
#else
  return false;
#endif
}

at::Tensor patch_embed_fwd_cpu(const at::Tensor& pixels, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& cls_token,
                               const std::optional<at::Tensor>& pos_embed,
                               const std::optional<at::Tensor>& pixel_mean,
                               const std::optional<at::Tensor>& pixel_std) {
  const auto s = check_image(pixels, weight, pixel_mean, pixel_std);
  const auto [batch, channels, height, width, patch, dim] = s;
  const int64_t tokens = (height / patch) * (width / patch) + (cls_token.has_value() ? 1 : 0);
  check_vector("bias", bias, weight, {dim}, "[D]");
  check_vector("cls_token", cls_token, weight, {dim}, "[D]");
  check_vector("pos_embed", pos_embed, weight, {tokens, dim}, "[N, D]");
  at::Tensor out = at::empty({batch, tokens, dim}, weight.options());
  if (out.numel() == 0) return out;

  const at::ScalarType compute = compute_dtype(weight);
  const auto [scale, shift] = normalization(pixels, channels, pixel_mean, pixel_std);
  const at::Tensor weight_c = weight.contiguous();
  const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor cls_c = cls_token.has_value() ? cls_token->contiguous() : at::Tensor();
  const at::Tensor pos_c = pos_embed.has_value() ? pos_embed->contiguous() : at::Tensor();

  PatchEmbedFwdParams p{};
  set_pixels(pixels, s, p);
  p.compute_type = compute == at::kBFloat16 ? PatchEmbedType::kBFloat16 : PatchEmbedType::kFloat32;
  p.out_type = element_type(weight);
  p.pixel_scale = scale.const_data_ptr<float>();
  p.pixel_shift = shift.const_data_ptr<float>();
  p.weight = weight_c.const_data_ptr();
  p.bias = bias_c.defined() ? bias_c.const_data_ptr() : nullptr;
  p.cls_token = cls_c.defined() ? cls_c.const_data_ptr() : nullptr;
  p.pos_embed = pos_c.defined() ? pos_c.const_data_ptr() : nullptr;
  p.out = out.data_ptr();
  patch_embed_cpu_avx512() ? cpu::patch_embed_fwd(p) : cpu::patch_embed_fwd_portable(p);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> patch_embed_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& pixels, const at::Tensor& weight,
    const std::optional<at::Tensor>& pixel_mean, const std::optional<at::Tensor>& pixel_std,
    bool has_cls, bool need_pixels_grad) {
  const auto s = check_image(pixels, weight, pixel_mean, pixel_std);
  const auto [batch, channels, height, width, patch, dim] = s;
  const int64_t tokens = (height / patch) * (width / patch) + (has_cls ? 1 : 0);
  check_cpu("grad_out", grad_out);
  TORCH_CHECK(grad_out.scalar_type() == weight.scalar_type() &&
                  grad_out.sizes() == at::IntArrayRef({batch, tokens, dim}),
              "patch_embed (cpu): grad_out must be [B, N, D] = [", batch, ", ", tokens, ", ", dim,
              "] in weight's dtype ", weight.scalar_type(), ", got ", grad_out.scalar_type(), " ",
              grad_out.sizes());
  TORCH_CHECK(!need_pixels_grad || pixels.scalar_type() != at::kByte,
              "patch_embed (cpu): uint8 pixels have no gradient (need_pixels_grad must be False)");

  const at::ScalarType compute = compute_dtype(weight);
  const auto float_options = weight.options().dtype(at::kFloat);
  const int64_t k_size = channels * patch * patch;
  at::Tensor grad_weight_t = at::empty({k_size, dim}, float_options);
  at::Tensor grad_pos = at::empty({tokens, dim}, float_options);
  at::Tensor grad_bias = at::empty({dim}, float_options);
  at::Tensor grad_pixels = need_pixels_grad ? at::empty(pixels.sizes(), pixels.options())
                                            : at::empty({0}, pixels.options());

  const auto [scale, shift] = normalization(pixels, channels, pixel_mean, pixel_std);
  const at::Tensor grad_c = grad_out.to(compute).contiguous();
  const at::Tensor weight_rows =
      need_pixels_grad ? pack_b_operand(weight.reshape({dim, k_size}), compute, 2) : at::Tensor();

  PatchEmbedBwdParams p{};
  set_pixels(pixels, s, p);
  p.compute_type = element_type(grad_c);
  p.out_type = element_type(grad_c);
  p.grad_out = grad_c.const_data_ptr();
  p.pixel_scale = scale.const_data_ptr<float>();
  p.pixel_shift = shift.const_data_ptr<float>();
  p.weight_packed = need_pixels_grad ? weight_rows.const_data_ptr() : nullptr;
  p.grad_weight_t = grad_weight_t.data_ptr<float>();
  p.grad_pos = grad_pos.data_ptr<float>();
  p.grad_bias = grad_bias.data_ptr<float>();
  p.grad_pixels = need_pixels_grad ? grad_pixels.data_ptr() : nullptr;
  p.has_cls = has_cls;
  patch_embed_cpu_avx512() ? cpu::patch_embed_bwd(p) : cpu::patch_embed_bwd_portable(p);

  at::Tensor grad_weight = at::empty(weight.sizes(), weight.options());
  grad_weight.view({dim, k_size}).copy_(grad_weight_t.t());
  const at::Tensor grad_cls =
      has_cls ? grad_pos[0].to(weight.scalar_type(), /*non_blocking=*/false, /*copy=*/true)
              : at::empty({0}, weight.options());
  return {grad_pixels, grad_weight, grad_bias.to(weight.scalar_type()), grad_cls,
          grad_pos.to(weight.scalar_type())};
}

}  // namespace vlmk
