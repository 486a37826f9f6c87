"""Metrics against values computed by hand."""
import math

import numpy as np
import pytest

from propetl.data import metrics, tasks


def test_accuracy_f1_by_hand():
    labels = np.array([1, 1, 0, 0, 1])
    predictions = np.array([1, 0, 0, 1, 1])
    out = metrics.compute(["accuracy", "f1"], predictions, labels)
    # TP=2, FP=1, FN=1: precision 2/3, recall 2/3, F1 2/3; accuracy 3/5
    assert out["accuracy"] == pytest.approx(0.6)
    assert out["f1"] == pytest.approx(2 / 3)
    assert out["combined"] == pytest.approx((0.6 + 2 / 3) / 2)


def test_matthews_by_hand():
    labels = np.array([1, 1, 0, 0, 1])
    predictions = np.array([1, 0, 0, 1, 1])
    tp, tn, fp, fn = 2, 1, 1, 1
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert metrics.compute(["matthews"], predictions, labels)["matthews"] == pytest.approx(expected)  # 1/6


def test_pearson_spearman_by_hand():
    labels = np.array([1.0, 2.0, 3.0, 4.0])
    predictions = np.array([1.0, 3.0, 2.0, 4.0])
    out = metrics.compute(["pearson", "spearman"], predictions, labels)
    # centred: x = (-1.5, -.5, .5, 1.5), y = (-1.5, .5, -.5, 1.5): sum xy = 4, sum x^2 = sum y^2 = 5
    assert out["pearson"] == pytest.approx(0.8)
    assert out["spearman"] == pytest.approx(0.8)                 # ranks equal the values here
    assert out["combined"] == pytest.approx(0.8)


def test_constant_prediction_correlation_is_zero():
    assert metrics.compute(["pearson"], np.ones(4), np.arange(4.0))["pearson"] == 0.0


def test_predictions_from_logits():
    assert metrics.predictions_from_logits(np.array([[0.1, 0.9], [2.0, -1.0]]), 2).tolist() == [1, 0]
    assert metrics.predictions_from_logits(np.array([[0.5], [3.0]]), 1).tolist() == [0.5, 3.0]


def test_glue_average_is_the_mean_of_eleven_numbers():
    """The paper's README row for ProPETL-Adapter: its 11 numbers average to 86.6."""
    row = {
        "cola": {"matthews": 65.43}, "sst2": {"accuracy": 94.15}, "mrpc": {"accuracy": 88.24, "f1": 91.41},
        "qqp": {"accuracy": 89.40, "f1": 86.04}, "stsb": {"pearson": 91.34, "spearman": 90.95},
        "mnli": {"accuracy": 86.53}, "qnli": {"accuracy": 92.58}, "rte": {"accuracy": 76.50},
    }
    numbers = [65.43, 94.15, 88.24, 91.41, 89.40, 86.04, 91.34, 90.95, 86.53, 92.58, 76.50]
    assert metrics.glue_average(row) == pytest.approx(sum(numbers) / 11)
    assert round(metrics.glue_average(row), 1) == 86.6


def test_the_task_yamls_give_table_order_and_the_paper_s_eleven_numbers():
    known = list(tasks.known_task_configs())
    assert known == ["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "xsum", "wmt16_ro_en"]  # Table 1's, T5's
    assert tasks.encoder_tasks() == known[:8]  # XSum and WMT16 are text to text only (kind: generation)
    assert tasks.paper_average_size() == 11 and metrics.task_numbers("stsb") == ("pearson", "spearman")
    assert metrics.task_numbers("mytask", {"f1": 0.8, "accuracy": 0.6, "combined": 0.7}) == ("accuracy", "f1")


def test_task_score_and_selection():
    assert metrics.task_score("mrpc", {"accuracy": 0.8, "f1": 0.9, "combined": 0.85}) == pytest.approx(0.85)
    assert metrics.task_score("cola", {"matthews": 0.4}) == 0.4
    assert metrics.task_score("mytask", {"accuracy": 0.6, "f1": 0.8, "combined": 0.7}) == pytest.approx(0.7)  # not GLUE
    assert metrics.selection_score({"accuracy": 0.8, "f1": 0.9, "combined": 0.85}, "combined") == 0.85
    with pytest.raises(ValueError, match="not one of"):
        metrics.compute(["bleu"], np.zeros(2), np.zeros(2))


def test_trivial_baseline_majority_class_by_hand():
    """Train majority is class 1 (3 of 5); on a test split of 4 with two 1s it scores 0.5 accuracy, F1 2/3."""
    out = metrics.trivial_baseline("mrpc", ["accuracy", "f1"], [1, 1, 0, 1, 0], [1, 0, 0, 1], regression=False)
    assert out["rule"].startswith("majority class 1")
    assert out["test"]["accuracy"] == pytest.approx(0.5)
    assert out["test"]["f1"] == pytest.approx(2 / 3)            # precision 1/2, recall 1
    assert out["glue_score"] == pytest.approx((0.5 + 2 / 3) / 2)
    cola = metrics.trivial_baseline("cola", ["matthews"], [0, 0, 1], [1, 0, 1], regression=False)
    assert cola["test"]["matthews"] == 0.0                       # a constant answer has no correlation


def test_trivial_baseline_mean_score_for_regression():
    out = metrics.trivial_baseline("stsb", ["pearson", "spearman"], [1.0, 2.0, 4.5], [0.5, 3.0, 5.0], regression=True)
    assert out["rule"] == "mean train score 2.500"
    assert out["test"] == {"pearson": 0.0, "spearman": 0.0, "combined": 0.0}
