"""W&B as its users run it (issue 27): W&B's environment variables win over the logger config where set
(WANDB_MODE, WANDB_PROJECT, WANDB_ENTITY, WANDB_RUN_GROUP), `disabled` from either side wins, an unknown WANDB_MODE is
one line before anything runs, a disabled run leaves no W&B folder, a sweep's jobs share a group, and the summary holds
the best epoch's selection figures and `best_epoch`."""
from __future__ import annotations

import pytest
from conftest import compose_cfg, tiny_text_overrides

from propetl.configs import ConfigError
from propetl.run import log
from propetl.run.lifecycle import begin_run
from propetl.run.train import train
from propetl.validate import validate


def test_environment_variables_win_over_the_logger_config():
    cfg = compose_cfg(["logger.mode=offline", "logger.project=mine", "logger.group=g"])
    assert log.wandb_settings(cfg, environ={}) == {"mode": "offline", "project": "mine", "entity": None, "group": "g"}
    environ = {"WANDB_MODE": "online", "WANDB_PROJECT": "theirs", "WANDB_ENTITY": "team", "WANDB_RUN_GROUP": "sweep1"}
    assert log.wandb_settings(cfg, environ=environ) == {"mode": "online", "project": "theirs", "entity": "team",
                                                       "group": "sweep1"}


@pytest.mark.parametrize("config_mode, environment_mode", [("disabled", "online"), ("online", "disabled")])
def test_disabled_on_either_side_wins(config_mode, environment_mode):
    cfg = compose_cfg([f"logger.mode={config_mode}"])
    assert log.wandb_settings(cfg, environ={"WANDB_MODE": environment_mode})["mode"] == "disabled"


def test_an_unknown_wandb_mode_is_one_line_before_anything_runs(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "onlin")
    cfg = compose_cfg(["task=rte"])
    validate(cfg)  # the run layer checks W&B's settings: validate.py imports nothing of it
    with pytest.raises(ConfigError) as refused:
        begin_run(cfg, tmp_path / "run")
    assert str(refused.value) == "WANDB_MODE='onlin' (environment) is invalid; allowed: online, offline, disabled"
    assert not (tmp_path / "run").exists()


class RecordingRun:
    id = "recording"

    def __init__(self):
        self.summary, self.logged = {}, []

    def log(self, record, step=None):
        self.logged.append(record)


@pytest.mark.slow
def test_the_summary_holds_the_best_epoch_and_a_disabled_run_leaves_no_wandb_folder(tmp_path, tiny_text_model_dir,
                                                                                    glue_dir, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.chdir(tmp_path)
    overrides = [*tiny_text_overrides(tiny_text_model_dir, glue_dir), "task=rte", "method=propetl", "prototype=lora",
                 "data.max_train_examples=32", "trainer.epochs=3", "logger.mode=offline"]     # the environment wins
    train(compose_cfg(overrides), tmp_path / "real")
    assert not list(tmp_path.rglob("wandb")) and not list(tmp_path.rglob("*.wandb"))

    recorded = RecordingRun()
    monkeypatch.setattr(log, "start_wandb", lambda *args, **kwargs: recorded)
    metrics = train(compose_cfg(overrides), tmp_path / "recorded")
    epochs = [r for r in recorded.logged if "epoch" in r]
    assert len(epochs) == 3 and recorded.summary["best_epoch"] == metrics["best_epoch"]
    best = epochs[metrics["best_epoch"] - 1]
    assert {k: v for k, v in recorded.summary.items() if k.startswith("select/")} == \
        {k: v for k, v in best.items() if k.startswith("select/")} == \
        {f"select/{k}": v for k, v in metrics["selection"].items()}
