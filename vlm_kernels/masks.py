"""Per-token media masks: which media chunks (images, or tiles of images) each text token may attend to.

Every builder returns the one representation the ops take: ``media_mask [B, S, M]`` bool, True where text
token ``t`` may see chunk ``m``. Pure functions of their inputs, on any device.
"""

from __future__ import annotations

import torch

from vlm_kernels._checks import check_tensor


def from_image_token_ids(
    input_ids: torch.Tensor,
    image_token_id: int,
    *,
    num_media: int | None = None,
    tiles_per_image: int = 1,
) -> torch.Tensor:
    """The Mllama processor rule (``get_cross_attention_token_mask`` in transformers).

    Image ``i`` is visible from its own image token up to, not including, the next image token that is
    not adjacent to the one before it; adjacent image tokens form a group that the text after them sees
    together; the last group stays visible to the end. Text before the first image sees nothing. For
    ``<i1><i2>These are two dogs.<i3>This is a cat.``: token 0 sees image 1; tokens 1-6 see images 1 and 2;
    tokens 7 onward see only image 3.

    input_ids [B, S] (or [S]) integer; returns [B, S, M * tiles_per_image] bool with M = ``num_media`` or
    the largest image count of a row (column ``i * tiles_per_image + j`` is tile j of image i).
    """
    if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 1:
        input_ids = input_ids[None]
    check_tensor("input_ids", input_ids, ndim=2, shape_doc="[B, S]")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
    if tiles_per_image < 1:
        raise ValueError(f"tiles_per_image must be >= 1, got {tiles_per_image}")
    batch, seq_len = input_ids.shape
    if batch * seq_len == 0:
        return torch.zeros(
            batch,
            seq_len,
            (num_media or 0) * tiles_per_image,
            dtype=torch.bool,
            device=input_ids.device,
        )
    is_image = input_ids == image_token_id  # [B, S]
    image_counts = is_image.sum(-1)
    most_images = int(image_counts.max())
    if num_media is None:
        num_media = most_images
    elif most_images > num_media:
        raise ValueError(
            f"a row of input_ids holds {most_images} image tokens but num_media={num_media}"
        )
    # A group leader is an image token whose previous token is not one; a token's group is the number of
    # leaders at or before it (0 = before the first image).
    previous_is_image = torch.nn.functional.pad(is_image, (1, 0))[:, :-1]
    token_group = (is_image & ~previous_is_image).cumsum(-1)  # [B, S]
    positions = torch.arange(seq_len, device=input_ids.device).expand(batch, seq_len)
    image_index = is_image.cumsum(-1) - 1  # index of each image token among its row's images
    # Start position and group of image i; absent images get start S (never visible).
    image_start = torch.full((batch, num_media + 1), seq_len, device=input_ids.device)
    slot = torch.where(is_image, image_index, num_media)  # non-image tokens write to a spare slot
    image_start.scatter_(1, slot, torch.where(is_image, positions, seq_len))
    image_start = image_start[:, :num_media]
    image_group = torch.gather(token_group, 1, image_start.clamp(max=seq_len - 1))
    mask = (token_group[:, :, None] == image_group[:, None, :]) & (
        image_start[:, None, :] <= positions[:, :, None]
    )
    if tiles_per_image > 1:
        mask = mask.repeat_interleave(tiles_per_image, dim=-1)
    return mask


def from_media_locations(
    media_locations: torch.Tensor, only_immediate: bool = True, *, num_media: int | None = None
) -> torch.Tensor:
    """The Flamingo rule (OpenFlamingo ``MaskedCrossAttention``).

    media_locations [B, S] bool marks the tokens where a media item is inserted. A token's "text time" is
    the number of media at or before it; it sees the media whose index equals its text time
    (``only_immediate=True``) or every media up to it (``only_immediate=False``). Text before the first
    media sees nothing. Returns [B, S, M] bool, M = ``num_media`` or the largest media count of a row.
    """
    check_tensor("media_locations", media_locations, ndim=2, shape_doc="[B, S]")
    if media_locations.dtype != torch.bool:
        raise TypeError(f"media_locations must be a bool tensor, got {media_locations.dtype}")
    text_time = media_locations.cumsum(-1)  # [B, S], 1-based index of the latest media
    most_media = int(text_time[:, -1].max()) if media_locations.numel() else 0
    if num_media is None:
        num_media = most_media
    elif most_media > num_media:
        raise ValueError(
            f"a row of media_locations holds {most_media} media but num_media={num_media}"
        )
    media_time = torch.arange(1, num_media + 1, device=media_locations.device)
    if only_immediate:
        return text_time[:, :, None] == media_time
    return text_time[:, :, None] >= media_time


def from_hf_cross_attention_mask(cross_attention_mask: torch.Tensor) -> torch.Tensor:
    """Hugging Face Mllama's processor output ``cross_attention_mask [B, S, I, T]`` (0/1 per text token,
    image and tile) -> media_mask [B, S, I * T] bool, chunk ``i * T + t`` = tile t of image i."""
    check_tensor("cross_attention_mask", cross_attention_mask, ndim=4, shape_doc="[B, S, I, T]")
    batch, seq_len = cross_attention_mask.shape[:2]
    return (cross_attention_mask != 0).reshape(batch, seq_len, -1)


def to_additive(
    media_mask: torch.Tensor, media_len: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """media_mask [B, S, M] -> the additive mask [B, 1, S, M * media_len] Hugging Face Mllama feeds its
    attention: 0 where visible, ``finfo(dtype).min`` elsewhere, and rows that see nothing all 0 (they
    attend uniformly; Mllama zeroes those rows' outputs later). For references and drop-in parity."""
    check_tensor("media_mask", media_mask, ndim=3, dtypes=(torch.bool,), shape_doc="[B, S, M]")
    visible = media_mask.repeat_interleave(media_len, dim=-1)
    visible = visible | ~media_mask.any(-1, keepdim=True)
    additive = torch.zeros(visible.shape, dtype=dtype, device=media_mask.device)
    return additive.masked_fill(~visible, torch.finfo(dtype).min)[:, None]
