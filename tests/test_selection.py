"""Best-epoch selection: trainer.selection_skips_warmup passes over epochs that end inside the warm-up (the gpu
profile sets it: on RTE's 138-example selection split a barely trained warm-up epoch won 19 of 21 runs by a tie),
the last epoch always stays selectable, and without the switch the best score wins wherever it falls."""
from __future__ import annotations

import pytest
import torch
from conftest import compose_cfg, tiny_fit_inputs, tiny_text_overrides

from propetl.models import backbone
from propetl.run import loop


def fit_with_scores(tiny_text_model_dir, glue_dir, scores: list[float], *overrides: str) -> loop.FitResult:
    """Four epochs of two steps each on 16 rows, the selection score of epoch i being scores[i]."""
    cfg = compose_cfg([*tiny_text_overrides(tiny_text_model_dir, glue_dir), "task=rte", "method=propetl", "prototype=lora", "trainer.epochs=4",
                       "trainer.batch_size=8",
                       "trainer.progress=false", *overrides])
    model, loader = tiny_fit_inputs(cfg, 8)
    epoch_scores = iter(scores)

    def select(model):
        score = next(epoch_scores)
        return {"score": score}, score
    return loop.fit(model, loader, select, cfg, backbone.head_parameter_names(model), torch.device("cpu"))


@pytest.mark.parametrize("warmup_ratio, scores, expected", [
    (0.5, [0.9, 0.5, 0.6, 0.7], 4),     # warm-up 4 of 8 steps: epochs 1-2 end inside it (step 2, step 4)
    (0.5, [0.9, 0.9, 0.6, 0.6], 3),     # a tie after the warm-up: the earlier epoch, as without the switch
    (0.3, [0.9, 0.8, 0.6, 0.7], 2),     # warm-up 3 steps: epoch 2 (step 4) is past it
    (1.0, [0.9, 0.5, 0.6, 0.7], 4),     # the warm-up is the whole run: only the last epoch is selectable
])
def test_selection_skips_epochs_that_end_inside_the_warmup(tiny_text_model_dir, glue_dir, warmup_ratio, scores,
                                                          expected):
    result = fit_with_scores(tiny_text_model_dir, glue_dir, scores, f"trainer.warmup_ratio={warmup_ratio}",
                             "trainer.selection_skips_warmup=true")
    assert result.best_epoch == expected and result.best_score == scores[expected - 1]
    assert result.best_state is not None


def test_without_the_switch_the_best_score_wins_even_in_the_warmup(tiny_text_model_dir, glue_dir):
    result = fit_with_scores(tiny_text_model_dir, glue_dir, [0.9, 0.5, 0.6, 0.7], "trainer.warmup_ratio=0.5")
    assert result.best_epoch == 1 and result.best_score == 0.9


def test_the_switch_takes_true_or_false_only(tiny_text_model_dir, glue_dir):
    from propetl.configs import ConfigError  # the trainer group's schema refuses it as the config is composed
    with pytest.raises(ConfigError, match="trainer.selection_skips_warmup='maybe' is invalid; allowed: true or false"):
        compose_cfg([*tiny_text_overrides(tiny_text_model_dir, glue_dir), "trainer.selection_skips_warmup=maybe"])


def test_the_gpu_profile_skips_warmup_epochs_and_trains_heads_at_1e_3():
    cfg = compose_cfg(["profile=gpu"])
    assert cfg.trainer.selection_skips_warmup is True and cfg.trainer.head_lr == pytest.approx(1e-3)
