"""Tokenised, dynamically padded batches: each split tokenised once (`tokenise`), each batch padded to its longest example
(`PadCollator`). An epoch's order (`batch_order`): a random permutation cut into batches, or with `group_by_length` (as
in transformers' Trainer) runs of similar length, which halves RTE's padded tokens at batch 32."""

from __future__ import annotations

from collections.abc import Sequence

import datasets
import torch
from torch.utils.data import DataLoader

MEGABATCH = 50  # batches per sorted run: long enough to group lengths, short enough to stay random
TEXT_COLUMNS = ("text_a", "text_b")


def tokenise(split, tokenizer, max_length: int):
    """A split's rows as token ids and label, once (datasets.map, batched), truncated to max_length, unpadded."""

    def encode(rows: dict) -> dict:
        return dict(tokenizer(rows["text_a"], rows.get("text_b"), truncation=True, max_length=max_length))

    bars = not datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()  # no "Map: 100%" bar in every run's log
    try:
        texts = [c for c in TEXT_COLUMNS if c in split.column_names]
        return split.map(encode, batched=True, keep_in_memory=True, remove_columns=texts)
    finally:
        if bars:
            datasets.utils.enable_progress_bars()


class PadCollator:
    """Pads tokenised rows into one batch, to its longest row, on the tokenizer's side: what padding="longest" makes."""

    def __init__(self, tokenizer, regression: bool):
        self.regression, self.left = regression, tokenizer.padding_side == "left"
        pads = {"input_ids": tokenizer.pad_token_id, "attention_mask": 0}
        self.pad_values = pads | {"token_type_ids": tokenizer.pad_token_type_id}

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(row["input_ids"]) for row in rows)
        batch = {}
        for key, pad in self.pad_values.items():
            if key in rows[0]:
                padding = [[pad] * (longest - len(row[key])) for row in rows]
                batch[key] = torch.tensor(
                    [p + row[key] if self.left else row[key] + p for row, p in zip(rows, padding)], dtype=torch.long
                )
        labels = [row["label"] for row in rows]
        batch["labels"] = torch.tensor(labels, dtype=torch.float32 if self.regression else torch.long)
        return batch


def token_lengths(tokenised) -> list[int]:
    """Each tokenised row's token count (truncated, unpadded)."""
    return [len(ids) for ids in tokenised["input_ids"]]


def batch_order(
    n: int, batch_size: int, generator: torch.Generator, lengths: Sequence[int] | None = None
) -> list[list[int]]:
    """One epoch's batches of indices into n examples: shuffled, or given `lengths` grouped by length (module doc)."""
    permutation = torch.randperm(n, generator=generator).tolist()
    if lengths is None:
        return [permutation[i : i + batch_size] for i in range(0, n, batch_size)]
    batches = []
    for start in range(0, n, batch_size * MEGABATCH):
        run = sorted(permutation[start : start + batch_size * MEGABATCH], key=lambda i: -lengths[i])
        batches += [run[i : i + batch_size] for i in range(0, len(run), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def make_loader(split, tokenizer, max_length: int, regression: bool, batch_size: int) -> DataLoader:
    """A text split's batches in order, tokenised once here (not per batch): what propetl-eval scores."""
    return DataLoader(
        tokenise(split, tokenizer, max_length), batch_size=batch_size, collate_fn=PadCollator(tokenizer, regression)
    )
