"""Text-to-text GLUE (the reference's T5 formatting) and generation metrics against the packages run directly."""

import json
import pathlib

import numpy as np
import pytest
from scipy.stats import pearsonr
from sklearn.metrics import matthews_corrcoef

from propetl.data import generation_metrics, text_to_text

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
CLASS_TASKS = {"cola": 2, "mrpc": 2, "rte": 2, "sst2": 2, "qqp": 2, "qnli": 2, "mnli": 3}  # task -> its classes


def test_inputs_as_the_reference_writes_them():
    assert text_to_text.source_text("rte", ["A cat sat.", "A cat is sitting."]) == (
        "sentence1: A cat sat. sentence2: A cat is sitting."
    )
    assert text_to_text.source_text("sst2", ["Great film."]) == "sentence: Great film."
    assert text_to_text.source_text("cola", ["Him left."], add_prefix=True) == "cola sentence: Him left."
    with pytest.raises(ValueError, match="takes 2 text"):
        text_to_text.source_text("mrpc", ["only one"])


def test_qnli_qqp_mnli_inputs_as_the_reference_writes_them():
    """propetl-t5/data/tasks.py: QNLITaskDataset, QQPTaskDataset, MNLITaskDataset ("hypothesis" with no colon)."""
    assert text_to_text.source_text("qnli", ["Who?", "Him."]) == "question: Who? sentence: Him."
    assert text_to_text.source_text("qqp", ["Why?", "How?"]) == "question1: Why? question2: How?"
    assert text_to_text.source_text("mnli", ["A cat sat.", "A cat."]) == "premise: A cat sat. hypothesis A cat."
    assert text_to_text.source_text("mnli", ["P", "H"], add_prefix=True) == "mnli premise: P hypothesis H"
    with pytest.raises(ValueError, match="task 'qnli' takes 2 text"):
        text_to_text.source_text("qnli", ["only one"])


@pytest.mark.parametrize("task", CLASS_TASKS)
def test_every_class_label_round_trips(task):
    for label in range(CLASS_TASKS[task]):
        assert text_to_text.target_text(task, label) == str(label)
        assert text_to_text.parse_prediction(task, text_to_text.target_text(task, label)) == label


def test_every_stsb_score_round_trips_to_its_rounded_value():
    for score in np.arange(0, 5001) / 1000:  # 0.000 ... 5.000
        text = text_to_text.target_text("stsb", float(score))
        assert text_to_text.parse_prediction("stsb", text) == float(np.round(score, 1))
        assert len(text.split(".")[1]) == 1  # one decimal, as str(np.round(..., 1)) writes it


@pytest.mark.parametrize(
    "score, text",
    # the reference's np.round((x * 5) / 5, decimals=1): one decimal (T5's 0.2 steps would give 3.2, 2.4, 1.0)
    [
        (0.0, "0.0"),
        (5.0, "5.0"),
        (3.14, "3.1"),
        (3.15, "3.2"),
        (2.25, "2.2"),
        (2.35, "2.4"),
        (1.05, "1.0"),
        (4.999, "5.0"),
        (float(np.float32(3.8)), "3.8"),
    ],
)
def test_stsb_rounding_by_hand(score, text):
    assert text_to_text.target_text("stsb", score) == text


def test_unknown_task_names_the_choices():
    choices = "cola, sst2, mrpc, rte, stsb, qqp, mnli, qnli"
    with pytest.raises(ValueError, match=f"'wnli' has no text-to-text format; choose one of: {choices}"):
        text_to_text.target_text("wnli", 1)


@pytest.mark.parametrize(
    "task, text",
    [("rte", "1.0"), ("sst2", "positive"), ("cola", "yes"), ("mrpc", ""), ("stsb", "three"), ("qqp", "1.0"),
     ("qqp", "duplicate"), ("qnli", "01"), ("qnli", "entailment"), ("mnli", "3"), ("mnli", "2.0"), ("mnli", "")],
)
def test_unreadable_generations_are_invalid(task, text):
    assert text_to_text.parse_prediction(task, text) == text_to_text.INVALID


def test_invalid_counts_wrong_in_accuracy():
    out = text_to_text.score("rte", ["0", "1", "yes", "1.0"], ["0", "1", "1", "1"])
    assert out["accuracy"] == pytest.approx(0.5)  # RTE compares strings: "1.0" is not "1"


@pytest.mark.parametrize("task, text, label", [("qqp", "01", 1), ("qqp", " 0 ", 0), ("mnli", " 2", 2), ("qnli", "1 ", 1)])
def test_qqp_parses_an_int_and_qnli_mnli_compare_the_stripped_string(task, text, label):
    """The reference's post-processors: QQP's string_to_int ("01" is 1), none for QNLI and MNLI (exact strings)."""
    assert text_to_text.parse_prediction(task, text) == label


def test_mnli_accuracy_counts_invalid_generations_wrong():
    out = text_to_text.score("mnli", ["0", "1", "2", "3", "2.0", "neutral"], ["0", "1", "2", "2", "2", "1"])
    assert out == {"accuracy": pytest.approx(0.5)}
    assert text_to_text.score("qnli", ["1", "01", "0"], ["1", "1", "0"]) == {"accuracy": pytest.approx(2 / 3)}


def test_qqp_f1_counts_invalid_generations_wrong_as_mrpc():
    generated, targets = ["1", "0", "maybe", "2", "1.0", "01"], ["1", "0", "1", "0", "0", "1"]
    out = text_to_text.score("qqp", generated, targets)
    # as [1, 0, 0, 1, 1, 1]: TP 2, FP 2, FN 1 -> F1 4/7; accuracy 3/6
    assert out["f1"] == pytest.approx(4 / 7) and out["accuracy"] == pytest.approx(0.5)
    assert out == text_to_text.score("mrpc", generated, targets)


def test_invalid_is_the_opposite_of_the_target_in_f1():
    out = text_to_text.score("mrpc", ["1", "0", "maybe", "2"], ["1", "0", "1", "0"])
    # as [1, 0, 0, 1]: TP 1, FP 1, FN 1 -> F1 1/2; accuracy 2/4 either way
    assert out["f1"] == pytest.approx(0.5)
    assert out["accuracy"] == pytest.approx(0.5)


def test_invalid_is_a_class_of_its_own_in_matthews():
    out = text_to_text.score("cola", ["1", "0", "x", "0", "1"], ["1", "0", "1", "0", "0"])
    assert out["matthews"] == pytest.approx(matthews_corrcoef([1, 0, 1, 0, 0], [1, 0, -1, 0, 1]))


def test_invalid_scores_minus_one_in_correlations():
    out = text_to_text.score("stsb", ["1.0", "2.0", "oops", "4.0"], ["1.0", "2.0", "3.0", "4.0"])
    assert out["pearson"] == pytest.approx(pearsonr([1.0, 2.0, -1.0, 4.0], [1.0, 2.0, 3.0, 4.0])[0])
    assert out["pearson"] < 0.9 and out["spearman"] == pytest.approx(0.4)


def _rows(name):
    return [json.loads(line) for line in (FIXTURES / name).read_text(encoding="utf-8").splitlines()]


def test_rouge_equals_rouge_score_run_directly():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")  # the extra t5 (make install has it)
    rows = _rows("xsum_tiny.jsonl")
    predictions, references = [r["document"].split(". ")[0] for r in rows], [r["summary"] for r in rows]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    direct = [scorer.score(ref, pred) for pred, ref in zip(predictions, references)]
    out = generation_metrics.rouge(predictions, references)
    for key in generation_metrics.ROUGE_KEYS:
        assert out[key] == pytest.approx(100 * np.mean([s[key].fmeasure for s in direct]))
    assert 0 < out["rouge2"] < out["rouge1"] < 100


def test_rouge_by_hand():
    pytest.importorskip("rouge_score")
    assert generation_metrics.rouge(["the cats sat"], ["the cats sat"])["rougeL"] == pytest.approx(100)
    assert generation_metrics.rouge(["dogs ran"], ["a bird flew"])["rouge1"] == 0
    assert generation_metrics.rouge(["the cat sits"], ["the cats sitting"])["rouge1"] == pytest.approx(100)  # stems
    swapped = generation_metrics.rouge(["c d\na b"], ["a b\nc d"])  # rougeLsum: LCS sentence by sentence (lines)
    assert swapped["rougeLsum"] == pytest.approx(100) and swapped["rougeL"] == pytest.approx(50)


def test_bleu_equals_sacrebleu_run_directly():
    sacrebleu = pytest.importorskip("sacrebleu")
    rows = _rows("wmt16_ro_en_tiny.jsonl")
    references = [r["en"] for r in rows]
    predictions = ["The house is large.", "The cat sleeps on the bed.", *references[2:]]
    expected = sacrebleu.corpus_bleu(predictions, [references]).score
    assert generation_metrics.bleu(predictions, references) == pytest.approx(expected)
    assert 0 < expected < 100
    assert generation_metrics.bleu(references, references) == pytest.approx(100)
    assert generation_metrics.bleu(["zzz qqq www vvv"], ["the house is big"]) == 0


def test_missing_package_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "sacrebleu", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"pip install 'propetl\[t5\]'"):
        generation_metrics.bleu(["a"], ["a"])
