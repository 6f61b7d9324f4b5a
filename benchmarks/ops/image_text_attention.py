"""image_text_attention: text queries attend to image keys/values under a per-token media mask.

Shapes: q [B, Lq, Hq, Dh], k/v [B, Lk, Hkv, Dh], media_mask [B, Lq, M] bool, Lk = M * media_len.

Peers (each returns [B, Lq, Hq, Dh] with the empty_rows="zero" semantics of the public op):
  sdpa       F.scaled_dot_product_attention with the equivalent dense bool mask [B, 1, Lq, Lk],
             enable_gqa=True (attends over every key, masking; skips nothing).
  eager      Hugging Face Mllama's eager cross-attention: repeat_kv, matmul, additive mask filled
             with finfo(dtype).min, softmax in fp32, matmul; rows that see no image are zeroed
             afterwards, as MllamaCrossAttentionDecoderLayer does with full_text_row_masked_out_mask.
  flex       torch.compile(flex_attention) with a BlockMask built by create_block_mask from the same
             mask (blocks no query of a tile can see are skipped).
  sdpa_nomask  F.scaled_dot_product_attention with no mask (FlashAttention-2-class kernel on a GPU);
             only for masks where every token sees every image (the "all" variant): the ceiling a
             dense flash kernel sets when nothing can be skipped.
  sdpa_runs  one SDPA call per run of identical mask rows, over only the keys that run can see
             (skips work exactly; Python-loop cost grows with the number of runs, e.g. random masks).
Mask preprocessing (dense mask, additive mask, block mask, run plan) is done once per case in
prepare, outside the timed region, as a model does once per forward for all its cross-attention
layers.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F

from benchmarks.ops.common import attention_flops, repeat_kv
from benchmarks.spec import (
    Inputs,
    OpSpec,
    Peer,
    ProviderUnavailable,
    Shape,
    randn,
    seeded_generator,
)

OP = "image_text_attention"

# Llama-3.2-11B-Vision, from Hugging Face transformers MllamaConfig (text_config / vision_config
# defaults): text hidden_size 4096, num_attention_heads 32, num_key_value_heads 8 -> head_dim 128
# (cross-attention layers use the same heads); vision image_size 560, patch_size 14 -> (560/14)^2 =
# 1600 patches + CLS = 1601 tokens per tile. Here a media chunk is one 1601-token tile/image and a
# prompt carries 4 of them (Lk = 4 * 1601 = 6404, the key length of one 4-tile image in Mllama).
_MLLAMA = dict(Hq=32, Hkv=8, Dh=128, M=4, media_len=1601)
_MLLAMA_SOURCE = (
    "Llama-3.2-11B-Vision (HF MllamaConfig): text 32 heads / 8 KV heads x 128; 560px tiles, "
    "patch 14 -> 1601 tokens per tile; 4 chunks of 1601 keys (Lk 6404)"
)

SHAPES = {
    "mllama-11b": Shape(
        OP,
        "mllama-11b",
        dict(B=1, Lq=1024, **_MLLAMA),
        variants=("1of4", "all", "causal", "random"),
        source=_MLLAMA_SOURCE + "; prefill of 1024 text tokens",
    ),
    "mllama-11b-decode": Shape(
        OP,
        "mllama-11b-decode",
        dict(B=8, Lq=1, **_MLLAMA),
        variants=("all", "last", "random"),
        modes=("fwd",),
        source=_MLLAMA_SOURCE + "; decode: 8 sequences, 1 new token each",
    ),
    # Awkward sizes on purpose: Lq and media_len not multiples of anything, GQA 2:1.
    "tiny": Shape(
        OP,
        "tiny",
        dict(B=2, Lq=37, Hq=4, Hkv=2, Dh=16, M=4, media_len=9),
        variants=("1of4", "all", "causal", "random"),
        source="small sizes for tests",
    ),
}

VARIANT_HELP = (
    "media masks: 1of<M> = text split into M equal runs, run r sees image r; all = every token "
    "sees every image; causal = run r sees images 0..r (Flamingo only_immediate=False); last = "
    "every token sees only the last image (decode after the last image); random = each (token, "
    "image) visible with p=0.5, so some rows see nothing"
)


def build_media_mask(
    variant: str, batch: int, query_len: int, num_media: int, generator: torch.Generator
) -> torch.Tensor:
    """The media mask [batch, query_len, num_media] (bool, CPU) of a named variant."""
    run = torch.arange(query_len) * num_media // query_len  # the equal run a token falls in: [Lq]
    media = torch.arange(num_media)
    if variant == f"1of{num_media}":
        mask = run[:, None] == media[None, :]
    elif variant == "all":
        mask = torch.ones(query_len, num_media, dtype=torch.bool)
    elif variant == "causal":
        mask = media[None, :] <= run[:, None]
    elif variant == "last":
        mask = (media == num_media - 1).expand(query_len, num_media)
    elif variant == "random":
        return torch.rand(batch, query_len, num_media, generator=generator) < 0.5
    else:
        raise ValueError(f"unknown media mask variant {variant!r}; {VARIANT_HELP}")
    return mask.expand(batch, query_len, num_media).clone()


def make_inputs(shape, variant, dtype, device, seed, requires_grad) -> Inputs:
    p = shape.params
    lk = p["M"] * p["media_len"]
    gen = seeded_generator(seed)
    q = randn((p["B"], p["Lq"], p["Hq"], p["Dh"]), gen, dtype, device, requires_grad=requires_grad)
    k = randn((p["B"], lk, p["Hkv"], p["Dh"]), gen, dtype, device, requires_grad=requires_grad)
    v = randn((p["B"], lk, p["Hkv"], p["Dh"]), gen, dtype, device, requires_grad=requires_grad)
    media_mask = build_media_mask(variant, p["B"], p["Lq"], p["M"], gen).to(device)
    return Inputs(
        tensors=dict(q=q, k=k, v=v, media_mask=media_mask),
        options=dict(media_len=p["media_len"]),
        grad_inputs=(q, k, v) if requires_grad else (),
    )


def call_ours(inputs: Inputs, backend: str) -> torch.Tensor:
    import vlm_kernels as vk

    t = inputs.tensors
    return vk.image_text_attention(
        t["q"],
        t["k"],
        t["v"],
        t["media_mask"],
        media_len=inputs.options["media_len"],
        backend=backend,
    )


def visible_pairs(media_mask: torch.Tensor, media_len: int) -> int:
    """Number of (batch, query, key) pairs the mask allows (per head)."""
    return int(media_mask.sum()) * media_len


def flops(inputs: Inputs, mode: str) -> int:
    q = inputs.tensors["q"]
    pairs = visible_pairs(inputs.tensors["media_mask"], inputs.options["media_len"])
    return attention_flops(pairs, q.shape[2], q.shape[3], mode)


def _dense_mask(media_mask: torch.Tensor, media_len: int):
    """The dense bool mask [B, Lq, Lk] and the rows that see something [B, Lq] (None if all do).

    Rows that see nothing are opened to every key (no NaN, as Mllama does), zeroed after attention.
    """
    dense = media_mask.repeat_interleave(media_len, dim=-1)
    row_visible = media_mask.any(dim=-1)
    if bool(row_visible.all()):
        return dense, None
    return dense | ~row_visible[..., None], row_visible


def prepare_sdpa(inputs: Inputs):
    q, k, v, media_mask = (inputs.tensors[n] for n in ("q", "k", "v", "media_mask"))
    dense, row_visible = _dense_mask(media_mask, inputs.options["media_len"])
    attn_mask = dense[:, None]  # (B, 1, Lq, Lk)
    keep = None if row_visible is None else row_visible[:, :, None, None]

    def run():
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=attn_mask,
            enable_gqa=True,
        ).transpose(1, 2)
        return out if keep is None else torch.where(keep, out, 0.0)

    return run


def prepare_sdpa_nomask(inputs: Inputs):
    q, k, v, media_mask = (inputs.tensors[n] for n in ("q", "k", "v", "media_mask"))
    if not bool(media_mask.all()):
        raise ProviderUnavailable(
            "SDPA without a mask only matches masks where every token sees all"
        )

    def run():
        return F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), enable_gqa=True
        ).transpose(1, 2)

    return run


def prepare_eager(inputs: Inputs):
    q, k, v, media_mask = (inputs.tensors[n] for n in ("q", "k", "v", "media_mask"))
    n_rep = q.shape[2] // k.shape[2]
    scale = q.shape[-1] ** -0.5
    dense, row_visible = _dense_mask(media_mask, inputs.options["media_len"])
    additive = torch.zeros(dense.shape, dtype=q.dtype, device=q.device)
    additive = additive.masked_fill_(~dense, torch.finfo(q.dtype).min)[:, None]  # (B, 1, Lq, Lk)
    row_scale = None if row_visible is None else row_visible.to(q.dtype)[:, :, None, None]

    def run():
        query = q.transpose(1, 2)  # (B, Hq, Lq, Dh)
        key = repeat_kv(k.transpose(1, 2), n_rep)  # (B, Hq, Lk, Dh)
        value = repeat_kv(v.transpose(1, 2), n_rep)
        scores = torch.matmul(query, key.transpose(2, 3)) * scale + additive
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        out = torch.matmul(probs, value).transpose(1, 2)  # (B, Lq, Hq, Dh)
        return out if row_scale is None else out * row_scale

    return run


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def prepare_flex(inputs: Inputs, compile: bool = True):
    """Compiled FlexAttention (compile=False runs the unfused eager path, for quick numeric tests).

    The compiled function is created once; dynamo caches one graph per shape. The first call
    (compile, and backward when grads are wanted) happens here, so a failure makes the provider
    unavailable.
    """
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as exc:
        raise ProviderUnavailable(f"torch.nn.attention.flex_attention missing: {exc}") from exc
    q, k, v, media_mask = (inputs.tensors[n] for n in ("q", "k", "v", "media_mask"))
    media_len = inputs.options["media_len"]
    batch, query_len = media_mask.shape[:2]
    key_len = k.shape[1]

    def mask_mod(b, h, q_idx, kv_idx):
        return media_mask[b, q_idx, kv_idx // media_len]

    attend = _compiled_flex_attention() if compile else flex_attention

    def run():
        return attend(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            block_mask=block_mask,
            enable_gqa=True,
        ).transpose(1, 2)

    try:
        block_mask = create_block_mask(mask_mod, batch, None, query_len, key_len, device=q.device)
        with _recompile_limit(64), warnings.catch_warnings():
            # the eager path warns that it is unfused, which is what compile=False asked for
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            out = run()
            if inputs.grad_inputs:
                torch.autograd.grad(out, inputs.grad_inputs, torch.ones_like(out))
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ProviderUnavailable(f"flex_attention failed: {type(exc).__name__}: {reason}") from exc
    return run


def _recompile_limit(limit: int):
    """Allow more graphs per compiled function than dynamo's default 8 (one per shape)."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    return config.patch(**{name: max(getattr(config, name), limit)})


def _run_plan(media_mask: torch.Tensor, media_len: int):
    """Per batch: runs (t0, t1, keys) of identical mask rows; keys: slice, index tensor or None."""
    plan = []
    device = media_mask.device
    for rows in media_mask.tolist():
        runs, start = [], 0
        for t in range(1, len(rows) + 1):
            if t < len(rows) and rows[t] == rows[start]:
                continue
            chunks = [m for m, seen in enumerate(rows[start]) if seen]
            if not chunks:
                keys = None
            elif chunks == list(range(chunks[0], chunks[-1] + 1)):
                keys = slice(chunks[0] * media_len, (chunks[-1] + 1) * media_len)
            else:
                keys = torch.cat(
                    [
                        torch.arange(c * media_len, (c + 1) * media_len, device=device)
                        for c in chunks
                    ]
                )
            runs.append((start, t, keys))
            start = t
        plan.append(runs)
    return plan


def prepare_sdpa_runs(inputs: Inputs):
    q, k, v, media_mask = (inputs.tensors[n] for n in ("q", "k", "v", "media_mask"))
    plan = _run_plan(media_mask, inputs.options["media_len"])

    def run():
        outs = []
        for b, runs in enumerate(plan):
            pieces = []
            for t0, t1, keys in runs:
                query = q[b : b + 1, t0:t1]
                if keys is None:
                    pieces.append(torch.zeros_like(query))
                    continue
                key, value = k[b : b + 1, keys], v[b : b + 1, keys]
                out = F.scaled_dot_product_attention(
                    query.transpose(1, 2),
                    key.transpose(1, 2),
                    value.transpose(1, 2),
                    enable_gqa=True,
                )
                pieces.append(out.transpose(1, 2))
            outs.append(torch.cat(pieces, dim=1))
        return torch.cat(outs, dim=0)

    return run


SPEC = OpSpec(
    name=OP,
    shapes=SHAPES,
    make_inputs=make_inputs,
    call_ours=call_ours,
    flops=flops,
    peers=(
        Peer("sdpa", "F.scaled_dot_product_attention, dense bool mask, enable_gqa", prepare_sdpa),
        Peer(
            "sdpa_nomask",
            "F.scaled_dot_product_attention, no mask (flash); all-visible masks only",
            prepare_sdpa_nomask,
        ),
        Peer(
            "eager",
            "HF Mllama eager: repeat_kv, matmul, finfo.min mask, fp32 softmax",
            prepare_eager,
        ),
        Peer("flex", "torch.compile(flex_attention) + create_block_mask", prepare_flex),
        Peer(
            "sdpa_runs",
            "one SDPA per run of identical mask rows, visible keys only",
            prepare_sdpa_runs,
        ),
    ),
    default_baseline="sdpa",
    variant_help=VARIANT_HELP,
)
