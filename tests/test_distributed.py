"""Data-parallel training: batch sharding, and a real 2-process gloo run on CPU (torchrun)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import tiny_text_overrides
from test_cli import ENV

from propetl.run import distributed, log


def test_shard_gives_each_process_interleaved_rows():
    batch = {"input_ids": torch.arange(10).view(5, 2), "labels": torch.arange(5)}
    first, second = (distributed.shard(batch, distributed.Context(rank=r, world_size=2)) for r in (0, 1))
    assert first["labels"].tolist() == [0, 2, 4] and second["labels"].tolist() == [1, 3]
    assert first["input_ids"].tolist() == [[0, 1], [4, 5], [8, 9]]
    single = distributed.shard(batch, distributed.Context())
    assert single is batch


def test_a_batch_smaller_than_the_world_is_not_split():
    batch = {"input_ids": torch.ones(1, 3), "labels": torch.zeros(1)}
    assert distributed.shard(batch, distributed.Context(rank=1, world_size=2)) is batch


def test_single_process_context_from_a_plain_environment(monkeypatch):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    ctx = distributed.from_environment()
    assert (ctx.rank, ctx.world_size, ctx.enabled, ctx.is_main) == (0, 1, False, True)
    assert distributed.any_process(ctx, True) and not distributed.any_process(ctx, False)


def test_data_parallel_run_needs_a_fixed_run_dir():
    done = subprocess.run([sys.executable, "-m", "propetl", "task=rte"], env={**ENV, "WORLD_SIZE": "2"},
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and "hydra.run.dir" in done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["single", "multitask"])
def test_two_gloo_processes_train_one_run(tmp_path, tiny_text_model_dir, glue_dir, mode):
    run_dir = tmp_path / "run"
    tasks = ["task=rte"] if mode == "single" else ["mode=multitask", "tasks=[rte,stsb]", "data.max_train_examples=16"]
    overrides = [*tiny_text_overrides(tiny_text_model_dir, glue_dir), "method=propetl", "prototype=lora",
                 "data.max_train_examples=32", *tasks, "trainer.epochs=2", f"hydra.run.dir={run_dir}"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "propetl", *overrides]
    done = subprocess.run(command, env={**ENV, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert metrics["steps"] == 8 and metrics["train_examples"] == 64        # 32 examples, batch 8, 2 epochs
    kept = log.read_predictions(run_dir / "predictions.npz")                 # rank 0's, every task's test split
    assert set(kept) == ({"rte"} if mode == "single" else {"rte", "stsb"})
    rte = "train/accuracy" if mode == "single" else "train/rte/accuracy"      # rank 0's rows: half of each batch
    assert all(0.0 <= record[rte] <= 1.0 for record in metrics["history"])
    if mode == "single":
        assert "accuracy" in metrics["test"] and len(kept["rte"][0]) == 139
        assert (run_dir / "checkpoint" / "shared" / "layer_masks.safetensors").exists()
    else:                                   # every step uses one task's head: DDP must allow unused parameters
        assert set(metrics["per_task"]) == {"rte", "stsb"}
        assert (run_dir / "checkpoint" / "tasks" / "stsb" / "task_mask.safetensors").exists()
    assert not (run_dir / "resume").exists()
    assert sorted(p.name for p in (run_dir / ".hydra").iterdir()) == ["config.yaml", "overrides.yaml"]   # rank 0's
    assert not (run_dir / ".propetl.lock").exists()                                 # rank 0 owned the folder
