"""Tokenised, dynamically padded batches: each batch is padded to its own longest example.

With `group_by_length` the training batches are drawn from runs of similar length (as the
`group_by_length` of transformers' Trainer): shuffle, cut into mega-batches of 50 batches, sort each
by token count, cut into batches, shuffle the batches. On RTE at batch 32 this halves the padded tokens
a CPU has to push through (318,720 -> 169,184 per epoch; CoLA 199,337 -> 100,640)."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.utils.data import DataLoader

MEGABATCH = 50      # batches per sorted run: long enough to group lengths, short enough to stay random


class PairCollator:
    """Tokenises a list of {"text_a", "text_b"?, "label"} rows into one padded batch."""

    def __init__(self, tokenizer, max_length: int, regression: bool):
        self.tokenizer, self.max_length, self.regression = tokenizer, max_length, regression

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        text_a = [row["text_a"] for row in rows]
        text_b = [row["text_b"] for row in rows] if "text_b" in rows[0] else None
        batch = self.tokenizer(text_a, text_b, padding="longest", truncation=True,
                               max_length=self.max_length, return_tensors="pt")
        dtype = torch.float32 if self.regression else torch.long
        batch["labels"] = torch.tensor([row["label"] for row in rows], dtype=dtype)
        return dict(batch)


def token_lengths(split, tokenizer, max_length: int) -> list[int]:
    """Each example's token count after truncation, as PairCollator would make it."""
    text_b = list(split["text_b"]) if "text_b" in split.column_names else None
    encoded = tokenizer(list(split["text_a"]), text_b, truncation=True, max_length=max_length,
                        return_attention_mask=False, return_token_type_ids=False)
    return [len(ids) for ids in encoded["input_ids"]]


def batch_order(n: int, batch_size: int, generator: torch.Generator,
                lengths: Sequence[int] | None = None) -> list[list[int]]:
    """One epoch's batches of indices into n examples: a random permutation cut into batches, or, given
    the examples' lengths, batches of similar length in random order (see the module doc)."""
    permutation = torch.randperm(n, generator=generator).tolist()
    if lengths is None:
        return [permutation[i:i + batch_size] for i in range(0, n, batch_size)]
    batches = []
    for start in range(0, n, batch_size * MEGABATCH):
        run = sorted(permutation[start:start + batch_size * MEGABATCH], key=lambda i: -lengths[i])
        batches += [run[i:i + batch_size] for i in range(0, len(run), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


class LengthGroupedBatches:
    """A batch sampler of batches of similar length, drawn from `generator` (whose state at an epoch's
    start fixes that epoch's batches, as the training loop's resume needs)."""

    def __init__(self, lengths: Sequence[int], batch_size: int, generator: torch.Generator):
        self.lengths, self.batch_size, self.generator = list(lengths), batch_size, generator

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)

    def __iter__(self):
        yield from batch_order(len(self.lengths), self.batch_size, self.generator, self.lengths)


def make_loader(split, tokenizer, max_length: int, regression: bool, batch_size: int,
                shuffle: bool, seed: int = 0, group_by_length: bool = False) -> DataLoader:
    collator = PairCollator(tokenizer, max_length, regression)
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    if shuffle and group_by_length:
        sampler = LengthGroupedBatches(token_lengths(split, tokenizer, max_length), batch_size, generator)
        return DataLoader(split, batch_sampler=sampler, generator=generator, collate_fn=collator)
    return DataLoader(split, batch_size=batch_size, shuffle=shuffle, generator=generator, collate_fn=collator)
