"""Text-to-text examples for an encoder-decoder (T5): "source" and "target" strings per row, tokenised once
(`tokenise`) into input_ids (max source length, truncated) and labels (max target length, truncated; a pad id in them
is LABEL_PAD), each batch padded to its longest row (`Seq2SeqCollator`: inputs with the tokenizer's pad id and an
attention mask, labels with LABEL_PAD, which the loss ignores). GLUE comes from glue.load_glue (the encoder path's
files and split protocol; MNLI selects on its mismatched dev set, as the reference's T5 code) in text_to_text's
format; XSum and WMT16 from generation_tasks. Any HF tokenizer (T5's SentencePiece for real runs) with a pad token;
nothing here depends on the model."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader

from propetl.configs import plain_group
from propetl.data import generation_tasks, glue, text_to_text

SOURCE, TARGET = "source", "target"
LABEL_PAD = -100  # torch's cross_entropy ignore_index: padded label positions add nothing to the loss
GLUE_LENGTHS = (128, 128)  # the reference's max source / target length for multi-task GLUE (paper.md §5.2)
GLUE_NUM_BEAMS = 1  # greedy decoding for GLUE
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class TextToTextSettings:
    """How a task is tokenised and decoded: source truncation, label truncation per split, generate's
    max_new_tokens and num_beams (paper.md §5.2; XSum and WMT16 from their yamls)."""

    max_source_length: int
    max_target_length: Mapping[str, int]  # split -> label truncation (validation/test labels are what is scored)
    max_new_tokens: int
    num_beams: int


def task_settings(task_cfg: Mapping[str, Any], tokenizer) -> TextToTextSettings:
    """A task's TextToTextSettings. GLUE: 128/128, greedy, and as many new tokens as the longest label string takes
    (the reference's compute_task_max_decoding_length, whose generate max_length counts the decoder's start token
    and so leaves room for the label's tokens without </s>). Generation tasks: their yaml's lengths, max_new_tokens
    and num_beams."""
    task = plain_group(task_cfg)
    name = str(task.get("name"))
    if is_glue_task(name):
        source, target = GLUE_LENGTHS
        longest = max(len(tokenizer(label)["input_ids"]) for label in label_strings(name, int(task["num_labels"])))
        return TextToTextSettings(source, dict.fromkeys(SPLITS, target), max(longest - 1, 1), GLUE_NUM_BEAMS)
    lengths = task["lengths"]
    return TextToTextSettings(
        int(lengths["source"]),
        {"train": int(lengths["target"]), "validation": int(lengths["validation"]), "test": int(lengths["test"])},
        int(task["max_new_tokens"]),
        int(task["num_beams"]),
    )


def label_strings(task: str, num_labels: int) -> list[str]:
    """Every target a GLUE task can have: the class ids as text; STS-B's scores 0.0, 0.2, ... 5.0 (the reference's
    label_list)."""
    if task == "stsb":
        return [str(np.round(score, decimals=1)) for score in np.arange(0, 5.2, 0.2)]
    return [str(label) for label in range(num_labels)]


def is_glue_task(task: str) -> bool:
    """Whether `task` is one of the GLUE tasks text_to_text formats (the rest come from generation_tasks)."""
    return task in text_to_text.FIELDS


def glue_text_to_text(
    task_cfg: Mapping[str, Any],
    data_dir: str | os.PathLike | None,
    protocol: str = "split",
    split_seed: int = 42,
    allow_hub: bool = True,
    add_prefix: bool = False,
) -> datasets.DatasetDict:
    """A GLUE task's train/validation/test (glue.load_glue: the encoder path's rows and split, but MNLI's as the
    reference's T5 code splits it: the task's text_to_text.validation) as source, target and the original label.
    `add_prefix` puts the task name in front of the source: False for adapter/ProPETL runs (the reference's), True
    for full fine-tuning."""
    task = str(plain_group(task_cfg).get("name"))
    if not is_glue_task(task):
        raise glue.DataError(
            f"task '{task}' has no text-to-text GLUE format; choose one of: {', '.join(text_to_text.FIELDS)}"
        )
    splits = glue.load_glue(task_cfg, data_dir, protocol, split_seed, allow_hub, text_to_text=True)
    return datasets.DatasetDict({name: as_text_to_text(task, split, add_prefix) for name, split in splits.items()})


def as_text_to_text(task: str, split: datasets.Dataset, add_prefix: bool = False) -> datasets.Dataset:
    """One GLUE split (text_a[, text_b], label) as source, target and label (text_to_text's format)."""
    fields = [f for f in glue.TEXT_FIELDS if f in split.column_names]
    rows = zip(*(split[f] for f in fields))
    return datasets.Dataset.from_dict(
        {
            SOURCE: [text_to_text.source_text(task, texts, add_prefix) for texts in rows],
            TARGET: [text_to_text.target_text(task, label) for label in split["label"]],
            "label": list(split["label"]),
        },
        features=datasets.Features(
            {SOURCE: datasets.Value("string"), TARGET: datasets.Value("string"), "label": split.features["label"]}
        ),
    )


def text_to_text_splits(
    task_cfg: Mapping[str, Any],
    data_dir: str | os.PathLike | None,
    protocol: str = "split",
    split_seed: int = 42,
    allow_hub: bool = True,
    add_prefix: bool = False,
) -> datasets.DatasetDict:
    """Any text-to-text task's splits with source and target: GLUE (glue_text_to_text) or a generation task
    (generation_tasks.load_generation_task: `protocol` is GLUE's; `split_seed` draws its validation_size rows)."""
    task = str(plain_group(task_cfg).get("name"))
    if is_glue_task(task):
        return glue_text_to_text(task_cfg, data_dir, protocol, split_seed, allow_hub, add_prefix)
    return generation_tasks.load_generation_task(task_cfg, data_dir, allow_hub, add_prefix, split_seed)


def tokenise(split: datasets.Dataset, tokenizer, max_source_length: int, max_target_length: int) -> datasets.Dataset:
    """A split's rows tokenised once (datasets.map, batched), unpadded: input_ids (source, truncated to
    max_source_length) and labels (target, truncated to max_target_length; a pad id in them becomes LABEL_PAD). The
    target text (and a GLUE row's label) stay for scoring."""
    pad = _pad_id(tokenizer)

    def encode(rows: dict) -> dict:
        inputs = tokenizer(rows[SOURCE], truncation=True, max_length=max_source_length)["input_ids"]
        labels = tokenizer(text_target=rows[TARGET], truncation=True, max_length=max_target_length)["input_ids"]
        return {"input_ids": inputs, "labels": [[LABEL_PAD if t == pad else t for t in ids] for ids in labels]}

    bars = not datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()  # no "Map: 100%" bar in every run's log
    try:
        return split.map(encode, batched=True, keep_in_memory=True, remove_columns=[SOURCE])
    finally:
        if bars:
            datasets.utils.enable_progress_bars()


def tokenise_splits(
    splits: Mapping[str, datasets.Dataset], tokenizer, settings: TextToTextSettings
) -> datasets.DatasetDict:
    """Every split tokenised once (tokenise): sources to settings.max_source_length, labels to the split's own
    max_target_length (XSum: 64 to train, 128 scored on test)."""
    return datasets.DatasetDict(
        {
            name: tokenise(split, tokenizer, settings.max_source_length, settings.max_target_length[name])
            for name, split in splits.items()
        }
    )


class Seq2SeqCollator:
    """Pads tokenised rows into one batch, to its longest row: input_ids with the tokenizer's pad id (on its
    padding_side) and an attention_mask, labels on the right with LABEL_PAD. With `with_targets` the batch also
    carries the rows' target strings as a list ("targets"), what evaluation scores against."""

    def __init__(self, tokenizer, with_targets: bool = False):
        self.pad, self.left = _pad_id(tokenizer), tokenizer.padding_side == "left"
        self.with_targets = with_targets

    def __call__(self, rows: list[dict]) -> dict[str, Any]:
        longest = max(len(row["input_ids"]) for row in rows)
        ids, mask = [], []
        for row in rows:
            n, padding = len(row["input_ids"]), longest - len(row["input_ids"])
            ids.append(
                [self.pad] * padding + row["input_ids"] if self.left else row["input_ids"] + [self.pad] * padding
            )
            mask.append([0] * padding + [1] * n if self.left else [1] * n + [0] * padding)
        batch: dict[str, Any] = {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "attention_mask": torch.tensor(mask, dtype=torch.long),
        }
        if "labels" in rows[0]:
            longest = max(len(row["labels"]) for row in rows)
            labels = [row["labels"] + [LABEL_PAD] * (longest - len(row["labels"])) for row in rows]
            batch["labels"] = torch.tensor(labels, dtype=torch.long)
        if self.with_targets:
            batch["targets"] = [row[TARGET] for row in rows]
        return batch


def make_loader(
    split: datasets.Dataset,
    tokenizer,
    max_source_length: int,
    max_target_length: int,
    batch_size: int,
    with_targets: bool = False,
) -> DataLoader:
    """A text split's batches in order, tokenised once here: what evaluate_generation scores (against the decoded
    labels, as the reference; with_targets: against the target strings)."""
    return DataLoader(
        tokenise(split, tokenizer, max_source_length, max_target_length),
        batch_size=batch_size,
        collate_fn=Seq2SeqCollator(tokenizer, with_targets),
    )


def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is None:
        raise ValueError(f"the tokenizer {type(tokenizer).__name__} has no pad token; text-to-text batches need one")
    return int(tokenizer.pad_token_id)
