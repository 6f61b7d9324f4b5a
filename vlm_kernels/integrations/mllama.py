"""Hugging Face Mllama (Llama 3.2 Vision): the text cross-attention core -> ``vk.image_text_attention``,
the vision patch-embedding Conv2d -> ``vk.patch_embed``, the intermediate-layer concat + projector ->
``vk.concat_project``.

Written against transformers 5.x ``models/mllama/modeling_mllama.py`` (tested with 5.24.0):

- Cross-attention. HF's ``MllamaModel.forward`` turns the processor's ``cross_attention_mask``
  [B, S, images, tiles] (1 = the token sees that tile; padding tiles are 0) into an additive mask
  [B, 1, S, images * tiles * T] (T = tokens per tile, CLS included) whose rows that see no tile are
  all 0 (they attend to every key) plus ``full_text_row_masked_out_mask`` [B, 1, S, 1] (0 on those
  rows; it zeroes the layer's MLP branch). The patched ``MllamaCrossAttentionDecoderLayer`` reads both
  and builds one ``vk.MediaSchedule`` per tile (chunk = tile, ``media_len`` = T): a tile is visible
  where the additive mask is 0 and the row is not masked out. Rows that see no tile follow
  ``empty_rows``: "uniform" attends to every key (exactly HF), "zero" outputs 0 (Meta / torchtune;
  transformers issue 39379). ``cross_attention_mask=None`` means every token sees every tile (HF's
  sdpa path applies a causal mask there instead, transformers issue 48172). The schedule is built
  once per forward and shared by every cross-attention layer. The patched
  ``MllamaTextCrossAttention`` keeps HF's projections, q/k norms and the cache (prefill writes the
  image keys, decode reads them), and runs the attention core as the op on ``[B, L, H, Dh]`` views of
  them (no copy of the cached keys).
- Patch embedding. ``vision_model.patch_embedding`` (a Conv2d with kernel = stride) computes through
  ``vk.patch_embed`` and returns the same [N, D, H/P, W/P] tensor (a view of the op's [N, L, D]
  tokens, which HF's ``flatten(2).transpose(1, 2)`` turns back into the tokens without a copy). The
  CLS row is placed after the pre-tile position embedding by HF, so it stays HF's.
- Projector. HF's vision model stacks the hidden states of ``intermediate_layers_indices`` on a new
  last axis, concatenates them after the final hidden state ([..., D * (1 + L)], column ``D + d * L +
  k`` = feature d of intermediate layer k) and ``multi_modal_projector`` projects that buffer (7680
  features per token at 11B). The patched ``MllamaModel.forward`` computes the image states itself:
  HF's vision submodules in HF's order, then ``vk.concat_project([final, layer_0, ..., layer_{L-1}],
  W')`` on views of the unpadded states (no stack, no concat), where W' is the projector weight with
  its columns reordered to that source order (``mllama_projector_weight``). The parameter itself is
  not touched: W' is derived from it, once while it does not change and gradients are off (cached,
  rebuilt when the weight's data or version changes), else per forward (a differentiable gather, so
  its gradient lands in HF's layout). The model output's ``image_outputs`` is None on that path (HF's
  vision output is exactly the buffer this patch avoids).

Parameters are the model's own (nothing copied): ``state_dict()`` keys and values, checkpoints and
training are unchanged.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import vlm_kernels as vk
from vlm_kernels.integrations._patching import patch_instance, revert_tree
from vlm_kernels.nn.multi_layer_projector import mllama_projector_weight
from vlm_kernels.nn.patch_embed import _check_patch_conv

MLLAMA_EMPTY_ROWS = ("uniform", "zero")

# The pre-construction patch: {name in transformers' modeling_mllama: the original class}.
_MODULE_PATCHES: dict[str, type] = {}


def apply_vlm_kernels_to_mllama(
    model: nn.Module | None = None,
    *,
    patch_embed: bool = True,
    projector: bool = True,
    cross_attention: bool = True,
    empty_rows: str = "uniform",
) -> None:
    """Swaps vlm_kernels ops into a Hugging Face Mllama model.

    Args:
        model: a ``MllamaForConditionalGeneration`` or ``MllamaModel`` (this instance is patched and
            nothing else), or None: then ``transformers.models.mllama.modeling_mllama.MllamaModel`` is
            replaced by a subclass that patches each instance it constructs (also the one inside
            ``MllamaForConditionalGeneration``); nothing outside that module changes. Call it before
            the model is built (``from_pretrained`` included).
        patch_embed: the vision patch-embedding Conv2d -> ``vk.patch_embed``.
        projector: the intermediate-layer stack + concat + ``multi_modal_projector`` ->
            ``vk.concat_project`` (module docstring).
        cross_attention: the text cross-attention core -> ``vk.image_text_attention``.
        empty_rows: text tokens that see no image (text before the first image): "uniform" attends to
            every image key (exactly HF's behaviour), "zero" gets no image signal (Meta / torchtune).

    Raises:
        ValueError: ``empty_rows`` is not one of "uniform" / "zero"; a patch-embedding Conv2d the op
            cannot compute.
        TypeError: ``model`` is not an Mllama model.

    ``revert_vlm_kernels_to_mllama`` undoes either form.
    """
    if empty_rows not in MLLAMA_EMPTY_ROWS:
        raise ValueError(f"empty_rows must be one of {MLLAMA_EMPTY_ROWS}, got {empty_rows!r}")
    options = {
        "patch_embed": patch_embed,
        "projector": projector,
        "cross_attention": cross_attention,
        "empty_rows": empty_rows,
    }
    if model is None:
        _patch_modeling_module(options)
        return
    core = _mllama_core(model)
    if patch_embed:
        conv = core.vision_model.patch_embedding
        _check_patch_conv(conv, "vision_model")
        patch_instance(conv, forward=_conv_as_patch_embed)
    if projector:
        patch_instance(core, forward=_model_forward_fused_projector, _vlmk_projector_weight=None)
    if cross_attention:
        media_len = int(core.vision_model.num_patches)
        schedules = _ScheduleCache(media_len, empty_rows)
        layers = [
            layer for layer in core.language_model.layers if hasattr(layer, "cross_attn_attn_gate")
        ]
        for layer in layers:
            patch_instance(layer, forward=_cross_attention_layer_forward, _vlmk_schedules=schedules)
            patch_instance(layer.cross_attn, forward=_cross_attention_forward)


def revert_vlm_kernels_to_mllama(model: nn.Module | None = None) -> None:
    """Undoes ``apply_vlm_kernels_to_mllama``: on ``model``'s modules when given, else on
    transformers' Mllama modeling module (models built in between keep their patches)."""
    if model is not None:
        revert_tree(model)
        return
    from transformers.models.mllama import modeling_mllama

    for name, original in _MODULE_PATCHES.items():
        setattr(modeling_mllama, name, original)
    _MODULE_PATCHES.clear()


def _patch_modeling_module(options: dict[str, Any]) -> None:
    from transformers.models.mllama import modeling_mllama

    original = _MODULE_PATCHES.get("MllamaModel", modeling_mllama.MllamaModel)

    def __init__(self, config, *args, **kwargs):
        original.__init__(self, config, *args, **kwargs)
        apply_vlm_kernels_to_mllama(self, **options)

    # Same name and qualname: transformers matches classes by name (``_no_split_modules``, configs).
    patched = type(
        original.__name__,
        (original,),
        {
            "__init__": __init__,
            "__module__": original.__module__,
            "__qualname__": original.__qualname__,
        },
    )
    _MODULE_PATCHES["MllamaModel"] = original
    modeling_mllama.MllamaModel = patched


def _mllama_core(model: nn.Module) -> nn.Module:
    """The ``MllamaModel`` (vision_model + language_model + multi_modal_projector) inside ``model``."""
    for candidate in (model, getattr(model, "model", None)):
        if candidate is not None and all(
            hasattr(candidate, name)
            for name in ("vision_model", "language_model", "multi_modal_projector")
        ):
            return candidate
    raise TypeError(
        f"model must be a MllamaForConditionalGeneration or MllamaModel (with vision_model, "
        f"language_model and multi_modal_projector), got {type(model).__name__}"
    )


# ---- patch embedding ----------------------------------------------------------------------------------


def _conv_as_patch_embed(self: nn.Conv2d, pixels: torch.Tensor) -> torch.Tensor:
    """Conv2d(kernel = stride = P) as ``vk.patch_embed``: [N, C, H, W] -> [N, D, H/P, W/P] (a view of
    the op's [N, L, D] tokens, so the caller's flatten + transpose is free)."""
    tokens = vk.patch_embed(pixels, self.weight, self.bias)
    batch, _, height, width = pixels.shape
    patch_h, patch_w = self.kernel_size
    return tokens.view(batch, height // patch_h, width // patch_w, -1).permute(0, 3, 1, 2)


# ---- intermediate layers + projector ------------------------------------------------------------------


def _model_forward_fused_projector(self: nn.Module, *args, **kwargs):
    """``MllamaModel.forward`` with the image states computed by ``_projected_image_states`` (then
    handed to HF's forward as ``cross_attention_states``); everything else is HF's forward."""
    original = type(self).forward
    bound = inspect.signature(original).bind(self, *args, **kwargs)
    arguments = bound.arguments
    # Missing aspect inputs or both pixels and states: left to HF's forward, which raises its errors.
    if (
        arguments.get("pixel_values") is not None
        and arguments.get("cross_attention_states") is None
        and arguments.get("aspect_ratio_ids") is not None
        and arguments.get("aspect_ratio_mask") is not None
    ):
        arguments["cross_attention_states"] = _projected_image_states(
            self,
            arguments["pixel_values"],
            arguments["aspect_ratio_ids"],
            arguments["aspect_ratio_mask"],
        )
        arguments["pixel_values"] = None
    return original(*bound.args, **bound.kwargs)


def _projected_image_states(
    core: nn.Module,
    pixel_values: torch.Tensor,
    aspect_ratio_ids: torch.Tensor,
    aspect_ratio_mask: torch.Tensor,
) -> torch.Tensor:
    """HF's ``MllamaVisionModel.forward`` followed by ``multi_modal_projector``, with the
    intermediate stack + concat + Linear as one ``vk.concat_project`` over views of the states.

    pixel_values [B, M, T, C, H, W] -> [B * M * T, P, text hidden] (P tokens per tile, CLS included),
    the layout HF's ``MllamaModel`` gives ``cross_attention_states``."""
    from transformers.models.mllama.modeling_mllama import _prepare_aspect_ratio_attention_mask

    vision = core.vision_model
    batch, images, tiles, channels, height, width = pixel_values.shape
    media = batch * images
    ratio_ids = aspect_ratio_ids.reshape(media, -1)
    conv_weight = vision.patch_embedding.weight
    pixels = pixel_values.reshape(media * tiles, channels, height, width)
    patches = vision.patch_embedding(pixels.to(conv_weight.device, conv_weight.dtype))
    hidden = patches.flatten(2).transpose(1, 2)
    _, num_patches, dim = hidden.shape
    hidden = vision.pre_tile_positional_embedding(hidden.reshape(media, tiles, -1, dim), ratio_ids)
    hidden = vision.apply_class_embedding(hidden.reshape(media * tiles, num_patches, dim))
    num_patches += 1
    hidden = vision.gated_positional_embedding(
        hidden.reshape(media, tiles, num_patches, dim), ratio_ids
    )
    hidden = vision.layernorm_pre(hidden)
    # HF pads every tile to a multiple of 8 tokens for its encoders.
    padded = num_patches + (8 - num_patches % 8) % 8
    hidden = F.pad(hidden, (0, 0, 0, padded - num_patches))
    attention_mask = _prepare_aspect_ratio_attention_mask(
        aspect_ratio_mask=aspect_ratio_mask.reshape(media, -1),
        num_patches=vision.num_patches,
        target_length=padded,
        dtype=vision.dtype,
    )
    local = vision.transformer(hidden.view(media, -1, dim), attention_mask=attention_mask)
    hidden = vision.layernorm_post(local.last_hidden_state)
    hidden = vision.post_tile_positional_embedding(
        hidden.reshape(media, tiles, padded, dim), ratio_ids
    )
    hidden = vision.global_transformer(
        hidden.reshape(media, tiles * padded, dim), attention_mask=attention_mask
    ).last_hidden_state

    def unpadded(states: torch.Tensor) -> torch.Tensor:
        # [media, tiles * padded, dim] -> a [media, tiles, num_patches, dim] view (no copy).
        return states.reshape(media, tiles, padded, dim)[:, :, :num_patches]

    sources = [unpadded(hidden)]
    sources += [unpadded(local.hidden_states[i]) for i in vision.intermediate_layers_indices]
    projector = core.multi_modal_projector
    out = vk.concat_project(sources, _source_ordered_projector_weight(core), projector.bias)
    return out.reshape(-1, num_patches, core.hidden_size)


def _source_ordered_projector_weight(core: nn.Module) -> torch.Tensor:
    """The projector weight with columns in ``[final, layer_0, ...]`` order. Built per call while
    gradients flow into the weight (a gather autograd follows); otherwise cached on the model and
    rebuilt when the weight's storage or version counter changes (load_state_dict, optimizer)."""
    weight = core.multi_modal_projector.weight
    vision = core.vision_model
    layers = len(vision.intermediate_layers_indices)
    if torch.is_grad_enabled() and weight.requires_grad:
        return mllama_projector_weight(weight, vision.hidden_size, layers)
    key = (weight.data_ptr(), weight._version, weight.device, weight.dtype, weight.shape)
    cached = core._vlmk_projector_weight
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, mllama_projector_weight(weight, vision.hidden_size, layers))
        # A plain instance attribute (recorded by the patch, removed by the revert).
        object.__setattr__(core, "_vlmk_projector_weight", cached)
    return cached[1]


# ---- cross-attention ------------------------------------------------------------------------------------


class _ScheduleCache:
    """The MediaSchedule of the current forward, shared by the cross-attention layers of one model:
    every layer receives the same mask tensors, so the schedule is built by the first and reused."""

    def __init__(self, media_len: int, empty_rows: str):
        self.media_len = media_len
        self.empty_rows = empty_rows
        self._key: tuple | None = None
        self._schedule: vk.MediaSchedule | None = None

    def get(
        self,
        additive_mask: torch.Tensor | None,
        row_mask: torch.Tensor | None,
        hidden_states: torch.Tensor,
        num_keys: int,
    ) -> vk.MediaSchedule:
        batch, query_len = hidden_states.shape[:2]
        # The tensors themselves (not their ids) are kept in the key: identity of live objects.
        key = (additive_mask, row_mask, batch, query_len, num_keys, hidden_states.device)
        if self._key is None or not _same_key(self._key, key):
            self._schedule = self._build(
                additive_mask, row_mask, batch, query_len, num_keys, key[-1]
            )
            self._key = key
        return self._schedule

    def _build(self, additive_mask, row_mask, batch, query_len, num_keys, device):
        media_len = self.media_len
        if num_keys % media_len != 0:
            raise ValueError(
                f"the cross-attention has {num_keys} image keys, not a multiple of the vision "
                f"model's {media_len} tokens per tile"
            )
        if additive_mask is None:
            # No cross_attention_mask: every token sees every tile.
            media_mask = torch.ones(
                batch, query_len, num_keys // media_len, dtype=torch.bool, device=device
            )
        else:
            if tuple(additive_mask.shape) != (batch, 1, query_len, num_keys):
                raise ValueError(
                    f"cross_attention_mask (prepared by MllamaModel) has shape "
                    f"{tuple(additive_mask.shape)}, expected {(batch, 1, query_len, num_keys)}"
                )
            # HF's additive mask is constant over a tile's T tokens: 0 visible, finfo.min not.
            media_mask = additive_mask[:, 0, :, ::media_len] == 0
            if row_mask is not None:
                # Rows that see no tile were zeroed to "all visible" by HF; the row mask tells them.
                media_mask = media_mask & (row_mask[:, 0] != 0)
        return vk.MediaSchedule(media_mask, media_len=media_len, empty_rows=self.empty_rows)


def _same_key(old: tuple, new: tuple) -> bool:
    return all(
        a is b if isinstance(a, torch.Tensor) or a is None else a == b
        for a, b in zip(old, new, strict=True)
    )


def _cross_attention_layer_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    cross_attention_states: torch.Tensor | None,
    cross_attention_mask: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    full_text_row_masked_out_mask: torch.Tensor | None,
    position_ids: torch.LongTensor | None = None,
    cache: Any = None,
    use_cache: bool | None = False,
    position_embeddings: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    """``MllamaCrossAttentionDecoderLayer.forward`` with the media schedule built from the masks and
    handed to the patched cross-attention (the rest is HF's computation, line for line)."""
    if cross_attention_states is not None:
        # MllamaModel hands the states over as [B * images * tiles, T, D]; the attention views them
        # as [B, images * tiles * T, D].
        num_keys = cross_attention_states.numel() // (
            hidden_states.shape[0] * cross_attention_states.shape[-1]
        )
    else:
        num_keys = cache.layers[self.layer_idx].keys.shape[-2]
    schedule = self._vlmk_schedules.get(
        cross_attention_mask, full_text_row_masked_out_mask, hidden_states, num_keys
    )
    residual = hidden_states
    hidden_states = self.input_layernorm(hidden_states)
    hidden_states, _ = self.cross_attn(
        hidden_states=hidden_states,
        attention_mask=cross_attention_mask,
        cross_attention_states=cross_attention_states,
        cache=cache,
        media_schedule=schedule,
        **kwargs,
    )
    hidden_states = residual + self.cross_attn_attn_gate.tanh() * hidden_states

    residual = hidden_states
    hidden_states = self.post_attention_layernorm(hidden_states)
    hidden_states = self.mlp(hidden_states)
    if full_text_row_masked_out_mask is not None:
        hidden_states = full_text_row_masked_out_mask[:, 0] * hidden_states
    return residual + self.cross_attn_mlp_gate.tanh() * hidden_states


def _cross_attention_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    cross_attention_states: torch.Tensor | None = None,
    cache: Any = None,
    attention_mask: torch.Tensor | None = None,
    use_cache: bool | None = None,
    media_schedule: vk.MediaSchedule | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """``MllamaTextCrossAttention.forward`` with the core as ``vk.image_text_attention``.

    ``attention_mask`` is HF's additive mask; the media visibility comes from ``media_schedule``
    (built by the patched decoder layer, which also sees which rows are empty)."""
    if media_schedule is None:
        raise ValueError(
            "the patched MllamaTextCrossAttention needs media_schedule= (its patched "
            "MllamaCrossAttentionDecoderLayer passes it); call the layer, not the attention alone"
        )
    if self.training and self.dropout > 0:
        raise ValueError(
            f"config.dropout={self.dropout} (attention dropout) is not supported by "
            f"vk.image_text_attention; set it to 0 or revert the patch for training"
        )
    batch, query_len, _ = hidden_states.shape
    # q_norm is an RMSNorm over head_dim: the same on [B, S, H, Dh] as on HF's [B, H, S, Dh].
    query = self.q_norm(
        self.q_proj(hidden_states).view(batch, query_len, self.num_heads, self.head_dim)
    )
    if cross_attention_states is not None:
        key = self.k_proj(cross_attention_states).view(
            batch, -1, self.num_key_value_heads, self.head_dim
        )
        value = self.v_proj(cross_attention_states).view(
            batch, -1, self.num_key_value_heads, self.head_dim
        )
        key = self.k_norm(key)
        if cache is not None:
            # The cache holds HF's [B, Hkv, Lk, Dh] layout: prefill writes the image keys in it.
            key, value = cache.update(
                key.transpose(1, 2), value.transpose(1, 2), self.layer_idx, kwargs=kwargs
            )
            key, value = key.transpose(1, 2), value.transpose(1, 2)
    else:
        layer = cache.layers[self.layer_idx]
        key, value = layer.keys.transpose(1, 2), layer.values.transpose(1, 2)
    out = vk.image_text_attention(query, key, value, media_schedule, scale=self.scaling)
    return self.o_proj(out.reshape(batch, query_len, -1)), None
