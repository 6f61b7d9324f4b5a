"""Held-out accuracy by generation: the model writes the captions, nothing is teacher-forced.

caption      <bos> <image> -> "seven <eos>"                    right iff exactly that
interleaved  <bos> <image> -> w1, then <image> appended -> w2 ... -> "<eos>" after the last
             (each caption is written after its own image is inserted; right iff every caption is)
video        <bos> video <image> -> "three one four <eos>"     right iff exactly that
"""

from __future__ import annotations

import torch

from model.data import Batch
from model.tokenizer import DIGIT_WORDS, Tokenizer
from model.vlm import VisionLanguageModel, generate


def _digits_of(words: list[str]) -> list[int]:
    return [DIGIT_WORDS.index(w) if w in DIGIT_WORDS else -1 for w in words]


def _until_eos(tokens: torch.Tensor, tokenizer: Tokenizer) -> tuple[list[str], bool]:
    words, ended = [], False
    for token in tokens.tolist():
        if token == tokenizer.eos_id:
            ended = True
            break
        words.append(tokenizer.words[token])
    return words, ended


@torch.no_grad()
def predict(
    model: VisionLanguageModel,
    batch: Batch,
    tokenizer: Tokenizer,
    *,
    chunk: int = 256,
    **generate_options,
) -> tuple[list[list[int]], list[str]]:
    """(predicted digits per row, -1 for a non-digit word; generated text per row)."""
    was_training = model.training
    model.eval()
    predictions, texts = [], []
    for start in range(0, batch.input_ids.shape[0], chunk):
        part = batch.rows(start, start + chunk)
        if part.task == "interleaved":
            rows = _predict_interleaved(model, part, tokenizer, **generate_options)
        else:
            prompt = part.input_ids[:, : part.prompt_length()]
            out = generate(model, prompt, part.media, part.digits.shape[1] + 1, **generate_options)
            rows = []
            for row in out[:, prompt.shape[1] :]:
                words, ended = _until_eos(row, tokenizer)
                rows.append((words, ended))
        for words, ended in rows:
            predictions.append(_digits_of(words) if ended else [*_digits_of(words), -1])
            texts.append(" ".join(words) + (" <eos>" if ended else ""))
    model.train(was_training)
    return predictions, texts


def _predict_interleaved(model, batch: Batch, tokenizer: Tokenizer, **generate_options):
    num_images = batch.media.shape[1]
    image = torch.full(
        (batch.input_ids.shape[0], 1), tokenizer.image_id, device=batch.input_ids.device
    )
    ids = batch.input_ids[:, : batch.prompt_length()]  # <bos> <image>
    words = [[] for _ in range(ids.shape[0])]
    for i in range(num_images):
        last = i == num_images - 1
        media = batch.media[:, : i + 1]
        out = generate(model, ids, media, 2 if last else 1, **generate_options)
        new = out[:, ids.shape[1] :]
        for row, tokens in enumerate(new.tolist()):
            words[row].append(tokenizer.words[tokens[0]])
            if last:
                ended = len(tokens) > 1 and tokens[1] == tokenizer.eos_id
                words[row].append("<eos>" if ended else tokenizer.words[tokens[-1]])
        if not last:
            ids = torch.cat([out, image], dim=1)
    return [(w[:-1], w[-1] == "<eos>") for w in words]


def score_counts(predictions: list[list[int]], targets: list[list[int]]) -> tuple[int, int]:
    """(rows with every caption right, captions right) of ``predict``'s rows against the digits."""
    right = sum(p == t for p, t in zip(predictions, targets, strict=True))
    hits = sum(
        sum(a == b for a, b in zip(p, t, strict=False))
        for p, t in zip(predictions, targets, strict=True)
    )
    return right, hits


def accuracy(
    model: VisionLanguageModel, batch: Batch, tokenizer: Tokenizer, **generate_options
) -> dict[str, float]:
    """{"sequence": every caption of a row right, "digit": per-caption accuracy}."""
    predictions, _ = predict(model, batch, tokenizer, **generate_options)
    right, hits = score_counts(predictions, batch.digits.tolist())
    return {"sequence": right / len(predictions), "digit": hits / batch.digits.numel()}
