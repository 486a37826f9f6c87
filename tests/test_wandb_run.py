"""The W&B run: its name and tags say what the run is; a real offline run holds the per-step loss and
learning-rate series (read back from its .wandb file)."""
from __future__ import annotations

import os

import pytest
import wandb_file
from conftest import compose_cfg, tiny_text_overrides

from propetl.run import log
from propetl.run.train import train


@pytest.mark.parametrize("overrides,name,tags", [
    (["task=rte", "prototype=lora", "mask.sparsity=0.5"], "rte-propetl-lora-s0.5-learned-seed42",
     ["task:rte", "method:propetl", "prototype:lora", "sparsity:0.5", "mask:learned", "seed:42"]),
    (["task=mrpc", "method=petl", "seed=1", "logger.tags=[mine]"], "mrpc-petl-adapter-seed1",
     ["task:mrpc", "method:petl", "prototype:adapter", "seed:1", "mine"]),
    (["task=stsb", "method=finetune"], "stsb-finetune-seed42", ["task:stsb", "method:finetune", "seed:42"]),
    (["mode=multitask", "tasks=[rte,cola]", "prototype=prefix", "mask.kind=random", "mask.sparsity=0.9"],
     "multitask-rte-cola-propetl-prefix-s0.9-random-seed42",
     ["multitask", "task:rte", "task:cola", "method:propetl", "prototype:prefix", "sparsity:0.9", "mask:random", "seed:42"]),
])
def test_run_name_and_tags_say_what_the_run_is(overrides, name, tags):
    cfg = compose_cfg(overrides)
    assert log.run_name(cfg) == name and log.run_tags(cfg) == tags


@pytest.mark.parametrize("mode", ["single", "multitask"])
def test_offline_run_has_per_step_loss_and_learning_rates(tmp_path, monkeypatch, tiny_text_model_dir, glue_dir, mode):
    for variable in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(variable, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    tasks = ["mode=multitask", "tasks=[rte,mrpc]"] if mode == "multitask" else ["task=rte"]
    cfg = compose_cfg([*tiny_text_overrides(tiny_text_model_dir, glue_dir), *tasks, "logger.mode=offline",
                       "prototype=lora", "data.max_train_examples=48", "trainer.epochs=1", "trainer.log_every_steps=2",
                       "trainer.save_weights=false"])
    try:
        metrics = train(cfg, tmp_path / "run")
    finally:
        log.finish_wandb()
    (run_file,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    rows = wandb_file.history(run_file, until=lambda rows: any(key.startswith("select/") for row in rows for key in row))
    series = [row for row in rows if "train/loss" in row]
    assert [row["_step"] for row in series] == list(range(2, metrics["steps"] + 1, 2)) and len(series) >= 3
    assert all({"lr/prototype", "lr/mask", "lr/head"} <= set(row) for row in series)
    assert series[0]["lr/mask"] != series[0]["lr/prototype"]            # each group's own rate, not one copy
    assert len({row["lr/prototype"] for row in series}) > 1             # the schedule moves them
    assert any("select/" + ("mean" if mode == "multitask" else "accuracy") in row for row in rows)   # the epoch record too
    assert wandb_file.run_record(run_file).display_name == log.run_name(cfg)



def test_wandb_mode_disabled_in_the_environment_writes_no_wandb_run(tmp_path, tiny_text_model_dir, glue_dir):
    """W&B's own WANDB_MODE=disabled, exported as a user would, wins over the config's logger.mode=offline: the run
    leaves no W&B files. (A process of its own: wandb keeps process-wide state, which must not leak into other tests.)"""
    import shutil
    import subprocess

    home = tmp_path / "wandb-home"
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           **{v: str(home) for v in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR")}}
    overrides = [o for o in tiny_text_overrides(tiny_text_model_dir, glue_dir) if not o.startswith("logger.mode=")]
    done = subprocess.run([shutil.which("propetl-train") or "propetl-train", *overrides, "task=rte", "logger.mode=offline",
                           "trainer.max_steps=2", "data.max_train_examples=16", f"hydra.run.dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "run" / "metrics.json").is_file()
    assert not (tmp_path / "run" / "wandb").exists()
    assert not home.exists() or not any(p.suffix == ".wandb" for p in home.rglob("*"))
