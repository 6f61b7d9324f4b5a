"""patch_embed, reference: image -> patch tokens (a Conv2d with kernel = stride = P), fused normalization,
bias, CLS token and position embedding.

Shapes: pixels [B, C, H, W] (float, or uint8 camera bytes), weight [D, C, P, P], bias [D], cls_token [D],
pos_embed [N, D] with N = (H/P)*(W/P) + (1 if cls_token), pixel_mean / pixel_std [C]. Output [B, N, D].

    x[b, c]         = (pixels[b, c] / (255 if uint8 else 1) - mean[c]) / std[c]
    out[b, 0]       = cls + pos[0]                                             (when cls_token is given)
    out[b, o + i]   = sum_{c,u,v} x[b, c, P*r+u, P*s+v] * weight[:, c, u, v] + bias + pos[o + i]
with patch i = r * (W/P) + s (row-major) and o = 1 with a CLS token, else 0.
"""

from __future__ import annotations

import torch

from vlm_kernels.reference._common import compute_dtype


def normalized_pixels(
    pixels: torch.Tensor,
    pixel_mean: torch.Tensor | None,
    pixel_std: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The image as the convolution sees it, in ``dtype``."""
    channels = pixels.shape[1]
    x = pixels.to(dtype)
    if pixels.dtype == torch.uint8:
        x = x / 255
    if pixel_mean is not None:
        x = x - pixel_mean.to(dtype).view(1, channels, 1, 1)
    if pixel_std is not None:
        x = x / pixel_std.to(dtype).view(1, channels, 1, 1)
    return x


def to_patches(x: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/P)*(W/P), C*P*P], patches row-major, features ordered (c, u, v)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // patch) * (w // patch), c * patch * patch)


def from_patches(patches: torch.Tensor, channels: int, height: int, width: int, patch: int):
    """Inverse of ``to_patches``."""
    b = patches.shape[0]
    x = patches.reshape(b, height // patch, width // patch, channels, patch, patch)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, channels, height, width)


def patch_embed_reference(
    pixels: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    cls_token: torch.Tensor | None = None,
    pos_embed: torch.Tensor | None = None,
    pixel_mean: torch.Tensor | None = None,
    pixel_std: torch.Tensor | None = None,
) -> torch.Tensor:
    """The spec of ``vlm_kernels.patch_embed`` (see the module docstring). Output dtype = weight dtype."""
    dtype = compute_dtype(pixels, weight)
    dim, _, patch, _ = weight.shape
    x = normalized_pixels(pixels, pixel_mean, pixel_std, dtype)
    out = to_patches(x, patch) @ weight.to(dtype).reshape(dim, -1).T
    if bias is not None:
        out = out + bias.to(dtype)
    if cls_token is not None:
        out = torch.cat([cls_token.to(dtype).expand(out.shape[0], 1, dim), out], dim=1)
    if pos_embed is not None:
        out = out + pos_embed.to(dtype)
    return out.to(weight.dtype)


def patch_embed_backward_reference(
    grad_out: torch.Tensor,
    pixels: torch.Tensor,
    weight: torch.Tensor,
    pixel_mean: torch.Tensor | None,
    pixel_std: torch.Tensor | None,
    has_cls: bool,
    need_pixels_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (pixels, weight, bias, cls_token, pos_embed) of ``patch_embed_reference`` for the output
    cotangent ``grad_out [B, N, D]``. Tensors the caller does not need may be ignored; the pixel gradient
    is empty unless ``need_pixels_grad``."""
    dtype = compute_dtype(pixels, weight)
    _, channels, height, width = pixels.shape
    dim, _, patch, _ = weight.shape
    grad = grad_out.to(dtype)
    grad_pos = grad.sum(0)
    grad_cls = grad[:, 0].sum(0) if has_cls else grad.new_empty(0)
    grad_patches = grad[:, 1:] if has_cls else grad  # [B, Np, D]
    grad_bias = grad_patches.sum((0, 1))
    x = normalized_pixels(pixels, pixel_mean, pixel_std, dtype)
    patches = to_patches(x, patch)  # [B, Np, C*P*P]
    grad_weight = (
        grad_patches.reshape(-1, dim).T @ patches.reshape(-1, patches.shape[-1])
    ).reshape(weight.shape)
    if need_pixels_grad:
        grad_x = from_patches(
            grad_patches @ weight.to(dtype).reshape(dim, -1), channels, height, width, patch
        )
        if pixel_std is not None:
            grad_x = grad_x / pixel_std.to(dtype).view(1, channels, 1, 1)
        grad_pixels = grad_x.to(pixels.dtype)
    else:
        grad_pixels = grad.new_empty(0)
    return (
        grad_pixels,
        grad_weight.to(weight.dtype),
        grad_bias.to(weight.dtype),
        grad_cls.to(weight.dtype),
        grad_pos.to(weight.dtype),
    )
