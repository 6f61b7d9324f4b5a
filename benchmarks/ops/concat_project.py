"""concat_project: concat(features, -1) @ weight.T + bias, features L tensors [..., D_l].

Peers:
  cat_linear    torch.cat on the feature axis + F.linear (what Mllama and LLaVA do).
  split_linear  no concat: addmm of each feature with its column block of the weight (split-K in
                PyTorch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.spec import Inputs, OpSpec, Peer, Shape, randn, seeded_generator

OP = "concat_project"

SHAPES = {
    # HF MllamaVisionConfig: hidden_size 1280, intermediate_layers_indices [3, 7, 15, 23, 30],
    # vision_output_dim 7680 = 1280 * (1 final hidden state + 5 intermediate layers);
    # MllamaForConditionalGeneration.multi_modal_projector = Linear(7680, text hidden_size 4096,
    # bias=True). Leading shape (4, 1601): the 4 tiles of one image x 1601 tokens per tile.
    "mllama-11b": Shape(
        OP,
        "mllama-11b",
        dict(lead=(4, 1601), dims=(1280,) * 6, N=4096),
        variants=("default",),
        source="Mllama projector (HF): Linear(7680 = 1280 x (final + 5 intermediate layers), "
        "4096); tokens = 4 tiles x 1601",
    ),
    # LLaVA-1.5: vision_feature_layer -2 (the penultimate CLIP ViT-L/14-336 layer), select "patch"
    # (the 576 patch tokens, CLS dropped), mm_projector "mlp2x_gelu" whose first layer is
    # Linear(1024, 4096): a single source, so this is a plain Linear. B = 8 images, as in the
    # patch_embed shape.
    "clip-vit-l14-336": Shape(
        OP,
        "clip-vit-l14-336",
        dict(lead=(8, 576), dims=(1024,), N=4096),
        variants=("default",),
        source="LLaVA-1.5 projector input: penultimate CLIP ViT-L/14-336 layer, 576 patch tokens, "
        "first Linear(1024, 4096); B=8 images",
    ),
    # The shapes. mllama-projector: the mllama-11b GEMM with the tokens flattened (6 sources
    # of [6404, 1280], 6404 = 4 tiles x 1601 tokens). llava-2layer: two CLIP ViT-L/14-336 layers (e.g.
    # the penultimate and the last, multi-layer LLaVA variants) of the 576 patch tokens of one image,
    # concatenated and projected to the 4096-wide text model.
    "mllama-projector": Shape(
        OP,
        "mllama-projector",
        dict(lead=(6404,), dims=(1280,) * 6, N=4096),
        variants=("default",),
        source="Mllama projector: 6 sources of [6404, 1280] (final + 5 intermediate layers, one "
        "image of 4 tiles x 1601 tokens) -> 4096",
    ),
    "llava-2layer": Shape(
        OP,
        "llava-2layer",
        dict(lead=(576,), dims=(1024, 1024), N=4096),
        variants=("default",),
        source="two CLIP ViT-L/14-336 layers of 576 patch tokens -> Linear(2048, 4096)",
    ),
    "tiny": Shape(
        OP,
        "tiny",
        dict(lead=(2, 5), dims=(8, 12, 4), N=20),
        variants=("default",),
        source="small sizes for tests (unequal feature widths)",
    ),
}

VARIANT_HELP = "default (the only variant)"


def make_inputs(shape, variant, dtype, device, seed, requires_grad) -> Inputs:
    if variant != "default":
        raise ValueError(f"unknown concat_project variant {variant!r}; {VARIANT_HELP}")
    p = shape.params
    gen = seeded_generator(seed)
    features = [randn((*p["lead"], d), gen, dtype, device, 1.0, requires_grad) for d in p["dims"]]
    in_features = sum(p["dims"])
    weight = randn((p["N"], in_features), gen, dtype, device, in_features**-0.5, requires_grad)
    bias = randn((p["N"],), gen, dtype, device, 0.02, requires_grad)
    return Inputs(
        tensors=dict(features=features, weight=weight, bias=bias),
        grad_inputs=(*features, weight, bias) if requires_grad else (),
    )


def call_ours(inputs: Inputs, backend: str) -> torch.Tensor:
    import vlm_kernels as vk

    t = inputs.tensors
    return vk.concat_project(t["features"], t["weight"], t["bias"], backend=backend)


def flops(inputs: Inputs, mode: str) -> int:
    """2 * tokens * K * N for the GEMM; fwd_bwd = 3x (grad of the features and of the weight)."""
    weight = inputs.tensors["weight"]
    tokens = inputs.tensors["features"][0][..., 0].numel()
    fwd = 2 * tokens * weight.shape[0] * weight.shape[1]
    return fwd if mode == "fwd" else 3 * fwd


def prepare_cat_linear(inputs: Inputs):
    features, weight, bias = (inputs.tensors[n] for n in ("features", "weight", "bias"))

    def run():
        return F.linear(torch.cat(features, dim=-1), weight, bias)

    return run


def prepare_split_linear(inputs: Inputs):
    features, weight, bias = (inputs.tensors[n] for n in ("features", "weight", "bias"))
    bounds, start = [], 0
    for feature in features:
        bounds.append((start, start + feature.shape[-1]))
        start += feature.shape[-1]

    def run():
        lead = features[0].shape[:-1]
        out = bias.expand(lead.numel(), weight.shape[0])
        for feature, (lo, hi) in zip(features, bounds, strict=True):
            out = torch.addmm(out, feature.reshape(-1, hi - lo), weight[:, lo:hi].t())
        return out.reshape(*lead, weight.shape[0])

    return run


SPEC = OpSpec(
    name=OP,
    shapes=SHAPES,
    make_inputs=make_inputs,
    call_ours=call_ours,
    flops=flops,
    peers=(
        Peer("cat_linear", "torch.cat + F.linear", prepare_cat_linear),
        Peer(
            "split_linear",
            "addmm per feature with its weight column block (no concat)",
            prepare_split_linear,
        ),
    ),
    default_baseline="cat_linear",
    variant_help=VARIANT_HELP,
)
