"""Unified embedding (the LLaVA recipe): no cross-attention blocks; each <image> token of the input is
replaced by the media item's projected image tokens (vk.concat_project over the tapped ViT layers,
optionally LLaVA-1.5's MLP connector; clips through the Perceiver resampler), and the decoder reads the
spliced sequence with ordinary causal self-attention.

    input_ids [B, S] with M <image> tokens per row, media as in VisionLanguageModel
    -> decoder input [B, S + M * (media_len - 1), D]   (what every decoder layer now processes)
    -> logits [B, S, V]: at each input position, the logits of its last spliced token (an <image>
       position: its last image token), so the targets and the loss are those of the
       cross-attention model

The price the seeds describe: every decoder layer runs over the image tokens too (caption: 4 -> 8
tokens per sequence with 5 tokens per image), where the cross-attention model's decoder sees only the
text and reads the images through its cross-attention blocks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.vlm import IGNORE_INDEX, VisionLanguageModel, _sample


class UnifiedEmbeddingVLM(VisionLanguageModel):
    """The VisionLanguageModel's vision path and decoder (built with ``fusion="unified"``: no
    cross-attention blocks), the image tokens spliced into the decoder's input."""

    def embed_inputs(
        self, input_ids: torch.Tensor, media: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(decoder input [B, S', D], last [B, S]): the token embeddings with every <image> token
        replaced by its media item's media_len image tokens (in order), S' = S + M * (media_len - 1);
        ``last[b, t]`` is the spliced position of input token t's last slot."""
        image_states, media_len = self.encode_media(media)  # (B, M * media_len, D)
        batch, length = input_ids.shape
        is_image = input_ids == self.config.image_id  # (B, S)
        width = 1 + is_image.long() * (media_len - 1)  # slots of each input token
        end = width.cumsum(1)
        start = end - width
        spliced = int(end[0, -1])  # the same for every row (M image tokens each)
        # index[b, p]: the row of [token embeddings ; image states] that spliced position p takes.
        index = torch.empty(batch, spliced, dtype=torch.long, device=input_ids.device)
        rows, cols = torch.nonzero(~is_image, as_tuple=True)
        index[rows, start[rows, cols]] = cols
        rows, cols = torch.nonzero(is_image, as_tuple=True)  # row-major: the k-th image of a row
        image_number = (is_image.long().cumsum(1) - 1)[rows, cols]  # (B*M,)
        slots = torch.arange(media_len, device=input_ids.device)
        index[rows[:, None], start[rows, cols][:, None] + slots] = (
            length + image_number[:, None] * media_len + slots
        )
        tokens = self.decoder.tok_embeddings(input_ids)  # (B, S, D)
        source = torch.cat([tokens, image_states.to(tokens.dtype)], dim=1)  # (B, S + M*T, D)
        embeds = source.gather(1, index[..., None].expand(-1, -1, source.shape[-1]))
        return embeds, end - 1

    def decoder_tokens(self, input_ids: torch.Tensor, media: torch.Tensor | None) -> int:
        """Tokens per sequence that every decoder layer processes for this batch."""
        if self.text_only(media):
            return input_ids.shape[1]
        media_len = self.config.num_latents if media.dim() == 6 else self.vision_tokens()
        return input_ids.shape[1] + media.shape[1] * (media_len - 1)

    def vision_tokens(self) -> int:
        """Image tokens per image (patches + CLS)."""
        return (self.config.image_size // self.config.patch_size) ** 2 + 1

    def forward(
        self,
        input_ids: torch.Tensor,
        media: torch.Tensor | None,
        targets: torch.Tensor | None = None,
    ):
        """As VisionLanguageModel.forward: logits [B, S, V] (see the module docstring), and with
        ``targets`` the mean cross-entropy."""
        self.check_inputs(input_ids, media)
        if self.text_only(media):
            logits = self.decoder(input_ids, None, None, 0)
        else:
            embeds, last = self.embed_inputs(input_ids, media)
            if embeds.shape[1] > self.config.max_seq_len:
                raise ValueError(
                    f"input_ids {tuple(input_ids.shape)} with media {tuple(media.shape)} splice to "
                    f"{embeds.shape[1]} tokens, more than max_seq_len={self.config.max_seq_len}"
                )
            spliced = self.decoder(None, None, None, 0, inputs_embeds=embeds)  # (B, S', V)
            logits = spliced.gather(1, last[..., None].expand(-1, -1, spliced.shape[-1]))
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
        return logits, loss


@torch.no_grad()
def generate_unified(
    model: UnifiedEmbeddingVLM,
    input_ids: torch.Tensor,
    media: torch.Tensor | None,
    max_new_tokens: int,
    *,
    temperature: float,
    top_k: int | None,
    use_cache: bool,
    generator: torch.Generator | None,
    decode: str,
) -> torch.Tensor:
    """``model.vlm.generate`` for one group of prompts of one length (no <pad>): the spliced prompt
    goes through the decoder once (its image tokens then sit in the self-attention KV cache, so
    there is no separate image cache), then one token per step; use_cache=False recomputes the whole
    spliced sequence every step. Eager decoding only."""
    c = model.config
    if decode != "eager":
        raise ValueError(
            f"the unified-embedding model decodes eagerly only (no CUDA-graph step), got {decode!r}"
        )
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    model.check_inputs(input_ids, media)
    batch, prompt_len = input_ids.shape
    device = input_ids.device
    if model.text_only(media):
        embeds = model.decoder.tok_embeddings(input_ids)
    else:
        embeds, _ = model.embed_inputs(input_ids, media)  # (B, S', D)
    spliced_len = embeds.shape[1]
    total = spliced_len + max_new_tokens
    if total > c.max_seq_len:
        raise ValueError(
            f"prompt ({prompt_len} tokens, {spliced_len} with the image tokens spliced in) + "
            f"max_new_tokens ({max_new_tokens}) exceeds max_seq_len={c.max_seq_len}"
        )
    ids = torch.full(
        (batch, prompt_len + max_new_tokens), c.pad_id, dtype=input_ids.dtype, device=device
    )
    ids[:, :prompt_len] = input_ids
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    banned = torch.tensor([c.pad_id, c.bos_id, c.image_id], device=device)
    if use_cache:
        model.decoder.setup_caches(batch, total, next(model.parameters()).dtype)
    try:
        end, position, step_input = prompt_len, 0, embeds
        for _ in range(max_new_tokens):
            if use_cache:
                input_pos = torch.arange(position, position + step_input.shape[1], device=device)
                logits = model.decoder(None, None, None, 0, input_pos, inputs_embeds=step_input)
                position += step_input.shape[1]
            else:
                logits = model.decoder(None, None, None, 0, inputs_embeds=embeds)
            logits = logits[:, -1]
            logits[:, banned] = float("-inf")
            next_token = _sample(logits, temperature, top_k, generator)
            next_token = torch.where(finished, torch.full_like(next_token, c.pad_id), next_token)
            ids[:, end] = next_token
            end += 1
            finished |= next_token == c.eos_id
            if bool(finished.all()):
                break
            step_input = model.decoder.tok_embeddings(next_token)[:, None]  # (B, 1, D)
            embeds = torch.cat([embeds, step_input], dim=1)
    finally:
        if use_cache:
            model.decoder.clear_caches()
    return ids[:, :end]
