"""patch_embed: image -> patch tokens (Conv2d, kernel = stride = P) + bias + CLS + position embedding.

Shapes: pixels [B, C, H, W] (float, or uint8 with pixel_mean/pixel_std fused), weight [D, C, P, P],
bias [D], cls_token [D], pos_embed [N, D] with N = (H/P)*(W/P) + 1; output [B, N, D].

Peers (uint8 inputs are first normalized in PyTorch: (x / 255 - mean) / std, a full float copy):
  conv           F.conv2d(stride=P) + flatten/transpose + cat CLS + add pos (as HF CLIP/Mllama).
  unfold_linear  reshape/permute im2col copy + F.linear with the weight as [D, C*P*P] + CLS + pos.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.spec import Inputs, OpSpec, Peer, Shape, randn, seeded_generator

OP = "patch_embed"

# The OpenAI CLIP normalization used by both the Mllama and the LLaVA (CLIP) image processors.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

SHAPES = {
    # HF MllamaVisionConfig defaults: image_size 560, patch_size 14, hidden_size 1280, num_channels
    # 3, max_num_tiles 4; MllamaVisionModel.patch_embedding = Conv2d(3, 1280, 14, stride=14,
    # bias=False), class_embedding [1280], position embedding [1601, 1280]. B = 4: the 4 tiles of
    # one image.
    "mllama-11b": Shape(
        OP,
        "mllama-11b",
        dict(B=4, C=3, H=560, W=560, P=14, D=1280, bias=False),
        variants=("float", "uint8"),
        source="Mllama ViT-H/14 (HF MllamaVisionConfig): 560px tiles, P=14, D=1280, no conv bias, "
        "CLS + pos (1601 tokens); B=4 tiles of one image",
    ),
    # HF CLIPVisionConfig of openai/clip-vit-large-patch14-336 (the LLaVA-1.5 tower): image_size
    # 336, patch_size 14, hidden_size 1024; CLIPVisionEmbeddings: Conv2d(3, 1024, 14, stride=14,
    # bias=False), class_embedding, position_embedding [577, 1024]. B = 8 images (a small training
    # batch).
    "clip-vit-l14-336": Shape(
        OP,
        "clip-vit-l14-336",
        dict(B=8, C=3, H=336, W=336, P=14, D=1024, bias=False),
        variants=("float", "uint8"),
        source="CLIP ViT-L/14-336 (LLaVA-1.5 vision tower): 336px, P=14, D=1024, no conv bias, "
        "CLS + pos (577 tokens); B=8 images",
    ),
    # Non-square image and a bias, to exercise every term.
    "tiny": Shape(
        OP,
        "tiny",
        dict(B=2, C=3, H=28, W=21, P=7, D=24, bias=True),
        variants=("float", "uint8"),
        source="small sizes for tests",
    ),
}

VARIANT_HELP = (
    "pixels: float = already-normalized float pixels in the benchmark dtype; uint8 = raw bytes "
    "with the CLIP mean/std normalization fused (pixel_mean/pixel_std)"
)


def make_inputs(shape, variant, dtype, device, seed, requires_grad) -> Inputs:
    p = shape.params
    b, c, h, w, patch, d = p["B"], p["C"], p["H"], p["W"], p["P"], p["D"]
    num_tokens = (h // patch) * (w // patch) + 1
    gen = seeded_generator(seed)
    tensors: dict = {}
    if variant == "uint8":
        pixels = torch.randint(0, 256, (b, c, h, w), generator=gen, dtype=torch.uint8).to(device)
        tensors["pixel_mean"] = torch.tensor(CLIP_MEAN[:c], device=device)
        tensors["pixel_std"] = torch.tensor(CLIP_STD[:c], device=device)
    elif variant == "float":
        pixels = randn((b, c, h, w), gen, dtype, device)
    else:
        raise ValueError(f"unknown patch_embed variant {variant!r}; {VARIANT_HELP}")
    fan_in = c * patch * patch
    weight = randn((d, c, patch, patch), gen, dtype, device, fan_in**-0.5, requires_grad)
    bias = randn((d,), gen, dtype, device, 0.02, requires_grad) if p["bias"] else None
    cls_token = randn((d,), gen, dtype, device, 0.02, requires_grad)
    pos_embed = randn((num_tokens, d), gen, dtype, device, 0.02, requires_grad)
    tensors.update(
        pixels=pixels, weight=weight, bias=bias, cls_token=cls_token, pos_embed=pos_embed
    )
    grads = tuple(t for t in (weight, bias, cls_token, pos_embed) if t is not None)
    return Inputs(tensors=tensors, grad_inputs=grads if requires_grad else ())


def call_ours(inputs: Inputs, backend: str) -> torch.Tensor:
    import vlm_kernels as vk

    t = inputs.tensors
    return vk.patch_embed(
        t["pixels"],
        t["weight"],
        t["bias"],
        cls_token=t["cls_token"],
        pos_embed=t["pos_embed"],
        pixel_mean=t.get("pixel_mean"),
        pixel_std=t.get("pixel_std"),
        backend=backend,
    )


def flops(inputs: Inputs, mode: str) -> int:
    """2 * B * patches * D * C*P*P for the conv GEMM; fwd_bwd adds the weight gradient (pixels
    take none).

    Bias, CLS, position and normalization adds are not counted.
    """
    pixels, weight = inputs.tensors["pixels"], inputs.tensors["weight"]
    b, _, h, w = pixels.shape
    d, c, patch, _ = weight.shape
    fwd = 2 * b * (h // patch) * (w // patch) * d * c * patch * patch
    return fwd if mode == "fwd" else 2 * fwd


def _normalized_pixels(inputs: Inputs) -> torch.Tensor:
    t = inputs.tensors
    pixels = t["pixels"]
    if t.get("pixel_mean") is None:
        return pixels
    mean = t["pixel_mean"][:, None, None]
    std = t["pixel_std"][:, None, None]
    return ((pixels.float() / 255.0 - mean) / std).to(t["weight"].dtype)


def _finish(tokens: torch.Tensor, inputs: Inputs) -> torch.Tensor:
    """tokens (B, patches, D) -> cat CLS in front, add the position embedding."""
    cls = inputs.tensors["cls_token"]
    cls = cls.expand(tokens.shape[0], 1, cls.shape[-1])
    return torch.cat([cls, tokens], dim=1) + inputs.tensors["pos_embed"]


def prepare_conv(inputs: Inputs):
    weight, bias = inputs.tensors["weight"], inputs.tensors["bias"]
    patch = weight.shape[-1]

    def run():
        x = F.conv2d(_normalized_pixels(inputs), weight, bias, stride=patch)  # (B, D, H/P, W/P)
        return _finish(x.flatten(2).transpose(1, 2), inputs)

    return run


def _im2col(x: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, patches, C*P*P): the im2col copy (reshape/permute)."""
    b, c, h, w = x.shape
    rows, cols = h // patch, w // patch
    x = x.reshape(b, c, rows, patch, cols, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, rows * cols, c * patch * patch)


def prepare_unfold_linear(inputs: Inputs):
    weight, bias = inputs.tensors["weight"], inputs.tensors["bias"]
    d, patch = weight.shape[0], weight.shape[-1]

    def run():
        x = _im2col(_normalized_pixels(inputs), patch)
        return _finish(F.linear(x, weight.reshape(d, -1), bias), inputs)

    return run


def prepare_mm(inputs: Inputs):
    """The GEMM alone, on patches unfolded (and normalized) before the clock starts: the ceiling
    the op's forward is measured against (the issue's ">= 75% of torch.mm")."""
    weight = inputs.tensors["weight"]
    patches = _im2col(_normalized_pixels(inputs), weight.shape[-1]).detach()
    patches = patches.reshape(-1, patches.shape[-1]).contiguous()
    weight_t = weight.detach().reshape(weight.shape[0], -1).t().contiguous()
    return lambda: torch.mm(patches, weight_t)


SPEC = OpSpec(
    name=OP,
    shapes=SHAPES,
    make_inputs=make_inputs,
    call_ours=call_ours,
    flops=flops,
    peers=(
        Peer("conv", "F.conv2d + flatten/transpose + cat CLS + add pos", prepare_conv),
        Peer(
            "unfold_linear",
            "im2col copy (reshape/permute) + F.linear + CLS + pos",
            prepare_unfold_linear,
        ),
        Peer(
            "mm",
            "ceiling: torch.mm [B*patches, C*P*P] x [C*P*P, D] on pre-unfolded pixels",
            prepare_mm,
            ceiling=True,
        ),
    ),
    default_baseline="conv",
    variant_help=VARIANT_HELP,
)
