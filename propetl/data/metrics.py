"""GLUE metrics (scikit-learn / scipy) and the paper's aggregate scores. Every metric is a fraction (accuracy 0.76,
not 76); tables multiply by 100."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from propetl.data.tasks import in_paper_average, in_task_order, known_task_configs

CLASSIFICATION = {"accuracy": accuracy_score, "f1": f1_score, "matthews": matthews_corrcoef}
CORRELATIONS = {"pearson": pearsonr, "spearman": spearmanr}
METRICS = (*CLASSIFICATION, *CORRELATIONS)


def metrics_for(num_labels: int) -> tuple[str, ...]:
    """The metrics a task of `num_labels` can report: correlations for regression (1), f1 for two classes only."""
    if num_labels == 1:
        return ("pearson", "spearman")
    return ("accuracy", "f1", "matthews") if num_labels == 2 else ("accuracy", "matthews")


def selections_for(names: Sequence[str]) -> tuple[str, ...]:
    """What a task with metrics `names` may select its best epoch by: one, or `combined` (their mean) if several."""
    return (*names, "combined") if len(names) > 1 else tuple(names)


def predictions_from_logits(logits: np.ndarray, num_labels: int) -> np.ndarray:
    """Class ids (argmax) for classification; the single output for regression."""
    logits = np.asarray(logits)
    return logits.reshape(-1) if num_labels == 1 else logits.argmax(axis=-1)


def compute(names: Sequence[str], predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The named metrics, plus `combined` (their mean) when there are several."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    out: dict[str, float] = {}
    for name in names:
        if name in CLASSIFICATION:
            out[name] = float(CLASSIFICATION[name](labels, predictions))
        elif name in CORRELATIONS:
            with warnings.catch_warnings():  # constant predictions: undefined, counted as 0
                warnings.simplefilter("ignore")
                value = CORRELATIONS[name](predictions, labels)[0]
                out[name] = 0.0 if not np.isfinite(value) else float(value)
        else:
            raise ValueError(f"metric {name!r} is not one of: {', '.join(METRICS)}")
    if len(names) > 1:
        out["combined"] = float(np.mean([out[n] for n in names]))
    return out


def trivial_baseline(
    task: str, names: Sequence[str], train_labels: Sequence, test_labels: Sequence, regression: bool
) -> dict:
    """Where chance is: the test metrics of always answering the train split's majority class (classification) or mean
    score (regression: a constant has no correlation, Pearson/Spearman count as 0). From the labels, never trained."""
    train, test_array = np.asarray(train_labels), np.asarray(test_labels)
    if regression:
        constant, rule = float(train.mean()), f"mean train score {float(train.mean()):.3f}"
    else:
        values, counts = np.unique(train, return_counts=True)
        constant = values[counts.argmax()]
        rule = f"majority class {int(constant)} of train ({counts.max() / counts.sum():.1%})"
    test = compute(names, np.full(len(test_array), constant), test_array)
    return {"rule": rule, "test": test, "glue_score": task_score(task, test)}


def selection_score(metrics: Mapping[str, float], selection_metric: str) -> float:
    """The number the best epoch is chosen by (the reference's metric_for_best_model)."""
    return float(metrics[selection_metric])


def task_numbers(task: str, metrics: Iterable[str] = ()) -> tuple[str, ...]:
    """The numbers a task reports, in order: its yaml's `metrics` (tasks.known_task_configs); for a task no yaml on the
    search path describes, the METRICS among `metrics` (a run's test metrics)."""
    config = known_task_configs().get(task)
    return tuple(config.metrics) if config is not None else tuple(name for name in METRICS if name in metrics)


def task_score(task: str, metrics: Mapping[str, float]) -> float:
    """A run's GLUE score: the mean of its task's numbers (task_numbers)."""
    return float(np.mean([metrics[n] for n in task_numbers(task, metrics)]))


def glue_numbers(per_task: Mapping[str, Mapping[str, float]]) -> list[float]:
    """The numbers of the paper's average among the tasks given, in table order (11 when GLUE's eight are present)."""
    return [per_task[task][n] for task in in_task_order(per_task) if in_paper_average(task) for n in task_numbers(task)]


def glue_average(per_task: Mapping[str, Mapping[str, float]]) -> float:
    """The paper's average: the mean of glue_numbers."""
    numbers = glue_numbers(per_task)
    if not numbers:
        raise ValueError(f"glue_average needs a task of the paper's average; got: {', '.join(per_task)}")
    return float(np.mean(numbers))
