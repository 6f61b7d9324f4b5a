"""PatchEmbed's loaders against the real classes: timm ``VisionTransformer``, Hugging Face
``CLIPVisionEmbeddings`` (and the models holding it) and ``MllamaVisionModel``, built from tiny configs
with random weights (no hub access). Our module's output vs the real module's embedding output in float32
and bfloat16 under the DESIGN §6 policy (err(ours) <= 2 * err(torch in the same dtype) + floor, both
against the real module in float64), weights carried over bit for bit, the state dict round trip, the
documented Mllama recipe up to ``layernorm_pre``, and the unsupported variants rejected by name."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

from tests.attention_testing import assert_within_policy
from vlm_kernels.nn import PatchEmbed

timm_vit = pytest.importorskip(
    "timm.models.vision_transformer", reason="timm is not installed (requirements.txt pins it)"
)
transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (requirements.txt pins it)"
)
from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD  # noqa: E402

pytestmark = pytest.mark.usefixtures("tensors_on_test_device")
BACKENDS = [None, "reference"]  # None = auto: the fastest kernel here
DTYPES = [torch.float32, torch.bfloat16]


def randomize(*tensors: torch.Tensor) -> None:
    """O(1) random values: the libraries init CLS / position / gates near zero (or at zero), where a
    loader that drops or swaps them would still pass."""
    with torch.no_grad():
        for tensor in tensors:
            tensor.normal_()


def check_against_real(load, real, model: nn.Module, pick, pixels: torch.Tensor, dtype):
    """``load(model in dtype)`` (our PatchEmbed) on ``pixels`` vs ``real(pick(model), pixels)`` with the
    model in ``dtype`` and in float64. Returns (ours, pick(the model in dtype))."""
    lowp_model = copy.deepcopy(model).to(dtype)
    ours = load(lowp_model)
    ref = real(pick(copy.deepcopy(model).double()), pixels.double())
    lowp = real(pick(lowp_model), pixels.to(dtype))
    out = ours(pixels.to(dtype))
    assert out.dtype == ours.proj.weight.dtype == dtype  # the loader keeps the source's dtype
    assert_within_policy(type(model).__name__, out, lowp, ref, dtype)
    return ours, pick(lowp_model)


def assert_state_round_trip(ours: PatchEmbed, expected_keys: set[str], pixels: torch.Tensor):
    """The state dict has exactly the timm names and loads into a fresh PatchEmbed of the same shape."""
    state = ours.state_dict()
    assert set(state) == expected_keys
    fresh = PatchEmbed(
        ours.img_size,
        ours.patch_size,
        ours.in_chans,
        ours.embed_dim,
        bias=ours.proj.bias is not None,
        class_token=ours.cls_token is not None,
        pos_embed=ours.pos_embed is not None,
        dtype=ours.proj.weight.dtype,
        backend=ours.backend,  # bitwise equality needs the same kernel
    )
    fresh.load_state_dict(state)
    assert torch.equal(fresh(pixels), ours(pixels))


# ---- timm VisionTransformer -----------------------------------------------------------------------------

TIMM_VARIANTS = {
    "cls+pos": dict(),
    "gap, no class token": dict(class_token=False, global_pool="avg"),
    "no_embed_class without prefix tokens": dict(
        class_token=False, global_pool="avg", no_embed_class=True
    ),
    "no pos_embed": dict(pos_embed="none"),
    "pre_norm (no proj bias), 1 channel": dict(pre_norm=True, in_chans=1),
    "non-square image": dict(img_size=(24, 40)),
}


def make_vit(**overrides) -> nn.Module:
    kwargs = dict(img_size=24, patch_size=8, embed_dim=32, depth=1, num_heads=4, num_classes=0)
    kwargs.update(overrides)
    vit = timm_vit.VisionTransformer(**kwargs).eval()
    randomize(
        *(t for t in (vit.cls_token, vit.pos_embed, vit.patch_embed.proj.bias) if t is not None)
    )
    return vit


def timm_front(vit: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    return vit._pos_embed(vit.patch_embed(pixels))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", list(TIMM_VARIANTS))
def test_from_timm_vit_matches_vit_front(variant, dtype, backend):
    vit = make_vit(**TIMM_VARIANTS[variant])
    pixels = torch.randn(2, vit.patch_embed.proj.in_channels, *vit.patch_embed.img_size)
    ours, vit = check_against_real(
        lambda model: PatchEmbed.from_timm_vit(model, backend=backend),
        timm_front,
        vit,
        lambda model: model,
        pixels,
        dtype,
    )
    embed = vit.patch_embed

    assert torch.equal(ours.proj.weight, embed.proj.weight)  # carried over unchanged
    assert (ours.cls_token is None) == (vit.cls_token is None)
    assert (ours.pos_embed is None) == (vit.pos_embed is None)
    for name in ("cls_token", "pos_embed"):
        if getattr(vit, name) is not None:
            assert torch.equal(getattr(ours, name), getattr(vit, name))
    present = {
        "proj.weight": True,
        "proj.bias": embed.proj.bias is not None,
        "cls_token": vit.cls_token is not None,
        "pos_embed": vit.pos_embed is not None,
    }
    expected_keys = {key for key, there in present.items() if there}
    assert_state_round_trip(ours, expected_keys, pixels)


def test_from_timm_vit_copies_on_the_source_dtype_and_is_independent():
    vit = make_vit().to(torch.bfloat16)
    ours = PatchEmbed.from_timm_vit(vit, pixel_mean=[0.5] * 3, pixel_std=[0.25] * 3)
    assert ours.proj.weight.dtype == ours.pos_embed.dtype == torch.bfloat16
    assert ours.pixel_mean.dtype == torch.float32  # the normalization constants stay exact
    assert ours.proj.weight.data_ptr() != vit.patch_embed.proj.weight.data_ptr()
    with torch.no_grad():
        ours.cls_token.zero_()
    assert vit.cls_token.abs().sum() > 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(reg_tokens=2), r"vit\.reg_token \(1, 2, 32\) \(register tokens\)"),
        (dict(no_embed_class=True), r"vit\.no_embed_class=True with a class token"),
        (dict(dynamic_img_size=True), r"vit\.dynamic_img_size=True"),
        (dict(dynamic_img_pad=True), r"vit\.patch_embed\.dynamic_img_pad=True"),
        (dict(embed_norm_layer=nn.LayerNorm), r"vit\.patch_embed\.norm \(LayerNorm\)"),
        (dict(patch_size=(8, 4)), r"non-square kernel \(8, 4\).*square P x P patches only"),
    ],
    ids=["reg_tokens", "no_embed_class", "dynamic_img_size", "dynamic_img_pad", "norm", "patch"],
)
def test_from_timm_vit_rejects_unsupported_variants(overrides, message):
    with pytest.raises(ValueError, match=message):
        PatchEmbed.from_timm_vit(make_vit(**overrides))


def test_from_timm_vit_rejects_a_hybrid_backbone():
    """A hybrid ViT's patch_embed.proj is a Conv2d on the backbone's features, not on the pixels."""
    from timm.layers import HybridEmbed

    backbone = nn.Conv2d(3, 8, 4, stride=4)
    vit = make_vit(
        img_size=32, patch_size=1, embed_layer=functools.partial(HybridEmbed, backbone=backbone)
    )
    with pytest.raises(ValueError, match=r"vit\.patch_embed\.backbone \(Conv2d, a hybrid ViT\)"):
        PatchEmbed.from_timm_vit(vit)


def test_from_timm_vit_rejects_wrong_shapes_and_types():
    vit = make_vit()
    vit.pos_embed = nn.Parameter(torch.randn(1, 9, 32))  # 3 x 3 patches + CLS would be 10
    with pytest.raises(
        ValueError,
        match=r"pos_embed from vit\.pos_embed has shape \(1, 9, 32\), expected \(1, 10, 32\)",
    ):
        PatchEmbed.from_timm_vit(vit)
    vit = make_vit()
    vit.patch_embed.proj = nn.Conv2d(3, 32, 8, stride=4)
    with pytest.raises(ValueError, match=r"kernel = stride.*kernel \(8, 8\), stride \(4, 4\)"):
        PatchEmbed.from_timm_vit(vit)
    vit.patch_embed.proj = nn.Linear(192, 32)
    with pytest.raises(TypeError, match=r"must be an nn\.Conv2d .* got Linear"):
        PatchEmbed.from_timm_vit(vit)
    with pytest.raises(TypeError, match=r"timm VisionTransformer with a \.patch_embed"):
        PatchEmbed.from_timm_vit(nn.Linear(2, 2))


# ---- Hugging Face CLIP -------------------------------------------------------------------------------

CLIP_VISION = dict(
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=1,
    num_attention_heads=4,
    image_size=30,  # a 5 x 5 grid of 6 x 6 patches
    patch_size=6,
)


def make_clip(kind: str) -> tuple[nn.Module, nn.Module]:
    """(the object handed to the loader, its CLIPVisionEmbeddings)."""
    if kind == "CLIPModel":
        text = dict(
            hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4
        )
        config = transformers.CLIPConfig(vision_config=CLIP_VISION, text_config=text)
        model = transformers.CLIPModel(config)
        embeddings = model.vision_model.embeddings
    else:
        model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**CLIP_VISION))
        embeddings = model.embeddings
        model = embeddings if kind == "CLIPVisionEmbeddings" else model
    model.eval()
    randomize(embeddings.class_embedding, embeddings.position_embedding.weight)
    return model, embeddings


def find_clip_embeddings(kind: str, model: nn.Module) -> nn.Module:
    return {
        "CLIPVisionEmbeddings": lambda: model,
        "CLIPVisionModel": lambda: model.embeddings,
        "CLIPModel": lambda: model.vision_model.embeddings,
    }[kind]()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["CLIPVisionEmbeddings", "CLIPVisionModel", "CLIPModel"])
def test_from_hf_clip_matches_embeddings(kind, dtype, backend):
    model, _ = make_clip(kind)
    ours, embeddings = check_against_real(
        lambda model: PatchEmbed.from_hf_clip(model, backend=backend),
        lambda embeddings, x: embeddings(x),
        model,
        lambda model: find_clip_embeddings(kind, model),
        torch.randn(2, 3, 30, 30),
        dtype,
    )

    assert torch.equal(ours.proj.weight, embeddings.patch_embedding.weight)
    assert torch.equal(ours.cls_token.reshape(-1), embeddings.class_embedding)
    assert torch.equal(ours.pos_embed[0], embeddings.position_embedding.weight)
    assert_state_round_trip(
        ours, {"proj.weight", "cls_token", "pos_embed"}, torch.randn(1, 3, 30, 30)
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_loaded_modules_train_like_the_originals(backend):
    """Gradients reach our copies as they reach the originals (fine-tuning after loading): the CLS
    reshape, the pos_embed view and the weight layout carry gradients unchanged."""
    cotangent = torch.randn(2, 26, 32)
    pixels = torch.randn(2, 3, 30, 30)
    _, embeddings = make_clip("CLIPVisionEmbeddings")
    ours = PatchEmbed.from_hf_clip(embeddings, backend=backend)
    (ours(pixels) * cotangent).sum().backward()
    (embeddings(pixels) * cotangent).sum().backward()
    pairs = [
        (ours.proj.weight.grad, embeddings.patch_embedding.weight.grad),
        (ours.cls_token.grad.reshape(-1), embeddings.class_embedding.grad),
        (ours.pos_embed.grad[0], embeddings.position_embedding.weight.grad),
    ]
    for got, want in pairs:
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_from_hf_clip_uint8_pixels_with_the_processor_constants(backend):
    """Camera bytes in: the op's x / 255 then (x - mean) / std is CLIPImageProcessor's rescale +
    normalize."""
    _, embeddings = make_clip("CLIPVisionEmbeddings")
    ours = PatchEmbed.from_hf_clip(
        embeddings, pixel_mean=OPENAI_CLIP_MEAN, pixel_std=OPENAI_CLIP_STD, backend=backend
    )
    pixels = torch.randint(0, 256, (2, 3, 30, 30), dtype=torch.uint8)
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    expected = embeddings((pixels / 255 - mean) / std)
    torch.testing.assert_close(ours(pixels), expected, atol=1e-4, rtol=1e-4)


def test_from_hf_clip_rejects_wrong_models_and_shapes():
    with pytest.raises(TypeError, match=r"CLIPVisionEmbeddings .* got VisionTransformer"):
        PatchEmbed.from_hf_clip(make_vit())
    _, embeddings = make_clip("CLIPVisionEmbeddings")
    embeddings.position_embedding = nn.Embedding(25, 32)  # the CLS position is missing
    with pytest.raises(
        ValueError,
        match=r"pos_embed from embeddings\.position_embedding\.weight has shape \(1, 25, 32\), "
        r"expected \(1, 26, 32\)",
    ):
        PatchEmbed.from_hf_clip(embeddings)


# ---- Hugging Face Mllama ------------------------------------------------------------------------------

MLLAMA_VISION = dict(
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=1,
    num_global_layers=1,
    attention_heads=4,
    vision_output_dim=64,
    image_size=28,  # a 4 x 4 grid of 7 x 7 patches
    patch_size=7,
    intermediate_layers_indices=[0],
)


def make_mllama(kind: str) -> tuple[nn.Module, nn.Module]:
    """(the object handed to the loader, its MllamaVisionModel)."""
    if kind == "MllamaForConditionalGeneration":
        text = dict(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=64,
            cross_attention_layers=[1],
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=3,
        )
        config = transformers.MllamaConfig(vision_config=MLLAMA_VISION, text_config=text)
        model = transformers.MllamaForConditionalGeneration(config)
        vision = model.model.vision_model
    else:
        vision = transformers.MllamaVisionModel(transformers.MllamaVisionConfig(**MLLAMA_VISION))
        model = vision
    model.eval()
    randomize(
        vision.class_embedding,
        vision.pre_tile_positional_embedding.gate,
        vision.pre_tile_positional_embedding.embedding.weight,
        vision.gated_positional_embedding.gate,
        vision.gated_positional_embedding.embedding,
        vision.gated_positional_embedding.tile_embedding.weight,
    )
    return model, vision


def mllama_front(vision: nn.Module, tiles: torch.Tensor) -> torch.Tensor:
    """What the loader's docstring says our output equals, in HF's own calls."""
    patch_embeds = vision.patch_embedding(tiles).flatten(2).transpose(1, 2)
    return vision.apply_class_embedding(patch_embeds)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["MllamaVisionModel", "MllamaForConditionalGeneration"])
def test_from_mllama_matches_class_and_patch_embedding(kind, dtype, backend):
    model, _ = make_mllama(kind)
    tiles = torch.randn(3, 3, 28, 28)
    ours, vision = check_against_real(
        lambda model: PatchEmbed.from_mllama(model, backend=backend),
        mllama_front,
        model,
        lambda model: model if kind == "MllamaVisionModel" else model.model.vision_model,
        tiles,
        dtype,
    )
    assert ours.pos_embed is None and ours.proj.bias is None
    assert torch.equal(ours.proj.weight, vision.patch_embedding.weight)
    assert torch.equal(ours.cls_token.reshape(-1), vision.class_embedding)
    assert_state_round_trip(ours, {"proj.weight", "cls_token"}, tiles)


def test_from_mllama_recipe_reproduces_the_input_of_layernorm_pre():
    """The docstring's recipe: pre-tile embedding on the patch tokens, gated position embedding on all,
    equals what MllamaVisionModel feeds its layernorm_pre (nonzero gates, 2 images of 4 tiles)."""
    _, vision = make_mllama("MllamaVisionModel")
    ours = PatchEmbed.from_mllama(vision)
    batch, images, tiles = 1, 2, 4
    pixel_values = torch.randn(batch, images, tiles, 3, 28, 28)
    aspect_ratio_ids = torch.tensor([[5, 2]])  # 2 x 2 tiles and 1 x 2 tiles
    aspect_ratio_mask = torch.tensor([[[1, 1, 1, 1], [1, 1, 0, 0]]])
    captured = []
    hook = vision.layernorm_pre.register_forward_pre_hook(lambda _, args: captured.append(args[0]))
    with torch.no_grad():
        vision(pixel_values, aspect_ratio_ids, aspect_ratio_mask)
    hook.remove()

    with torch.no_grad():
        tokens = ours(pixel_values.flatten(0, 2))  # [B * images * tiles, 1 + 16, D]
        tokens = tokens.reshape(batch * images, tiles, 1 + 16, 32)
        ids = aspect_ratio_ids.reshape(batch * images, -1)
        patches = vision.pre_tile_positional_embedding(tokens[:, :, 1:], ids)
        tokens = torch.cat([tokens[:, :, :1], patches], dim=2)
        tokens = vision.gated_positional_embedding(tokens, ids)
    torch.testing.assert_close(tokens, captured[0], atol=1e-5, rtol=1e-5)


def test_from_mllama_rejects_other_models():
    clip, _ = make_clip("CLIPVisionModel")
    with pytest.raises(TypeError, match=r"MllamaVisionModel .* got CLIPVisionModel"):
        PatchEmbed.from_mllama(clip)


# ---- constructor ------------------------------------------------------------------------------------


def test_constructor_takes_pairs_and_rejects_non_square_patches():
    module = PatchEmbed((16, 24), (8, 8), 3, 16, class_token=True, pos_embed=True)
    assert module.patch_size == 8 and module.grid_size == (2, 3) and module.num_tokens == 7
    assert module(torch.randn(1, 3, 16, 24)).shape == (1, 7, 16)
    with pytest.raises(ValueError, match=r"patch_size \(16, 8\) is not square.*square P x P"):
        PatchEmbed(32, (16, 8))
    with pytest.raises(ValueError, match="patch_size must be positive ints, got 0"):
        PatchEmbed(32, 0)
    with pytest.raises(ValueError, match=r"img_size must be an int or a \(height, width\) pair"):
        PatchEmbed((32, 32, 3), 16)
