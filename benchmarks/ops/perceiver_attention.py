"""perceiver_attention: learned latents attend to [media tokens ; latents] (Perceiver resampler).

Shapes: q [B, Nl, Hq, Dh], k_media/v_media [B, Nm, Hkv, Dh], k_latents/v_latents [B, Nl, Hkv, Dh],
media_padding_mask [B, Nm] bool (True = real token) or None; output [B, Nl, Hq, Dh].

Peers (both concatenate the two key/value segments inside the timed step, which ours avoids):
  sdpa   torch.cat + F.scaled_dot_product_attention (bool key mask [B, 1, 1, Nm + Nl], enable_gqa).
  eager  OpenFlamingo's PerceiverAttention (open_flamingo/src/helpers.py): cat, q * scale, einsum
         q k^T, subtract the row max, masked_fill(finfo.min) on padding, softmax, einsum with v
         (repeat_kv when Hq > Hkv).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.ops.common import attention_flops, repeat_kv
from benchmarks.spec import Inputs, OpSpec, Peer, Shape, randn, seeded_generator

OP = "perceiver_attention"

# OpenFlamingo (open_flamingo/src/helpers.py, factory.py): PerceiverResampler(dim=vis_dim=1024 for
# CLIP ViT-L/14, depth=6, dim_head=64, heads=8, num_latents=64); to_q / to_kv give 8 query and 8
# key/value heads of 64. Media: the CLIP ViT-L/14 (224px) patch tokens, 256 per frame (CLS dropped);
# frames F of one media item are flattened into Nm = F * 256 and the batch holds b * T media items.
_OPENFLAMINGO = dict(Nl=64, Hq=8, Hkv=8, Dh=64)

SHAPES = {
    "flamingo-perceiver": Shape(
        OP,
        "flamingo-perceiver",
        dict(B=16, Nm=4 * 257, **_OPENFLAMINGO),
        variants=("none", "pad"),
        source="OpenFlamingo PerceiverResampler: 64 latents, 8 heads x 64 (dim 1024); 16 media "
        "items of 4 frames x 257 CLIP ViT-L/14 tokens (Nm = 1028), the issue's shape",
    ),
    "flamingo-perceiver-video": Shape(
        OP,
        "flamingo-perceiver-video",
        dict(B=2, Nm=8 * 256, **_OPENFLAMINGO),
        variants=("none", "pad"),
        source="OpenFlamingo PerceiverResampler as above on video: 8 frames x 256 tokens = 2048 "
        "media tokens per item; B=2 clips",
    ),
    # GQA 2:1 and an odd media length, to exercise every path.
    "tiny": Shape(
        OP,
        "tiny",
        dict(B=3, Nm=11, Nl=5, Hq=4, Hkv=2, Dh=16),
        variants=("none", "pad"),
        source="small sizes for tests",
    ),
}

VARIANT_HELP = (
    "media padding: none = no padding mask; pad = item 0 full, the others keep a random 1/4..all "
    "of their media tokens (trailing padding)"
)


def build_padding_mask(batch: int, media_len: int, generator: torch.Generator) -> torch.Tensor:
    """[batch, media_len] bool, True = real token: item 0 full, the others trailing-padded."""
    lengths = torch.randint(max(1, media_len // 4), media_len + 1, (batch,), generator=generator)
    lengths[0] = media_len
    return torch.arange(media_len)[None, :] < lengths[:, None]


def make_inputs(shape, variant, dtype, device, seed, requires_grad) -> Inputs:
    if variant not in ("none", "pad"):
        raise ValueError(f"unknown perceiver_attention variant {variant!r}; {VARIANT_HELP}")
    p = shape.params
    gen = seeded_generator(seed)
    q = randn((p["B"], p["Nl"], p["Hq"], p["Dh"]), gen, dtype, device, requires_grad=requires_grad)
    media = [
        randn((p["B"], p["Nm"], p["Hkv"], p["Dh"]), gen, dtype, device, requires_grad=requires_grad)
        for _ in range(2)
    ]
    latents = [
        randn((p["B"], p["Nl"], p["Hkv"], p["Dh"]), gen, dtype, device, requires_grad=requires_grad)
        for _ in range(2)
    ]
    padding = build_padding_mask(p["B"], p["Nm"], gen).to(device) if variant == "pad" else None
    tensors = dict(
        q=q,
        k_media=media[0],
        v_media=media[1],
        k_latents=latents[0],
        v_latents=latents[1],
        media_padding_mask=padding,
    )
    return Inputs(tensors=tensors, grad_inputs=(q, *media, *latents) if requires_grad else ())


def call_ours(inputs: Inputs, backend: str) -> torch.Tensor:
    import vlm_kernels as vk

    t = inputs.tensors
    return vk.perceiver_attention(
        t["q"],
        t["k_media"],
        t["v_media"],
        t["k_latents"],
        t["v_latents"],
        media_padding_mask=t["media_padding_mask"],
        backend=backend,
    )


def flops(inputs: Inputs, mode: str) -> int:
    """Visible work only: each latent sees the real media tokens of its item plus all Nl latents."""
    t = inputs.tensors
    batch, num_latents, num_heads, head_dim = t["q"].shape
    padding = t["media_padding_mask"]
    real_media = t["k_media"].shape[1] * batch if padding is None else int(padding.sum())
    pairs = num_latents * (real_media + batch * num_latents)
    return attention_flops(pairs, num_heads, head_dim, mode)


def _key_mask(inputs: Inputs):
    """Bool key mask [B, 1, 1, Nm + Nl] (None without padding)."""
    padding = inputs.tensors["media_padding_mask"]
    if padding is None:
        return None
    latents = torch.ones(padding.shape[0], inputs.tensors["q"].shape[1], dtype=torch.bool)
    return torch.cat([padding, latents.to(padding.device)], dim=1)[:, None, None, :]


def _concat_kv(t):
    key = torch.cat([t["k_media"], t["k_latents"]], dim=1)  # (B, Nm + Nl, Hkv, Dh)
    value = torch.cat([t["v_media"], t["v_latents"]], dim=1)
    return key, value


def prepare_sdpa(inputs: Inputs):
    t = inputs.tensors
    key_mask = _key_mask(inputs)

    def run():
        key, value = _concat_kv(t)
        out = F.scaled_dot_product_attention(
            t["q"].transpose(1, 2),
            key.transpose(1, 2),
            value.transpose(1, 2),
            attn_mask=key_mask,
            enable_gqa=True,
        )
        return out.transpose(1, 2)

    return run


def prepare_eager(inputs: Inputs):
    t = inputs.tensors
    key_mask = _key_mask(inputs)
    n_rep = t["q"].shape[2] // t["k_media"].shape[2]
    scale = t["q"].shape[-1] ** -0.5

    def run():
        key, value = _concat_kv(t)
        query = t["q"].transpose(1, 2) * scale  # (B, Hq, Nl, Dh)
        key = repeat_kv(key.transpose(1, 2), n_rep)  # (B, Hq, Nm + Nl, Dh)
        value = repeat_kv(value.transpose(1, 2), n_rep)
        sim = torch.einsum("... i d, ... j d -> ... i j", query, key)
        if key_mask is not None:
            sim = sim.masked_fill(~key_mask, torch.finfo(sim.dtype).min)
        sim = sim - sim.amax(dim=-1, keepdim=True).detach()
        probs = sim.softmax(dim=-1)
        return torch.einsum("... i j, ... j d -> ... i d", probs, value).transpose(1, 2)

    return run


SPEC = OpSpec(
    name=OP,
    shapes=SHAPES,
    make_inputs=make_inputs,
    call_ours=call_ours,
    flops=flops,
    peers=(
        Peer(
            "sdpa", "torch.cat of [media ; latents] + SDPA with the key padding mask", prepare_sdpa
        ),
        Peer(
            "eager",
            "OpenFlamingo PerceiverAttention: cat, einsum, max-subtracted softmax, einsum",
            prepare_eager,
        ),
    ),
    default_baseline="sdpa",
    variant_help=VARIANT_HELP,
)
