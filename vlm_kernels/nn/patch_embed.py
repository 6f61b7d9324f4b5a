"""PatchEmbed: image -> patch tokens on ``vlm_kernels.patch_embed``, with timm's parameter names.

    pixels [B, C, H, W] (uint8 camera bytes or float) -> tokens [B, N, D], N = (H/P)*(W/P) + (1 if CLS)

Parameters (timm ``VisionTransformer`` names, so a timm state dict loads as it is):
    proj.weight [D, C, P, P], proj.bias [D]      (timm ``patch_embed.proj``)
    cls_token [1, 1, D], pos_embed [1, N, D]     (timm keeps these on the ViT; here they ride along
                                                  so the op can fuse them into its epilogue)
Optional ``pixel_mean`` / ``pixel_std`` [C] are non-persistent float32 buffers: the normalization runs
inside the op's load (uint8 pixels are read as ``(x / 255 - mean) / std``), so no normalized copy of the
image exists.

Loaders copy pretrained weights over unchanged (same values, dtype and device) from the real modules:

    PatchEmbed.from_timm_vit(vit)      timm ``VisionTransformer``
        patch_embed.proj.weight -> proj.weight    patch_embed.proj.bias -> proj.bias
        cls_token [1, 1, D]     -> cls_token      pos_embed [1, N, D]   -> pos_embed
    PatchEmbed.from_hf_clip(model)     HF ``CLIPVisionEmbeddings`` (or a model holding one)
        patch_embedding.weight            -> proj.weight (no bias)
        class_embedding [D]               -> cls_token [1, 1, D]
        position_embedding.weight [N, D]  -> pos_embed [1, N, D]
    PatchEmbed.from_mllama(model)      HF ``MllamaVisionModel`` (or a model holding one)
        patch_embedding.weight -> proj.weight (no bias)
        class_embedding [D]    -> cls_token [1, 1, D]     (no pos_embed: Mllama's tile-dependent
                                                           position embeddings stay with the caller)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

import vlm_kernels as vk
from vlm_kernels.nn._autocast import autocast_dtype, cast


def _pair(name: str, value: int | Sequence[int]) -> tuple[int, int]:
    """An int or an (height, width) pair of positive ints, as a tuple; ValueError naming ``name``."""
    if isinstance(value, int) and not isinstance(value, bool):
        pair = (value, value)
    elif isinstance(value, Sequence) and len(value) == 2:
        pair = tuple(value)
    else:
        raise ValueError(f"{name} must be an int or a (height, width) pair, got {value!r}")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair):
        raise ValueError(f"{name} must be positive ints, got {value!r}")
    return pair


class PatchEmbed(nn.Module):
    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int | Sequence[int] = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        *,
        bias: bool = True,
        class_token: bool = False,
        pos_embed: bool = False,
        pixel_mean: Sequence[float] | None = None,
        pixel_std: Sequence[float] | None = None,
        backend: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        """``img_size`` and ``patch_size`` are an int or a (height, width) pair; the patch must be square
        (``vk.patch_embed`` takes P x P patches only). ``device`` / ``dtype`` place the parameters, as
        for ``nn.Conv2d``; the pixel_mean / pixel_std buffers stay float32 on ``device``."""
        super().__init__()
        self.img_size = _pair("img_size", img_size)
        patch_h, patch_w = _pair("patch_size", patch_size)
        if patch_h != patch_w:
            raise ValueError(
                f"patch_size {(patch_h, patch_w)} is not square: vk.patch_embed (and so PatchEmbed) "
                f"supports square P x P patches only"
            )
        self.patch_size = patch_h
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        if self.img_size[0] % self.patch_size or self.img_size[1] % self.patch_size:
            raise ValueError(
                f"img_size {self.img_size} must be a multiple of patch_size {self.patch_size}"
            )
        self.grid_size = (self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.num_prefix_tokens = 1 if class_token else 0
        self.num_tokens = self.num_patches + self.num_prefix_tokens
        self.backend = backend
        factory = {"device": device, "dtype": dtype}
        # An nn.Conv2d only holds proj.weight / proj.bias (and its init); the op does the work.
        self.proj = nn.Conv2d(
            in_chans, embed_dim, self.patch_size, self.patch_size, bias=bias, **factory
        )
        self.cls_token = (
            nn.Parameter(torch.randn(1, 1, embed_dim, **factory) * 1e-6) if class_token else None
        )
        self.pos_embed = (
            nn.Parameter(torch.randn(1, self.num_tokens, embed_dim, **factory) * 0.02)
            if pos_embed
            else None
        )
        for name, values in (("pixel_mean", pixel_mean), ("pixel_std", pixel_std)):
            if values is not None and len(values) != in_chans:
                raise ValueError(f"{name} needs {in_chans} values (one per channel), got {values}")
            buffer = (
                None if values is None else torch.tensor(values, dtype=torch.float32, device=device)
            )
            self.register_buffer(name, buffer, persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, C, H, W] uint8 or float, H x W = img_size -> [B, N, D]."""
        if not isinstance(pixels, torch.Tensor) or pixels.dim() != 4:
            shape = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels)
            raise ValueError(f"pixels must be [B, C, H, W], got {shape}")
        # A position embedding fixes the grid, so the image size must be img_size; without one any
        # multiple of the patch size works (the op checks that).
        if pixels.shape[1] != self.in_chans or (
            self.pos_embed is not None and tuple(pixels.shape[2:]) != self.img_size
        ):
            height, width = self.img_size
            raise ValueError(
                f"pixels must be [B, {self.in_chans}, {height}, {width}] for this PatchEmbed "
                f"(in_chans={self.in_chans}, img_size={self.img_size}), got {tuple(pixels.shape)}"
            )
        dtype = autocast_dtype(pixels.device)
        dim = self.embed_dim
        cls_token = None if self.cls_token is None else self.cls_token.reshape(dim)
        pos_embed = None if self.pos_embed is None else self.pos_embed.reshape(-1, dim)
        return vk.patch_embed(
            cast(pixels, dtype),
            cast(self.proj.weight, dtype),
            cast(self.proj.bias, dtype),
            cls_token=cast(cls_token, dtype),
            pos_embed=cast(pos_embed, dtype),
            pixel_mean=self.pixel_mean,
            pixel_std=self.pixel_std,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"img_size={self.img_size}, patch_size={self.patch_size}, in_chans={self.in_chans}, "
            f"embed_dim={self.embed_dim}, class_token={self.cls_token is not None}, "
            f"pos_embed={self.pos_embed is not None}, backend={self.backend!r}"
        )

    # ---- loaders: pretrained weights from the real timm / Hugging Face modules -----------------------
    # They read the modules' attributes (duck typing), so neither timm nor transformers is imported here.

    @classmethod
    def from_timm_vit(
        cls,
        vit: nn.Module,
        *,
        pixel_mean: Sequence[float] | None = None,
        pixel_std: Sequence[float] | None = None,
        backend: str | None = None,
    ) -> PatchEmbed:
        """The embedding front of a timm ``VisionTransformer``, weights copied unchanged.

        Output = ``vit._pos_embed(vit.patch_embed(x))`` in eval mode (CLS first when the ViT has one, then
        the position embedding added), [B, N, D]; ``vit.patch_drop`` and ``vit.norm_pre`` come after it
        and stay with the caller. Supported: the standard layout (``class_token`` True or False, a learned
        ``pos_embed`` over all tokens or none, any global pooling: pooling acts after the blocks). Rejected
        with a ValueError naming the attribute: ``reg_token`` (register tokens), ``no_embed_class`` with a
        class token (pos_embed skips the CLS: the op adds pos[0] to it), ``dynamic_img_size`` /
        ``patch_embed.dynamic_img_pad`` (the op has a fixed grid when pos_embed is given), a
        ``patch_embed.norm`` and patch embeds that are not one Conv2d with kernel = stride (hybrid ViTs).

        For uint8 pixels pass the model's normalization, e.g.
        ``timm.data.resolve_model_data_config(vit)["mean"]`` / ``["std"]``.
        """
        patch_embed = _required(vit, "patch_embed", "a timm VisionTransformer")
        conv = _required(patch_embed, "proj", "a timm VisionTransformer's patch_embed")
        if getattr(vit, "reg_token", None) is not None:
            raise ValueError(
                f"vit.reg_token {tuple(vit.reg_token.shape)} (register tokens) is not supported: "
                f"PatchEmbed has at most one prefix token (the CLS)"
            )
        if getattr(vit, "dynamic_img_size", False):
            raise ValueError(
                "vit.dynamic_img_size=True is not supported: PatchEmbed has a fixed grid "
                "(build the ViT with dynamic_img_size=False)"
            )
        if getattr(patch_embed, "dynamic_img_pad", False):
            raise ValueError("vit.patch_embed.dynamic_img_pad=True is not supported (no padding)")
        if not isinstance(getattr(patch_embed, "norm", nn.Identity()), nn.Identity):
            raise ValueError(
                f"vit.patch_embed.norm ({type(patch_embed.norm).__name__}) is not supported: "
                f"PatchEmbed has no norm after the projection"
            )
        if getattr(patch_embed, "backbone", None) is not None:
            raise ValueError(
                f"vit.patch_embed.backbone ({type(patch_embed.backbone).__name__}, a hybrid ViT) is "
                f"not supported: PatchEmbed is one Conv2d on the pixels"
            )
        if not getattr(patch_embed, "flatten", True):
            raise ValueError("vit.patch_embed.flatten=False (NHWC output) is not supported")
        cls_token = getattr(vit, "cls_token", None)
        pos_embed = getattr(vit, "pos_embed", None)
        if (
            cls_token is not None
            and pos_embed is not None
            and getattr(vit, "no_embed_class", False)
        ):
            raise ValueError(
                "vit.no_embed_class=True with a class token is not supported: its pos_embed "
                f"{tuple(pos_embed.shape)} leaves the CLS token out, PatchEmbed adds pos_embed[0] to it"
            )
        img_size = getattr(patch_embed, "img_size", None)
        if img_size is None:
            raise ValueError(
                "vit.patch_embed.img_size is None: PatchEmbed needs a fixed image size"
            )
        tensors = {
            "proj.weight": ("vit.patch_embed.proj.weight", conv.weight),
            "proj.bias": ("vit.patch_embed.proj.bias", conv.bias),
            "cls_token": ("vit.cls_token", cls_token),
            "pos_embed": ("vit.pos_embed", pos_embed),
        }
        return cls._from_parts(
            "vit",
            conv,
            img_size,
            tensors,
            pixel_mean=pixel_mean,
            pixel_std=pixel_std,
            backend=backend,
        )

    @classmethod
    def from_hf_clip(
        cls,
        model: nn.Module,
        *,
        pixel_mean: Sequence[float] | None = None,
        pixel_std: Sequence[float] | None = None,
        backend: str | None = None,
    ) -> PatchEmbed:
        """Hugging Face CLIP's vision embeddings, weights copied unchanged.

        ``model``: a ``CLIPVisionEmbeddings``, or a model holding one as ``.embeddings``
        (``CLIPVisionModel``) or ``.vision_model.embeddings`` (``CLIPModel``,
        ``CLIPVisionModelWithProjection``). Output = ``embeddings(pixel_values)`` (no
        ``interpolate_pos_encoding``): [B, 1 + (H/P)*(W/P), D], CLS first, position embedding added.
        ``pre_layrnorm`` comes after it and stays with the caller.

        For uint8 pixels pass the image processor's constants, e.g.
        ``transformers.utils.constants.OPENAI_CLIP_MEAN`` / ``OPENAI_CLIP_STD``
        (= ``CLIPImageProcessor().image_mean`` / ``image_std``): the op reads uint8 as x / 255 and then
        normalizes, as the processor's rescale + normalize do.
        """
        embeddings = _find(
            model, ("", "embeddings", "vision_model.embeddings"), "position_embedding"
        )
        if embeddings is None:
            raise TypeError(
                "model must be a CLIPVisionEmbeddings or hold one as .embeddings (CLIPVisionModel) "
                f"or .vision_model.embeddings (CLIPModel), got {type(model).__name__}"
            )
        conv = _required(embeddings, "patch_embedding", "CLIPVisionEmbeddings")
        class_embedding = _required(embeddings, "class_embedding", "CLIPVisionEmbeddings")
        position = _required(embeddings, "position_embedding", "CLIPVisionEmbeddings")
        tensors = {
            "proj.weight": ("embeddings.patch_embedding.weight", conv.weight),
            "proj.bias": ("embeddings.patch_embedding.bias", conv.bias),
            "cls_token": (
                "embeddings.class_embedding",
                _as_token(class_embedding, "embeddings.class_embedding"),
            ),
            "pos_embed": ("embeddings.position_embedding.weight", position.weight.unsqueeze(0)),
        }
        return cls._from_parts(
            "embeddings",
            conv,
            embeddings.image_size,
            tensors,
            pixel_mean=pixel_mean,
            pixel_std=pixel_std,
            backend=backend,
        )

    @classmethod
    def from_mllama(
        cls,
        model: nn.Module,
        *,
        pixel_mean: Sequence[float] | None = None,
        pixel_std: Sequence[float] | None = None,
        backend: str | None = None,
    ) -> PatchEmbed:
        """Mllama's (Llama 3.2 Vision) patch embedding + class embedding, weights copied unchanged.

        ``model``: a ``MllamaVisionModel``, or a model holding one as ``.vision_model`` (``MllamaModel``)
        or ``.model.vision_model`` (``MllamaForConditionalGeneration``). For tiles ``x`` [B, C, H, W]
        (HF's pixel_values [batch, images, tiles, C, H, W] flattened to B = batch * images * tiles):

            out[:, 0]  = vision_model.class_embedding
            out[:, 1:] = vision_model.patch_embedding(x).flatten(2).transpose(1, 2)

        i.e. ``vision_model.apply_class_embedding(patch_embeds)`` with no position embedding: Mllama adds
        ``pre_tile_positional_embedding`` to the patch tokens only and then ``gated_positional_embedding``
        to all tokens, both chosen by ``aspect_ratio_ids``; the caller applies them (the pre-tile one to
        ``out[:, 1:]``; additions commute, so adding it after the CLS is placed is the same) before
        ``layernorm_pre``. For uint8 pixels pass the checkpoint's image processor constants
        (``processor.image_processor.image_mean`` / ``image_std``; the class defaults are 0.5 / 0.5,
        a checkpoint's preprocessor config may set others).
        """
        vision = _find(
            model, ("", "vision_model", "model.vision_model"), "gated_positional_embedding"
        )
        if vision is None:
            raise TypeError(
                "model must be a MllamaVisionModel or hold one as .vision_model (MllamaModel) or "
                f".model.vision_model (MllamaForConditionalGeneration), got {type(model).__name__}"
            )
        conv = _required(vision, "patch_embedding", "MllamaVisionModel")
        class_embedding = _required(vision, "class_embedding", "MllamaVisionModel")
        tensors = {
            "proj.weight": ("vision_model.patch_embedding.weight", conv.weight),
            "proj.bias": ("vision_model.patch_embedding.bias", conv.bias),
            "cls_token": (
                "vision_model.class_embedding",
                _as_token(class_embedding, "vision_model.class_embedding"),
            ),
        }
        return cls._from_parts(
            "vision_model",
            conv,
            vision.image_size,
            tensors,
            pixel_mean=pixel_mean,
            pixel_std=pixel_std,
            backend=backend,
        )

    @classmethod
    def _from_parts(
        cls,
        owner: str,
        conv: nn.Module,
        img_size: int | Sequence[int],
        tensors: dict[str, tuple[str, torch.Tensor | None]],
        *,
        pixel_mean: Sequence[float] | None,
        pixel_std: Sequence[float] | None,
        backend: str | None,
    ) -> PatchEmbed:
        """A PatchEmbed on ``conv.weight``'s device and dtype holding copies of ``tensors``:
        {our key: (the source's name for it, tensor or None)}; cls_token / pos_embed exist when given."""
        _check_patch_conv(conv, owner)
        dim, channels, patch, _ = conv.weight.shape
        present = {key: tensor for key, (_, tensor) in tensors.items() if tensor is not None}
        module = cls(
            _pair(f"{owner} image size", img_size),
            patch,
            channels,
            dim,
            bias="proj.bias" in present,
            class_token="cls_token" in present,
            pos_embed="pos_embed" in present,
            pixel_mean=pixel_mean,
            pixel_std=pixel_std,
            backend=backend,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        own = module.state_dict()
        for key, tensor in present.items():
            if tensor.shape != own[key].shape:
                raise ValueError(
                    f"{key} from {tensors[key][0]} has shape {tuple(tensor.shape)}, expected "
                    f"{tuple(own[key].shape)} (img_size {module.img_size}, patch {patch}, dim {dim}, "
                    f"{module.num_prefix_tokens} prefix token(s))"
                )
        module.load_state_dict({key: tensor.detach() for key, tensor in present.items()})
        return module


def _required(owner: Any, name: str, what: str) -> Any:
    value = getattr(owner, name, None)
    if value is None:
        raise TypeError(f"expected {what} with a .{name}, got {type(owner).__name__} without one")
    return value


def _find(model: nn.Module, paths: Sequence[str], marker: str) -> nn.Module | None:
    """The first module along the dotted ``paths`` from ``model`` that has an attribute ``marker``."""
    for path in paths:
        node = model
        for part in filter(None, path.split(".")):
            node = getattr(node, part, None)
        if node is not None and getattr(node, marker, None) is not None:
            return node
    return None


def _as_token(class_embedding: torch.Tensor, name: str) -> torch.Tensor:
    """HF's class embedding [D] as our cls_token [1, 1, D]."""
    if class_embedding.dim() != 1:
        raise ValueError(f"{name} must be [D], got {tuple(class_embedding.shape)}")
    return class_embedding.reshape(1, 1, -1)


def _check_patch_conv(conv: nn.Module, owner: str) -> None:
    """``conv`` must be a Conv2d that cuts non-overlapping square patches (kernel = stride, no padding)."""
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(
            f"{owner}'s patch projection must be an nn.Conv2d (kernel = stride = P), got "
            f"{type(conv).__name__}"
        )
    kernel, stride = tuple(conv.kernel_size), tuple(conv.stride)
    padding = conv.padding if isinstance(conv.padding, str) else tuple(conv.padding)
    if kernel[0] != kernel[1]:
        raise ValueError(
            f"{owner}'s patch projection has a non-square kernel {kernel}: vk.patch_embed (and so "
            f"PatchEmbed) supports square P x P patches only"
        )
    if (
        stride != kernel
        or padding not in ("valid", (0, 0))
        or tuple(conv.dilation) != (1, 1)
        or conv.groups != 1
    ):
        raise ValueError(
            f"{owner}'s patch projection must cut non-overlapping patches (kernel = stride, no "
            f"padding, dilation 1, groups 1), got kernel {kernel}, stride {stride}, padding {padding}, "
            f"dilation {tuple(conv.dilation)}, groups {conv.groups}"
        )
