"""The three tasks on scikit-learn's 1,797 real 8x8 handwritten digits (bundled, no downloads).

    caption      <bos> <image> seven <eos>                       media [B, 1, 1, 8, 8]
    interleaved  <bos> <image> seven <image> two <eos>            media [B, 2, 1, 8, 8]  (each caption is
                                                                  its own image's: the per-token mask)
    video        <bos> video <image> three one four <eos>          media [B, 1, 3, 1, 8, 8]  (a clip of
                                                                  3 frames through the resampler)

Images are split into train and test by image (a seeded permutation), so every test caption is of an
image never trained on. Pixels are uint8 (0..255, the 16 gray levels of the data set scaled); the model
normalizes them inside vk.patch_embed. Augmentation (light): a one-pixel shift for a quarter of the images, a +-15% contrast jitter.
``targets`` are position-aligned: targets[:, t] is the token position t must predict (the caption words
and <eos>; everything else IGNORE_INDEX).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from model.tokenizer import DIGIT_WORDS, Tokenizer
from model.vlm import IGNORE_INDEX

TASKS = ("caption", "interleaved", "video")


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, S) int64
    targets: torch.Tensor  # (B, S) int64, IGNORE_INDEX where nothing is predicted
    media: torch.Tensor  # (B, M, C, H, W) or (B, M, F, C, H, W) uint8
    digits: torch.Tensor  # (B, K) the digits of the answer, in order
    task: str

    def rows(self, start: int, stop: int) -> Batch:
        """Rows start:stop (a rank's share of a global batch)."""
        return Batch(
            self.input_ids[start:stop],
            self.targets[start:stop],
            self.media[start:stop],
            self.digits[start:stop],
            self.task,
        )

    def to(self, device: torch.device | str) -> Batch:
        """The batch with the model's inputs and targets on ``device`` (the digits, which only
        scoring reads, stay where they are)."""
        return Batch(
            self.input_ids.to(device),
            self.targets.to(device),
            self.media.to(device),
            self.digits,
            self.task,
        )

    def prompt_length(self) -> int:
        """Tokens up to and including the first <image> (what generation starts from)."""
        return {"caption": 2, "interleaved": 2, "video": 3}[self.task]


class Digits:
    """sklearn's digits, split by image: train_images/test_images [N, 1, 8, 8] uint8, *_labels [N]."""

    def __init__(self, seed: int = 0, test_fraction: float = 0.2):
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = np.rint(digits.images * (255 / 16)).astype(np.uint8)  # 16 gray levels -> 0..255
        images = torch.from_numpy(images)[:, None]  # (1797, 1, 8, 8)
        labels = torch.from_numpy(digits.target).long()
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
        num_test = round(test_fraction * len(labels))
        test, train = order[:num_test], order[num_test:]
        self.train_images, self.train_labels = images[train], labels[train]
        self.test_images, self.test_labels = images[test], labels[test]


@dataclass
class AugmentDraws:
    """The random numbers of ``augment_images`` for N images: offsets [2, N] (0, 1, 2 = a shift of
    -1, 0, +1 rows / columns) and the contrast scale [N, 1, 1, 1]. Drawn for a whole global batch
    and sliced by rows, so a rank augments only its own images and still gets what one process
    would (``TrainSampler``)."""

    offsets: torch.Tensor
    scale: torch.Tensor

    def rows(self, start: int, stop: int) -> AugmentDraws:
        return AugmentDraws(self.offsets[:, start:stop], self.scale[start:stop])


def augment_draws(
    n: int,
    generator: torch.Generator,
    shift_probability: float = 0.25,
    contrast: float = 0.15,
) -> AugmentDraws:
    """Draws the augmentation of ``n`` images (see ``augment_images``) from ``generator``."""
    offsets = torch.randint(0, 3, (2, n), generator=generator)  # 0, 1, 2 = shift -1, 0, +1
    keep = torch.rand(n, generator=generator) >= shift_probability
    offsets[:, keep] = 1
    scale = 1 + contrast * (2 * torch.rand(n, 1, 1, 1, generator=generator) - 1)
    return AugmentDraws(offsets, scale)


def augment_images(
    images: torch.Tensor,
    generator: torch.Generator,
    shift_probability: float = 0.25,
    contrast: float = 0.15,
) -> torch.Tensor:
    """Light augmentation of images [N, C, H, W] uint8: with probability ``shift_probability`` an image
    moves by one pixel in a random direction (zero fill), and every image's intensity is scaled by a
    random factor in [1 - contrast, 1 + contrast]."""
    draws = augment_draws(images.shape[0], generator, shift_probability, contrast)
    return apply_augment(images, draws)


def apply_augment(images: torch.Tensor, draws: AugmentDraws) -> torch.Tensor:
    """images [N, C, H, W] uint8 shifted and scaled as ``draws`` (of N images) say."""
    n, channels, height, width = images.shape
    if draws.offsets.shape != (2, n):
        raise ValueError(f"draws are for {draws.offsets.shape[1]} images, got {n}")
    padded = torch.nn.functional.pad(images, (1, 1, 1, 1))
    offsets = draws.offsets
    rows = (offsets[0][:, None] + torch.arange(height))[:, None, :, None]  # (N, 1, H, 1)
    cols = (offsets[1][:, None] + torch.arange(width))[:, None, None, :]  # (N, 1, 1, W)
    index = torch.arange(n)[:, None, None, None]
    shifted = padded[index, torch.arange(channels)[None, :, None, None], rows, cols]
    return (shifted.float() * draws.scale).round().clamp(0, 255).to(torch.uint8)


def make_batch(
    task: str,
    images: torch.Tensor,
    labels: torch.Tensor,
    tokenizer: Tokenizer,
) -> Batch:
    """images [B, K, 1, 8, 8] uint8 and labels [B, K]: K = 1 (caption), images per sequence
    (interleaved), frames per clip (video)."""
    batch, count = labels.shape
    words = torch.tensor([tokenizer.digit_id(d) for d in range(10)])[labels]  # (B, K)
    t = tokenizer
    column = torch.full((batch, 1), 0, dtype=torch.long)

    def const(token_id):
        return column + token_id

    if task == "caption":
        if count != 1:
            raise ValueError(f"caption takes one image per sequence, got {count}")
        pieces = [const(t.bos_id), const(t.image_id), words, const(t.eos_id)]
        media = images  # (B, 1, 1, 8, 8)
    elif task == "interleaved":
        pieces = [const(t.bos_id)]
        for i in range(count):
            pieces += [const(t.image_id), words[:, i : i + 1]]
        pieces.append(const(t.eos_id))
        media = images
    elif task == "video":
        pieces = [const(t.bos_id), const(t.ids["video"]), const(t.image_id), words, const(t.eos_id)]
        media = images[:, None]  # (B, 1, F, 1, 8, 8)
    else:
        raise ValueError(f"unknown task {task!r}; tasks: {TASKS}")
    input_ids = torch.cat(pieces, dim=1)
    # Position t predicts token t + 1 when that token is a caption word or <eos>.
    following = input_ids[:, 1:]
    is_answer = (following != t.image_id) & (following != t.ids["video"])
    targets = torch.full_like(input_ids, IGNORE_INDEX)
    targets[:, :-1] = torch.where(is_answer, following, IGNORE_INDEX)
    return Batch(input_ids, targets, media, labels, task)


def items_per_sequence(task: str, interleaved_images: int, video_frames: int) -> int:
    return {"caption": 1, "interleaved": interleaved_images, "video": video_frames}[task]


class TrainSampler:
    """Random training batches, one task at a time, from one seeded generator (its state is saved in
    checkpoints, so a resumed run draws the same batches).

    Distributed: every rank draws the random numbers of the whole global batch (its image indices
    and augmentation: B * K small integers and floats, which keeps the ranks' generators in step)
    but gathers, augments and tokenizes only its own rows, so the ranks together see exactly the
    batch one process would."""

    def __init__(
        self,
        data: Digits,
        tokenizer: Tokenizer,
        *,
        seed: int,
        augment: bool = True,
        interleaved_images: int = 2,
        video_frames: int = 3,
    ):
        self.data, self.tokenizer, self.augment = data, tokenizer, augment
        self.counts = {"caption": 1, "interleaved": interleaved_images, "video": video_frames}
        self.generator = torch.Generator().manual_seed(seed)

    def next(self, task: str, batch_size: int, rows: tuple[int, int] | None = None) -> Batch:
        """The next global batch of ``batch_size`` sequences of ``task``, or only its rows
        ``rows = (start, stop)`` (a rank's share; the generator advances by the whole batch)."""
        count = self.counts[task]
        start, stop = (0, batch_size) if rows is None else rows
        if not 0 <= start <= stop <= batch_size:
            raise ValueError(f"rows {rows} are not a range within the batch of {batch_size}")
        index = torch.randint(
            len(self.data.train_labels), (batch_size, count), generator=self.generator
        )
        if self.augment:
            draws = augment_draws(batch_size * count, self.generator)
        index = index[start:stop]
        images = self.data.train_images[index.flatten()]  # (b*K, 1, 8, 8)
        if self.augment:
            images = apply_augment(images, draws.rows(start * count, stop * count))
        images = images.view(stop - start, count, *images.shape[1:])
        return make_batch(task, images, self.data.train_labels[index], self.tokenizer)


def eval_batch(
    task: str,
    data: Digits,
    tokenizer: Tokenizer,
    num_examples: int,
    *,
    seed: int = 1234,
    interleaved_images: int = 2,
    video_frames: int = 3,
) -> Batch:
    """A fixed set of held-out examples: caption takes the first ``num_examples`` test images; the other
    tasks draw seeded random tuples of test images."""
    num_test = len(data.test_labels)
    count = items_per_sequence(task, interleaved_images, video_frames)
    if task == "caption":
        index = torch.arange(min(num_examples, num_test))[:, None]
    else:
        generator = torch.Generator().manual_seed(seed + TASKS.index(task))
        index = torch.randint(num_test, (num_examples, count), generator=generator)
    images = data.test_images[index.flatten()].view(*index.shape, *data.test_images.shape[1:])
    return make_batch(task, images, data.test_labels[index], tokenizer)


def caption_words(digits) -> str:
    return " ".join(DIGIT_WORDS[int(d)] for d in digits)
