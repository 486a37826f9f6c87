"""GLUE as text to text, as the reference's T5 code does it (propetl-t5/data/tasks.py; ../shared/paper.md §2.3, §5.3).
Input: each text after its field word (FIELDS: "sentence1: A sentence2: B", "sentence: A", QNLI "question: Q
sentence: S", QQP "question1: A question2: B", MNLI "premise: P hypothesis H": the reference's MNLI writes "hypothesis"
without a colon), the task name in front only with add_prefix=True. Target: the label id as text; STS-B
`str(np.round((label * 5) / 5, decimals=1))`, i.e. ONE DECIMAL as the reference's code does (not the 0.2 steps its
docstring promises).
Scoring (§5.3, invalid generations counted wrong), as the reference's post-processors (HyperFormer's
data/postprocessors.py): STS-B's stripped text becomes a float; CoLA's, MRPC's and QQP's an int; RTE's, SST-2's, QNLI's
and MNLI's the label it spells exactly (no post-processor: the strings are compared); what does not convert is
INVALID (-1). Accuracy counts it wrong, F1 as the opposite of its target, Matthews as a class
of its own; Pearson/Spearman take -1.0 (a constant prediction's undefined correlation counts 0).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from propetl.data import metrics, tasks

INVALID = -1  # what an unreadable generation scores as (the reference's string_to_int/string_to_float default)
FIELDS = {  # the words before each text, as the reference writes them
    "cola": ("sentence:",),
    "sst2": ("sentence:",),
    "mrpc": ("sentence1:", "sentence2:"),
    "rte": ("sentence1:", "sentence2:"),
    "stsb": ("sentence1:", "sentence2:"),
    "qqp": ("question1:", "question2:"),
    "mnli": ("premise:", "hypothesis"),  # no colon: propetl-t5/data/tasks.py's MNLITaskDataset writes it so
    "qnli": ("question:", "sentence:"),
}
EXACT_LABELS = {  # tasks scored on the string itself (no post-processor)
    "rte": ("0", "1"),
    "sst2": ("0", "1"),
    "mnli": ("0", "1", "2"),
    "qnli": ("0", "1"),
}


def source_text(task: str, texts: Sequence[str], add_prefix: bool = False) -> str:
    """The encoder's input: each text after its field word, the task name in front when `add_prefix`."""
    fields = _fields(task)
    if len(texts) != len(fields):
        raise ValueError(f"task {task!r} takes {len(fields)} text(s), got {len(texts)}")
    words = [word for pair in zip(fields, texts) for word in pair]
    return " ".join([task, *words] if add_prefix else words)


def target_text(task: str, label: float) -> str:
    """The decoder's target: the label id as text; STS-B's score rounded as the reference rounds it."""
    _fields(task)
    return str(np.round((label * 5) / 5, decimals=1)) if task == "stsb" else str(int(label))


def parse_prediction(task: str, text: str) -> float:
    """A generated string as the label the metrics see, INVALID when it names none (see the module's docstring)."""
    _fields(task)
    text = text.strip()
    if task in EXACT_LABELS:
        return EXACT_LABELS[task].index(text) if text in EXACT_LABELS[task] else INVALID
    try:
        return float(text) if task == "stsb" else int(text)
    except ValueError:
        return INVALID


def score(task: str, generated: Sequence[str], targets: Sequence[str]) -> dict[str, float]:
    """The task's metrics (its yaml's `metrics`, fractions) of generated strings against target strings."""
    predictions = np.array([parse_prediction(task, t) for t in generated])
    labels = np.array([parse_prediction(task, t) for t in targets])
    names = tuple(tasks.known_task_configs()[task].metrics)
    if "f1" in names:  # f1_score_with_invalid: not 0 or 1 is the opposite of the target (accuracy: wrong either way)
        invalid = (predictions != 0) & (predictions != 1)
        predictions = np.where(invalid, 1 - labels, predictions)
    return metrics.compute(names, predictions, labels)


def _fields(task: str) -> tuple[str, ...]:
    if task not in FIELDS:
        raise ValueError(f"task {task!r} has no text-to-text format; choose one of: {', '.join(FIELDS)}")
    return FIELDS[task]
