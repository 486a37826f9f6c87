"""Generation-based evaluation (the reference's predict_with_generate): generate for every batch, decode with
skip_special_tokens, score the strings. GLUE tasks are parsed and scored by text_to_text (the encoder path's metric
names; invalid generations as the reference counts them); XSum by ROUGE, WMT16 by sacreBLEU (generation_metrics).
Every metric is a fraction, as data/metrics.py's (ROUGE 0.35, not 35; tables multiply by 100), with `combined`
(their mean) when a task has several. The checkpoint is selected by `average_metrics`: the mean of every metric of
every task (paper.md §5.2). Any model with generate(input_ids=, attention_mask=, num_beams=, max_new_tokens=)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from propetl.data import generation_metrics, tasks, text_to_text
from propetl.data.seq2seq import LABEL_PAD, is_glue_task

GENERATION_METRICS = (*generation_metrics.ROUGE_KEYS, "bleu")


def generate_texts(
    model,
    loader: Iterable[Mapping[str, Any]],
    tokenizer,
    num_beams: int,
    max_new_tokens: int,
    device: torch.device | str | None = None,
    **generate_kwargs,
) -> tuple[list[str], list[str]]:
    """(generated, references) over the loader's batches, in order, stripped. References: the batch's labels decoded
    (LABEL_PAD dropped), as the reference scores them: truncated to the split's target length and through the
    tokenizer; or, when the batch has them (Seq2SeqCollator with_targets), the untouched target strings. The model
    is put in eval mode and back; `device`: where the batches go (None: the model's parameters' device, else CPU)."""
    device = torch.device(device) if device is not None else _device(model)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    generated: list[str] = []
    references: list[str] = []
    try:
        with torch.no_grad():
            for batch in loader:
                output = model.generate(
                    input_ids=batch["input_ids"].to(device),
                    attention_mask=batch["attention_mask"].to(device),
                    num_beams=num_beams,
                    max_new_tokens=max_new_tokens,
                    **generate_kwargs,
                )
                texts = tokenizer.batch_decode(_token_ids(output), skip_special_tokens=True)
                targets = batch["targets"] if "targets" in batch else _decode_labels(batch["labels"], tokenizer)
                generated += [text.strip() for text in texts]
                references += [text.strip() for text in targets]
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    return generated, references


def score_generations(task: str, generated: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """The task's metrics (its yaml's `metrics`, fractions, `combined` when several) of generated strings."""
    if is_glue_task(task):
        return text_to_text.score(task, generated, references)
    config = tasks.known_task_configs().get(task)
    if config is None:
        raise ValueError(f"task {task!r} has no task yaml; known: {', '.join(tasks.known_task_configs())}")
    names = [str(name) for name in config.metrics]
    unknown = [name for name in names if name not in GENERATION_METRICS]
    if unknown:
        raise ValueError(f"task {task}: metric {unknown[0]!r} is not one of: {', '.join(GENERATION_METRICS)}")
    out: dict[str, float] = {}
    if any(name in generation_metrics.ROUGE_KEYS for name in names):
        rouge = generation_metrics.rouge(generated, references)
        out |= {name: rouge[name] / 100 for name in names if name in rouge}
    if "bleu" in names:
        out["bleu"] = generation_metrics.bleu(generated, references) / 100
    out = {name: out[name] for name in names}
    if len(names) > 1:
        out["combined"] = float(np.mean(list(out.values())))
    return out


def evaluate_generation(
    model,
    loader: Iterable[Mapping[str, Any]],
    tokenizer,
    task: str,
    num_beams: int,
    max_new_tokens: int,
    device: torch.device | str | None = None,
    **generate_kwargs,
) -> dict[str, float]:
    """A task's metrics from the model's generations over the loader (generate_texts, then score_generations)."""
    generated, references = generate_texts(
        model, loader, tokenizer, num_beams, max_new_tokens, device, **generate_kwargs
    )
    return score_generations(task, generated, references)


def average_metrics(per_task: Mapping[str, Mapping[str, float]]) -> float:
    """The selection score: the mean of every metric of every task (the reference's average_metrics); a task's
    `combined`, itself a mean of its metrics, is not counted again. (The reference's mean also takes XSum's and
    WMT16's gen_len, the mean generated length, which is no metric; it is left out here.)"""
    values = [float(v) for metrics in per_task.values() for name, v in metrics.items() if name != "combined"]
    if not values:
        raise ValueError("average_metrics needs at least one task's metrics")
    return float(np.mean(values))


def _device(model) -> torch.device:
    parameters = getattr(model, "parameters", None)
    if callable(parameters):
        for parameter in parameters():
            return parameter.device
    return torch.device("cpu")


def _token_ids(output) -> torch.Tensor:
    """generate's token ids: a tensor, or the `sequences` of a generate output object."""
    return output if isinstance(output, torch.Tensor) else output.sequences


def _decode_labels(labels: torch.Tensor, tokenizer) -> list[str]:
    ids = torch.where(labels == LABEL_PAD, torch.full_like(labels, tokenizer.pad_token_id), labels)
    return tokenizer.batch_decode(ids, skip_special_tokens=True)
