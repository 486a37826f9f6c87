"""Tokenised, dynamically padded batches: each batch is padded to its own longest example."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader


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


def make_loader(split, tokenizer, max_length: int, regression: bool, batch_size: int,
                shuffle: bool, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(split, batch_size=batch_size, shuffle=shuffle, generator=generator,
                      collate_fn=PairCollator(tokenizer, max_length, regression))
