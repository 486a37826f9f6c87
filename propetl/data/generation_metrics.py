"""Generation metrics of the T5 tasks (../shared/paper.md §4.3): ROUGE for XSum, corpus BLEU for WMT16 Ro->En, on
the 0-100 scale the reference reports.
ROUGE: rouge-score's F-measures with the Porter stemmer, a plain mean (not the reference's bootstrap `mid`); rougeLsum's
sentences are the texts' own lines (no punkt splitting), so split multi-sentence texts on "\\n" beforehand.
BLEU: sacrebleu.corpus_bleu, defaults, one reference. Both packages are the optional extra `t5`, imported lazily.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from types import ModuleType

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")
INSTALL_HINT = "pip install 'propetl[t5]'"


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE F-measure x 100 of each key in ROUGE_KEYS, with stemming."""
    _same_length(predictions, references)
    scorer = _optional("rouge_score.rouge_scorer", "rouge-score").RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    scores = [scorer.score(reference, prediction) for prediction, reference in zip(predictions, references)]
    return {key: 100 * sum(s[key].fmeasure for s in scores) / len(scores) for key in ROUGE_KEYS}


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus sacreBLEU (0-100) of the predictions against one reference each."""
    _same_length(predictions, references)
    return float(_optional("sacrebleu", "sacrebleu").corpus_bleu(list(predictions), [list(references)]).score)


def _optional(module: str, package: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"generation metrics need {package}, which is not installed: {INSTALL_HINT}") from None


def _same_length(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references) or not predictions:
        raise ValueError(
            f"need as many predictions as references, at least one; got {len(predictions)} and {len(references)}"
        )
