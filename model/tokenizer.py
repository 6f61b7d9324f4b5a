"""A word-level tokenizer built from the task vocabulary and saved with the checkpoint (no downloads).

"<bos> video <image> three one four <eos>" <-> [1, 4, 3, 8, 6, 9, 2]
"""

from __future__ import annotations

import json

import torch

SPECIALS = ("<pad>", "<bos>", "<eos>", "<image>")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TASK_WORDS = ("video",)


class Tokenizer:
    def __init__(self, words: list[str] | tuple[str, ...]):
        if tuple(words[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"the vocabulary must start with {SPECIALS}, got {list(words[:4])}")
        if len(set(words)) != len(words):
            raise ValueError("the vocabulary has repeated words")
        self.words = list(words)
        self.ids = {word: i for i, word in enumerate(self.words)}
        self.pad_id, self.bos_id, self.eos_id, self.image_id = range(len(SPECIALS))

    @classmethod
    def for_tasks(cls) -> Tokenizer:
        return cls([*SPECIALS, *TASK_WORDS, *DIGIT_WORDS])

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.ids[word] for word in text.split()]
        except KeyError as error:
            raise ValueError(
                f"word {error.args[0]!r} is not in the vocabulary {self.words}"
            ) from None

    def decode(self, ids, *, skip_special: bool = False) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        words = [self.words[i] for i in ids]
        if skip_special:
            words = [w for w in words if w not in SPECIALS]
        return " ".join(words)

    def digit_id(self, digit: int) -> int:
        return self.ids[DIGIT_WORDS[digit]]

    def to_json(self) -> str:
        return json.dumps({"type": "word-level", "words": self.words})

    @classmethod
    def from_json(cls, text: str) -> Tokenizer:
        return cls(json.loads(text)["words"])
