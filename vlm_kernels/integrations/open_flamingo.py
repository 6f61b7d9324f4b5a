"""OpenFlamingo (open_flamingo 2.0.1, ``open_flamingo/src/helpers.py``): ``PerceiverAttention`` ->
``vk.perceiver_attention``, ``MaskedCrossAttention`` -> ``vk.image_text_attention``.

- PerceiverAttention: HF-style ``to_kv(cat(media, latents))`` becomes ``to_kv`` on each part (the same
  linear map, without the concatenated copy), and the attention over [media; latents] is the op's.
- MaskedCrossAttention: text token i has ``text_time = cumsum(media_locations)[i]`` (with
  ``use_cached_media``: the number of media locations, for every token); media j (1-based) is visible iff
  ``text_time == j`` (``only_attend_immediate_media=True``) or ``text_time >= j`` (False). The chunks
  are the media (``media_len`` = latents per media). Rows that see no media behave as OpenFlamingo's
  code makes them: zeroed in the immediate mode (``empty_rows="zero"``), the mean of all values in the
  all-previous mode (every score filled with the same ``-finfo.max``: ``empty_rows="mean"``). Without
  ``media_locations`` every token sees every media.

Instance patches only (no class changes); parameters untouched, so ``state_dict()`` is unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

import vlm_kernels as vk
from vlm_kernels.integrations._patching import patch_instance, revert_tree


def _is_perceiver_attention(module: nn.Module) -> bool:
    return all(hasattr(module, name) for name in ("norm_media", "norm_latents", "to_q", "to_kv"))


def _is_masked_cross_attention(module: nn.Module) -> bool:
    return hasattr(module, "only_attend_immediate_media") and all(
        hasattr(module, name) for name in ("norm", "to_q", "to_kv", "to_out")
    )


def apply_vlm_kernels_to_open_flamingo(model_or_module: nn.Module) -> dict[str, int]:
    """Swaps the ops into every OpenFlamingo ``PerceiverAttention`` and ``MaskedCrossAttention`` under
    ``model_or_module`` (a ``Flamingo`` model, a ``PerceiverResampler``, a
    ``GatedCrossAttentionBlock``, one of the attention modules, or any module holding them).

    Returns:
        ``{"perceiver_attention": n, "masked_cross_attention": m}``, the modules patched.

    Raises:
        TypeError: no such module under ``model_or_module``.

    ``revert_vlm_kernels_to_open_flamingo`` undoes it.
    """
    counts = {"perceiver_attention": 0, "masked_cross_attention": 0}
    for module in model_or_module.modules():
        if _is_perceiver_attention(module):
            patch_instance(module, forward=_perceiver_attention_forward)
            counts["perceiver_attention"] += 1
        elif _is_masked_cross_attention(module):
            patch_instance(module, forward=_masked_cross_attention_forward)
            counts["masked_cross_attention"] += 1
    if not any(counts.values()):
        raise TypeError(
            f"model_or_module ({type(model_or_module).__name__}) holds no OpenFlamingo "
            f"PerceiverAttention or MaskedCrossAttention"
        )
    return counts


def revert_vlm_kernels_to_open_flamingo(model_or_module: nn.Module) -> int:
    """Restores the stock forward of every patched module under ``model_or_module``; how many."""
    return revert_tree(model_or_module)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[..., L, H * Dh] -> [prod(...), L, H, Dh] (a view: the ops take strided inputs)."""
    *_, length, width = x.shape
    return x.reshape(-1, length, heads, width // heads)


def _perceiver_attention_forward(
    self: nn.Module, x: torch.Tensor, latents: torch.Tensor
) -> torch.Tensor:
    """``PerceiverAttention.forward``: x (b, T, n1, D) media features, latents (b, T, n2, D)."""
    x = self.norm_media(x)
    latents = self.norm_latents(latents)
    heads = self.heads
    k_media, v_media = self.to_kv(x).chunk(2, dim=-1)
    k_latents, v_latents = self.to_kv(latents).chunk(2, dim=-1)
    out = vk.perceiver_attention(
        _heads(self.to_q(latents), heads),
        _heads(k_media, heads),
        _heads(v_media, heads),
        _heads(k_latents, heads),
        _heads(v_latents, heads),
        scale=self.scale,
    )
    return self.to_out(out.reshape(*latents.shape[:-1], -1))


def _masked_cross_attention_forward(
    self: nn.Module,
    x: torch.Tensor,
    media: torch.Tensor,
    media_locations: torch.Tensor | None = None,
    use_cached_media: bool = False,
) -> torch.Tensor:
    """``MaskedCrossAttention.forward``: x (B, T_txt, D_txt), media (B, T_img, n, D_img),
    media_locations (B, T_txt) bool."""
    batch, text_len = x.shape[:2]
    _, num_media, media_len = media.shape[:3]
    if (
        media_locations is not None
        and not use_cached_media
        and media_locations.shape[1] != text_len
    ):
        raise ValueError(
            f"media_locations has shape {tuple(media_locations.shape)} but x has "
            f"{text_len} text tokens ({tuple(x.shape)})"
        )
    heads = self.heads
    q = _heads(self.to_q(self.norm(x)), heads)
    k, v = self.to_kv(media.reshape(batch, num_media * media_len, -1)).chunk(2, dim=-1)
    media_time = torch.arange(1, num_media + 1, device=x.device)
    if media_locations is None:
        media_mask = torch.ones(batch, text_len, num_media, dtype=torch.bool, device=x.device)
        empty_rows = "zero"  # no row is empty
    else:
        if use_cached_media:
            # Every token comes after the last registered media.
            text_time = torch.count_nonzero(media_locations, dim=1)[:, None].expand(batch, text_len)
        else:
            text_time = media_locations.cumsum(dim=-1)
        if self.only_attend_immediate_media:
            media_mask = text_time[..., None] == media_time
            # OpenFlamingo zeroes the rows before the first media (text_time 0); a token whose
            # text_time exceeds the media given would get its uniform softmax instead, a mode
            # mismatch the op cannot express in one call, so it is an input error here.
            if bool((text_time > num_media).any()):
                raise ValueError(
                    f"media_locations marks up to {int(text_time.max())} media before a token but "
                    f"media holds {num_media} (media {tuple(media.shape)})"
                )
            empty_rows = "zero"
        else:
            media_mask = text_time[..., None] >= media_time
            empty_rows = "mean"
    out = vk.image_text_attention(
        q,
        _heads(k, heads),
        _heads(v, heads),
        media_mask,
        media_len=media_len,
        scale=self.scale,
        empty_rows=empty_rows,
    )
    return self.to_out(out.reshape(batch, text_len, -1))
