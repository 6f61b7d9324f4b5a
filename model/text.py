"""The text decoder: LLaMA-style (RMSNorm, RoPE, SwiGLU, GQA causal self-attention with a KV cache),
with a gated cross-attention block (tanh gates initialised at 0) before every k-th layer.

Names follow gpt-fast (tok_embeddings, layers.{i}.attention.wqkv/wo, feed_forward.w1/w2/w3,
attention_norm, ffn_norm, norm, output); the cross-attention blocks follow Mllama's
MllamaCrossAttentionDecoderLayer (cross_attn, input_layernorm, cross_attn_attn_gate, mlp,
post_attention_layernorm, cross_attn_mlp_gate).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import vlm_kernels as vk
from model.config import ModelConfig
from vlm_kernels import nn as vkn

# Image keys/values of one cross-attention block: (k, v), each [B, M * media_len, Hkv, Dh].
ImageKV = tuple[torch.Tensor, torch.Tensor]


def rope_tables(seq_len: int, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [seq_len, head_dim / 2] of the rotary embedding."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, L, H, Dh], cos/sin [L, Dh/2]: rotates the pairs (x[2i], x[2i+1])."""
    pairs = x.float().unflatten(-1, (-1, 2))  # (B, L, H, Dh/2, 2)
    real, imag = pairs.unbind(-1)
    cos, sin = cos[:, None, :], sin[:, None, :]  # (L, 1, Dh/2)
    rotated = torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1)
    return rotated.flatten(-2).to(x.dtype)


class KVCache(nn.Module):
    """Self-attention keys/values of the tokens decoded so far, [B, Hkv, max_seq_len, Dh]."""

    def __init__(self, batch: int, heads: int, max_seq_len: int, head_dim: int, dtype: torch.dtype):
        super().__init__()
        shape = (batch, heads, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Writes k, v [B, Hkv, L, Dh] at positions input_pos [L]; returns the cache up to the last one."""
        self.k_cache[:, :, input_pos] = k.to(self.k_cache.dtype)
        self.v_cache[:, :, input_pos] = v.to(self.v_cache.dtype)
        end = int(input_pos[-1]) + 1
        return self.k_cache[:, :, :end], self.v_cache[:, :, :end]

    def write(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Writes k, v [B, Hkv, L, Dh] at positions input_pos [L]; returns the whole cache.

        The static form of ``update`` for a captured decode step: no host sync (``update`` reads the
        last position back to slice the cache) and the same shapes every step. The caller masks the
        positions after ``input_pos``."""
        self.k_cache.index_copy_(2, input_pos, k.to(self.k_cache.dtype))
        self.v_cache.index_copy_(2, input_pos, v.to(self.v_cache.dtype))
        return self.k_cache, self.v_cache


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.n_heads,
            config.n_kv_heads,
            config.head_dim,
        )
        qkv_size = (config.n_heads + 2 * config.n_kv_heads) * config.head_dim
        self.wqkv = nn.Linear(config.dim, qkv_size, bias=False)
        self.wo = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(
        self, x, cos, sin, input_pos: torch.Tensor | None = None, static_cache: bool = False
    ) -> torch.Tensor:
        """x [B, L, D]; cos/sin [L, Dh/2] at the tokens' positions; input_pos [L] uses the KV cache.

        static_cache: attend over the whole cache (``KVCache.write``), the later positions masked, so
        that the step has fixed shapes and no host sync (CUDA-graph capturable); otherwise over the
        cache up to the last position."""
        batch, length, _ = x.shape
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = self.wqkv(x).split([q_size, kv_size, kv_size], dim=-1)
        q = apply_rope(q.view(batch, length, self.n_heads, self.head_dim), cos, sin)
        k = apply_rope(k.view(batch, length, self.n_kv_heads, self.head_dim), cos, sin)
        v = v.view(batch, length, self.n_kv_heads, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, L, Dh)
        if input_pos is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            if self.kv_cache is None:
                raise RuntimeError("input_pos given but no KV cache: call setup_caches first")
            write = self.kv_cache.write if static_cache else self.kv_cache.update
            k, v = write(input_pos, k, v)  # (B, Hkv, S, Dh)
            causal = input_pos[:, None] >= torch.arange(k.shape[2], device=x.device)  # (L, S)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=causal, enable_gqa=True)
        return self.wo(out.transpose(1, 2).reshape(batch, length, q_size))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attention_norm = vkn.RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = vkn.RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config.dim, config.ffn_hidden)

    def forward(self, x, cos, sin, input_pos=None, static_cache: bool = False) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, input_pos, static_cache)
        return x + self.feed_forward(self.ffn_norm(x))


class GatedCrossAttentionBlock(nn.Module):
    """x + tanh(g_attn) * xattn(norm(x)); then x + tanh(g_mlp) * mlp(norm(x)) on tokens that see an image.

    Both gates start at 0, so at initialisation the block is the identity and the decoder is a plain LM.
    A token that sees no image (text before the first one) passes through unchanged: the attention gives
    it 0 (empty_rows="zero") and its MLP update is masked, as in Mllama's full_text_row_masked_out_mask.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = vkn.RMSNorm(config.dim, config.norm_eps)
        self.cross_attn = vkn.ImageTextCrossAttention(
            config.dim,
            config.cross_heads,
            config.cross_kv_heads,
            norm_eps=config.norm_eps,
            backend=config.backend,
        )
        self.cross_attn_attn_gate = nn.Parameter(torch.zeros(1))
        self.post_attention_layernorm = vkn.RMSNorm(config.dim, config.norm_eps)
        self.mlp = FeedForward(config.dim, config.ffn_hidden)
        self.cross_attn_mlp_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x, media: vk.MediaSchedule, image_kv: ImageKV) -> torch.Tensor:
        """x [B, L, D], media: the schedule of the media mask [B, L, M] (built once per forward by the
        decoder, empty_rows="zero"), image_kv ([B, M*media_len, Hkv, Dh] x 2) -> [B, L, D]."""
        attended = self.cross_attn(self.input_layernorm(x), media, image_kv)
        x = x + self.cross_attn_attn_gate.tanh() * attended
        sees_media = media.media_mask.any(-1, keepdim=True)  # (B, L, 1)
        update = self.mlp(self.post_attention_layernorm(x)) * sees_media
        return x + self.cross_attn_mlp_gate.tanh() * update


class TextDecoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        every = config.cross_attention_every
        # layer index -> its cross-attention block (placed before that layer)
        # (fusion "unified": none; the image tokens come in through the input embeddings)
        self.cross_layer_ids = [
            i
            for i in range(config.n_layers)
            if (i + 1) % every == 0 and config.fusion == "cross_attention"
        ]
        self.cross_layers = nn.ModuleList(
            GatedCrossAttentionBlock(config) for _ in self.cross_layer_ids
        )
        self.norm = vkn.RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        cos, sin = rope_tables(config.max_seq_len, config.head_dim, config.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def setup_caches(self, batch: int, max_seq_len: int, dtype: torch.dtype) -> None:
        if max_seq_len > self.config.max_seq_len:
            raise ValueError(
                f"max_seq_len {max_seq_len} exceeds the model's max_seq_len {self.config.max_seq_len}"
            )
        c = self.config
        device = self.tok_embeddings.weight.device
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(
                batch, c.n_kv_heads, max_seq_len, c.head_dim, dtype
            ).to(device)

    def clear_caches(self) -> None:
        for layer in self.layers:
            layer.attention.kv_cache = None

    def compute_image_kv(self, image_states: torch.Tensor) -> list[ImageKV]:
        """image_states [B, M * media_len, D] -> one (k, v) per cross-attention block."""
        return [block.cross_attn.compute_image_kv(image_states) for block in self.cross_layers]

    def forward(
        self,
        input_ids: torch.Tensor,
        media_mask: torch.Tensor | None,
        image_kv: list[ImageKV] | None,
        media_len: int,
        input_pos: torch.Tensor | None = None,
        *,
        static_cache: bool = False,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids [B, L], media_mask [B, L, M] -> logits [B, L, V] (float32).

        inputs_embeds [B, L, D]: the first layer's input in place of the embedded input_ids (which
        may then be None): the unified-embedding (LLaVA) model's spliced text and image tokens.

        Text only (media_mask and image_kv None): the cross-attention blocks are skipped, so the
        decoder is exactly the text model alone. (With media, a token that sees none already passes
        a block unchanged; skipping them gives that without a schedule over M = 0 media.)

        input_pos [L]: the tokens' positions, and decode through the KV cache; None: positions 0..L-1,
        no cache. static_cache (with input_pos): self-attention reads the whole KV cache with the
        positions after input_pos masked: fixed shapes and no host sync, the form of a decode step
        that ``model.static_decode`` captures in a CUDA graph."""
        length = (input_ids if inputs_embeds is None else inputs_embeds).shape[1]
        if static_cache and input_pos is None:
            raise ValueError("static_cache=True decodes through the KV cache: pass input_pos")
        if input_pos is None:
            cos, sin = self.rope_cos[:length], self.rope_sin[:length]
        else:
            cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]
        if (media_mask is None) != (image_kv is None):
            raise ValueError(
                "media_mask and image_kv go together: both None (text only) or both given, got "
                f"media_mask {'None' if media_mask is None else 'given'}, image_kv "
                f"{'None' if image_kv is None else 'given'}"
            )
        x = self.tok_embeddings(input_ids) if inputs_embeds is None else inputs_embeds  # (B, L, D)
        cross = {}
        if media_mask is not None:
            # One media schedule per forward, shared by every cross-attention block.
            media = vk.MediaSchedule(media_mask, media_len=media_len, empty_rows="zero")
            cross = dict(
                zip(
                    self.cross_layer_ids, zip(self.cross_layers, image_kv, strict=True), strict=True
                )
            )
        for index, layer in enumerate(self.layers):
            if index in cross:
                block, kv = cross[index]
                x = block(x, media, kv)
            x = layer(x, cos, sin, input_pos, static_cache)
        return self.output(self.norm(x)).float()
