"""The vision-language model: vision encoder -> multi-layer projector (-> Perceiver resampler for media
with several frames) -> image tokens that a gated-cross-attention LLaMA decoder reads under the per-token
media mask of the Mllama rule.

    input_ids [B, S] with M <image> tokens per row
    media     [B, M, C, H, W] images, or [B, M, F, C, H, W] clips of F frames (F > 1 goes through the
              resampler; F == 1 is an image); None or M = 0: a text-only batch (no <image> tokens),
              which skips the cross-attention blocks: the logits are the text model's alone
    -> logits [B, S, V]

The recipes' variants (``model/recipes.py``) come from the config: ``connector="mlp"`` puts LLaVA-1.5's
GELU + Linear after the projector, ``vision2_patch_size`` adds a second encoder whose features the one
projector concatenates (``model.vision.MultiVisionEncoder``), and ``fusion="unified"`` builds
``model.unified.UnifiedEmbeddingVLM`` (``build_vlm``), which splices the image tokens into the decoder's
input instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import vlm_kernels as vk
from model.config import ModelConfig
from model.static_decode import StaticDecodeStep
from model.text import ImageKV, TextDecoder
from model.vision import MultiVisionEncoder, VisionEncoder
from vlm_kernels import nn as vkn

IGNORE_INDEX = -100
IMAGE_CACHE_MODES = ("kv", "states", "none")


class MlpConnector(nn.Module):
    """LLaVA-1.5's 2-layer MLP connector, its first layer the multi-layer projector over the
    tapped vision features (vk.concat_project): features -> Linear(GELU(projector(features)))."""

    def __init__(self, in_features: tuple[int, ...], dim: int, *, backend: str | None = None):
        super().__init__()
        self.projector = vkn.MultiLayerProjector(in_features, dim, backend=backend)
        self.act = nn.GELU()
        self.linear = nn.Linear(dim, dim)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.linear(self.act(self.projector(features)))


def build_vlm(config: ModelConfig) -> VisionLanguageModel:
    """The model ``config.fusion`` names: cross-attention (this file) or unified embedding
    (``model.unified``)."""
    if config.fusion == "unified":
        from model.unified import UnifiedEmbeddingVLM

        return UnifiedEmbeddingVLM(config)
    return VisionLanguageModel(config)


class VisionLanguageModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.vision = (
            MultiVisionEncoder(config) if config.vision2_patch_size else VisionEncoder(config)
        )
        if config.connector == "mlp":
            self.multi_modal_projector = MlpConnector(
                self.vision.feature_dims, config.dim, backend=config.backend
            )
        else:
            self.multi_modal_projector = vkn.MultiLayerProjector(
                self.vision.feature_dims, config.dim, backend=config.backend
            )
        self.resampler = vkn.PerceiverResampler(
            dim=config.dim,
            depth=config.resampler_layers,
            dim_head=config.resampler_head_dim,
            heads=config.resampler_heads,
            num_latents=config.num_latents,
            max_num_frames=config.max_frames,
            ff_mult=2,
            backend=config.backend,
        )
        self.decoder = TextDecoder(config)

    # ---- inputs --------------------------------------------------------------------------------------

    def set_backend(self, backend: str | None) -> None:
        """Points every vlm_kernels module of the model at ``backend`` (None = auto)."""
        self.config.backend = backend
        for module in self.modules():
            if hasattr(module, "backend") and module.__class__.__module__.startswith("vlm_kernels"):
                module.backend = backend

    def check_inputs(self, input_ids: torch.Tensor, media: torch.Tensor | None) -> None:
        """Raises ValueError naming the shapes when the ids and the media do not fit together
        (``media`` None: a text-only batch, which must hold no <image> token)."""
        c = self.config
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(
                f"input_ids must be [B, S], got {getattr(input_ids, 'shape', input_ids)}"
            )
        if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        if input_ids.shape[1] > c.max_seq_len:
            raise ValueError(
                f"input_ids has {input_ids.shape[1]} tokens, more than max_seq_len={c.max_seq_len}"
            )
        if media is None:
            image_counts = (input_ids == c.image_id).sum(1)
            if bool(image_counts.any()):
                raise ValueError(
                    f"media is None (text only) but the rows hold {image_counts.tolist()} <image> "
                    f"tokens (id {c.image_id}): pass one media item per <image> token"
                )
            return
        if not isinstance(media, torch.Tensor) or media.dim() not in (5, 6):
            raise ValueError(
                "media must be [B, M, C, H, W] images or [B, M, F, C, H, W] clips, got "
                f"{getattr(media, 'shape', media)}"
            )
        frame_shape = (c.channels, c.image_size, c.image_size)
        if tuple(media.shape[-3:]) != frame_shape:
            raise ValueError(
                f"each image must be [C, H, W] = {list(frame_shape)}, got media {tuple(media.shape)}"
            )
        if media.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"media {tuple(media.shape)} and input_ids {tuple(input_ids.shape)} disagree on the "
                "batch size"
            )
        if media.dim() == 6 and media.shape[2] > c.max_frames:
            raise ValueError(
                f"clips have {media.shape[2]} frames, more than max_frames={c.max_frames}"
            )
        image_counts = (input_ids == c.image_id).sum(1)
        num_media = media.shape[1]
        if bool((image_counts != num_media).any()):
            raise ValueError(
                f"every row of input_ids needs one <image> token (id {c.image_id}) per media item: "
                f"media has M={num_media} per row (media {tuple(media.shape)}), the rows hold "
                f"{image_counts.tolist()} image tokens"
            )

    def media_mask(self, input_ids: torch.Tensor, num_media: int) -> torch.Tensor:
        """[B, S, M] bool: which media each token sees (the Mllama rule of vlm_kernels.masks)."""
        return vk.masks.from_image_token_ids(input_ids, self.config.image_id, num_media=num_media)

    # ---- the parts -----------------------------------------------------------------------------------

    def encode_media(self, media: torch.Tensor) -> tuple[torch.Tensor, int]:
        """media -> (image_states [B, M * media_len, D], media_len); M >= 1 (a text-only batch has
        no image states: see ``text_only``)."""
        batch, num_media = media.shape[:2]
        if num_media == 0:
            raise ValueError(
                f"encode_media needs at least one media item per row, got media {tuple(media.shape)}"
                " (a text-only batch skips the vision path: pass media=None or M = 0 to forward)"
            )
        frames = media.shape[2] if media.dim() == 6 else 1
        pixels = media.reshape(-1, *media.shape[-3:])  # (B*M*F, C, H, W)
        features = self.vision(pixels)  # each (B*M*F, T, Dv)
        tokens = self.multi_modal_projector(features)  # (B*M*F, T, D)
        if frames > 1:
            tokens = tokens.view(batch, num_media, frames, *tokens.shape[1:])  # (B, M, F, T, D)
            tokens = self.resampler(tokens)  # (B, M, num_latents, D)
        media_len = tokens.shape[-2]
        return tokens.reshape(batch, num_media * media_len, -1), media_len

    def image_kv(self, media: torch.Tensor) -> tuple[list[ImageKV], int]:
        """The image keys/values of every cross-attention block (computed once per prompt when decoding)."""
        image_states, media_len = self.encode_media(media)
        return self.decoder.compute_image_kv(image_states), media_len

    def decoder_tokens(self, input_ids: torch.Tensor, media: torch.Tensor | None) -> int:
        """Tokens per sequence that every decoder layer processes for this batch (the text alone:
        the image tokens reach the decoder as the cross-attention blocks' keys/values)."""
        return input_ids.shape[1]

    @staticmethod
    def text_only(media: torch.Tensor | None) -> bool:
        """Whether ``media`` carries no media item (None, or M = 0 per row)."""
        return media is None or media.shape[1] == 0

    def forward(
        self,
        input_ids: torch.Tensor,
        media: torch.Tensor | None,
        targets: torch.Tensor | None = None,
    ):
        """Returns logits [B, S, V]; with ``targets [B, S]`` (the token each position must predict,
        IGNORE_INDEX elsewhere) returns (logits, mean cross-entropy over the targets).

        ``media`` None or with M = 0: text only; the vision path and the cross-attention blocks are
        skipped, so the logits are those of the text decoder alone."""
        self.check_inputs(input_ids, media)
        if self.text_only(media):
            logits = self.decoder(input_ids, None, None, 0)
        else:
            image_kv, media_len = self.image_kv(media)
            media_mask = self.media_mask(input_ids, media.shape[1])
            logits = self.decoder(input_ids, media_mask, image_kv, media_len)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
        return logits, loss


@torch.no_grad()
def generate(
    model: VisionLanguageModel,
    input_ids: torch.Tensor,
    media: torch.Tensor | None,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    use_cache: bool = True,
    image_cache: str = "kv",
    generator: torch.Generator | None = None,
    cuda_graph: bool = False,
) -> torch.Tensor:
    """Continues every prompt row of ``input_ids [B, S0]`` by up to ``max_new_tokens``.

    media: as in ``VisionLanguageModel.forward`` (None or M = 0: text-only prompts).

    Prompts of different lengths: left-pad the shorter rows with <pad> (a run of <pad> before the
    prompt, none inside it). Rows are decoded in groups of one prompt length, each group as its own
    batch with its prompts at positions 0.. (no padding reaches the model, so every row's tokens are
    those it would get alone, greedy; sampling draws the groups one after another from
    ``generator``, shortest first). The output keeps each prompt where it was, its tokens right
    after it, <pad> after a row's end.

    temperature 0 = greedy; otherwise softmax(logits / temperature) restricted to the ``top_k`` best.
    A row stops at <eos> (later positions hold <pad>); the loop stops when all rows have. The special
    tokens <pad>, <bos> and <image> are never sampled (images are inserted by the caller).

    use_cache: self-attention KV cache (one token per step after the prompt); False recomputes the whole
        sequence every step (the reference the cached path must equal).
    image_cache (with use_cache): "kv" runs the vision tower and every cross-attention block's image
        key/value projections once per prompt; "states" keeps the image states but recomputes the keys/
        values every step; "none" recomputes both every step (the last two measure what the cache saves).
    cuda_graph: after the prompt and two warm-up tokens, decode each token by replaying one decode
        step captured in a CUDA graph (``model.static_decode``): CUDA tensors, use_cache and
        image_cache="kv" only. Its self-attention reads the whole static KV cache under a mask, so
        the logits may differ from the eager path's in the last bits; greedy tokens match.

    Returns [B, S0 + n] with n <= max_new_tokens.
    """
    options = dict(
        temperature=temperature,
        top_k=top_k,
        use_cache=use_cache,
        image_cache=image_cache,
        generator=generator,
        decode="graph" if cuda_graph else "eager",
    )
    lengths = prompt_lengths(input_ids, model.config.pad_id)
    width = input_ids.shape[1]
    if bool((lengths == width).all()):
        return _generate(model, input_ids, media, max_new_tokens, **options)
    model.check_inputs(input_ids, media)  # the whole batch's shapes, before any group runs
    groups = []
    for length in sorted(set(lengths.tolist())):
        rows = torch.nonzero(lengths == length)[:, 0]
        part_media = None if media is None else media[rows.to(media.device)]
        part = input_ids[rows, width - length :]
        groups.append((rows, length, _generate(model, part, part_media, max_new_tokens, **options)))
    new_tokens = max(out.shape[1] - length for _, length, out in groups)
    ids = torch.full(
        (input_ids.shape[0], width + new_tokens),
        model.config.pad_id,
        dtype=input_ids.dtype,
        device=input_ids.device,
    )
    for rows, length, out in groups:
        ids[rows, width - length : width - length + out.shape[1]] = out
    return ids


def prompt_lengths(input_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """[B] the tokens of each left-padded prompt row of ``input_ids [B, S]`` (S minus the leading
    <pad> run). Raises ValueError for a <pad> inside a prompt (right padding or a stray <pad>) and for
    a row of nothing but <pad>."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, S], got {tuple(input_ids.shape)}")
    is_pad = input_ids == pad_id
    # Leading pads: the positions whose row is <pad> all the way from the start.
    leading = is_pad.long().cumprod(1).sum(1)
    lengths = input_ids.shape[1] - leading
    if bool((lengths == 0).any()):
        rows = torch.nonzero(lengths == 0)[:, 0].tolist()
        raise ValueError(f"prompt rows {rows} of input_ids are all <pad> (id {pad_id})")
    inside = is_pad.sum(1) - leading
    if bool((inside > 0).any()):
        rows = torch.nonzero(inside > 0)[:, 0].tolist()
        raise ValueError(
            f"prompt rows {rows} of input_ids hold <pad> (id {pad_id}) after their first token: "
            "batched prompts of different lengths must be left-padded (<pad> only before the prompt)"
        )
    return lengths


# How generate runs the steps after the first: the eager decoder call; the static step of a CUDA
# graph run eagerly (the graph path's computation on any device: what the CPU tests check); the
# static step captured in a CUDA graph and replayed.
DECODE_MODES = ("eager", "static", "graph")


def _generate(
    model: VisionLanguageModel,
    input_ids: torch.Tensor,
    media: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float,
    top_k: int | None,
    use_cache: bool,
    image_cache: str,
    generator: torch.Generator | None,
    decode: str,
) -> torch.Tensor:
    """``generate`` with the decode steps run as ``decode`` says (one of DECODE_MODES)."""
    c = model.config
    if c.fusion == "unified":
        from model.unified import generate_unified

        return generate_unified(
            model,
            input_ids,
            media,
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            use_cache=use_cache,
            generator=generator,
            decode=decode,
        )
    model.check_inputs(input_ids, media)
    batch, prompt_len = input_ids.shape
    total = prompt_len + max_new_tokens
    if total > c.max_seq_len:
        raise ValueError(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
            f"max_seq_len={c.max_seq_len}"
        )
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if image_cache not in IMAGE_CACHE_MODES:
        raise ValueError(f"image_cache must be one of {IMAGE_CACHE_MODES}, got {image_cache!r}")
    if decode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {DECODE_MODES}, got {decode!r}")
    device = input_ids.device
    if decode == "graph" and device.type != "cuda":
        raise ValueError(
            "cuda_graph=True captures the decode step in a CUDA graph: the model and the inputs must "
            f"be on a CUDA device, got input_ids on {device}"
        )
    if decode != "eager" and not (use_cache and image_cache == "kv"):
        raise ValueError(
            "a static (CUDA-graph) decode step reads the KV cache and the image keys/values computed "
            f"once per prompt: it needs use_cache=True and image_cache='kv', got use_cache={use_cache},"
            f" image_cache={image_cache!r}"
        )
    if not use_cache:
        image_cache = "none"
    ids = torch.full((batch, total), c.pad_id, dtype=input_ids.dtype, device=device)
    ids[:, :prompt_len] = input_ids
    text_only = model.text_only(media)
    num_media = 0 if text_only else media.shape[1]
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    banned = torch.tensor([c.pad_id, c.bos_id, c.image_id], device=device)
    image_kv, media_len = None, 0  # text only: no image path at all
    if text_only:
        image_cache = "text"
    if image_cache in ("kv", "states"):
        image_states, media_len = model.encode_media(media)  # (B, M * media_len, D)
    if image_cache == "kv":
        image_kv = model.decoder.compute_image_kv(image_states)
    if use_cache:
        model.decoder.setup_caches(batch, total, next(model.parameters()).dtype)
    static_step = None
    try:
        end = prompt_len
        for step in range(max_new_tokens):
            if static_step is not None:
                logits = static_step(ids[:, end - 1], end - 1)
            else:
                start = 0 if (step == 0 or not use_cache) else end - 1
                media_mask = None
                if not text_only:
                    media_mask = model.media_mask(ids[:, :end], num_media)[:, start:end]
                if image_cache == "text":
                    kv, length = None, 0
                elif image_cache == "kv":
                    kv, length = image_kv, media_len
                elif image_cache == "states":
                    kv, length = model.decoder.compute_image_kv(image_states), media_len
                else:
                    kv, length = model.image_kv(media)
                input_pos = torch.arange(start, end, device=device) if use_cache else None
                logits = model.decoder(ids[:, start:end], media_mask, kv, length, input_pos)[:, -1]
            # (With a graph, logits is the graph's output buffer: the next replay rewrites it whole.)
            logits[:, banned] = float("-inf")
            next_token = _sample(logits, temperature, top_k, generator)
            next_token = torch.where(finished, torch.full_like(next_token, c.pad_id), next_token)
            ids[:, end] = next_token
            end += 1
            finished |= next_token == c.eos_id
            if bool(finished.all()):
                break
            if decode != "eager" and static_step is None:
                # Every later token sees what the first generated one sees (none is an <image>).
                decode_mask = None
                if not text_only:
                    decode_mask = model.media_mask(ids[:, :end], num_media)[:, -1:]
                static_step = StaticDecodeStep(
                    model.decoder,
                    image_kv,
                    decode_mask,
                    media_len,
                    token_dtype=ids.dtype,
                    cuda_graph=decode == "graph",
                )
    finally:
        if use_cache:
            model.decoder.clear_caches()
    return ids[:, :end]


def _sample(logits, temperature, top_k, generator) -> torch.Tensor:
    """logits [B, V] -> token ids [B]."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
