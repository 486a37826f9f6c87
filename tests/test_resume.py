"""Resume after a kill, safe loading, corrupted and mismatched checkpoints (tiny model, real RTE data)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import compose_cfg, tiny_fit_inputs, tiny_text_overrides
from test_cli import ENV, SCRIPT

from propetl.configs import ModelSetup
from propetl.run import log, rundir
from propetl.run.resume import Checkpointer
from propetl.run.train import train
from propetl.storage import checkpoint, files

# 48 examples at batch 8 = 6 steps an epoch, 3 epochs, a checkpoint every 4 steps: kills land mid-epoch.
RUN = ["task=rte", "method=propetl", "prototype=lora", "data.max_train_examples=48", "trainer.epochs=3",
       "trainer.save_steps=4", "mask.lr=0.05", "prototype.lr=0.01"]
TIMING_KEYS = ("train_seconds", "wall_seconds", "host")


def comparable(metrics: dict) -> dict:
    """metrics.json without wall-clock times."""
    out = {k: v for k, v in metrics.items() if k not in TIMING_KEYS}
    out["history"] = [{k: v for k, v in record.items() if k != "epoch_seconds"} for record in metrics["history"]]
    return out


def start(run_dir: Path, overrides: list[str]) -> subprocess.Popen:
    return subprocess.Popen([SCRIPT, *overrides, f"hydra.run.dir={run_dir}"], env=ENV, cwd=run_dir.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(run_dir: Path, overrides: list[str]) -> dict:
    """Run to the end; metrics.json."""
    process = start(run_dir, overrides)
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
    assert not (run_dir / "resume").exists()                        # discarded once the run is complete
    return json.loads((run_dir / "metrics.json").read_text())


def kill_and_resume(run_dir: Path, overrides: list[str], sig: int) -> dict:
    """Start a run, signal it after its first checkpoint, run the same command again; metrics.json."""
    process = start(run_dir, overrides)
    deadline = time.time() + 300
    while not (run_dir / "resume" / "state.json").exists():          # wait for the first checkpoint
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode in (-sig, 128 + sig), stderr[-3000:]
    assert not (run_dir / "metrics.json").exists() and (run_dir / "resume" / "state.json").exists()
    if sig == signal.SIGTERM:
        assert "checkpoint saved" in stderr and f"hydra.run.dir={run_dir}" in stderr

    resumed = start(run_dir, overrides)                               # the same command, same directory
    stdout, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr[-3000:]
    assert "resuming from" in stdout + stderr
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_text_model_dir, glue_dir):
    overrides = [*tiny_text_overrides(tiny_text_model_dir, glue_dir), *RUN]
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    return overrides, finish(run_dir, overrides), run_dir


@pytest.mark.slow
def test_killed_run_resumes_to_identical_metrics(tmp_path, uninterrupted):
    """SIGKILL after the first checkpoint (step 4 of 6: mid-epoch), then the same command again: the same metrics
    (the epochs' training accuracy included) and the same test predictions."""
    overrides, expected, expected_dir = uninterrupted
    resumed = kill_and_resume(tmp_path / "run", overrides, signal.SIGKILL)
    assert comparable(resumed) == comparable(expected)
    assert all("train/accuracy" in record for record in resumed["history"])
    kept, expected_kept = (log.read_predictions(d / rundir.PREDICTIONS_FILE) for d in (tmp_path / "run", expected_dir))
    assert kept.keys() == expected_kept.keys() == {"rte"}
    assert all(np.array_equal(a, b) for a, b in zip(kept["rte"], expected_kept["rte"]))


@pytest.mark.slow
def test_terminated_length_grouped_run_resumes_to_identical_metrics(tmp_path, uninterrupted):
    """SIGTERM saves a checkpoint where the run is (mid-epoch) and exits; length-grouped batches (the cpu
    profile's) are replayed exactly from it."""
    overrides = [*uninterrupted[0], "data.group_by_length=true"]
    expected = finish(tmp_path / "uninterrupted", overrides)
    assert comparable(kill_and_resume(tmp_path / "killed", overrides, signal.SIGTERM)) == comparable(expected)


@pytest.mark.slow
def test_killed_multitask_run_resumes_to_identical_metrics(tmp_path, tiny_text_model_dir, glue_dir):
    """Multi-task: one parameter per task mask, AdamW moments only for the tasks drawn so far. SIGKILL after the first
    checkpoint (step 4 of 12), then the same command again: the same metrics as the uninterrupted run."""
    overrides = [*tiny_text_overrides(tiny_text_model_dir, glue_dir), "mode=multitask", "tasks=[rte,stsb]",
                 "prototype=adapter", "data.max_train_examples=48", "trainer.epochs=2", "trainer.save_steps=4",
                 "mask.lr=0.05", "prototype.lr=0.01"]
    expected = finish(tmp_path / "uninterrupted", overrides)
    assert comparable(kill_and_resume(tmp_path / "killed", overrides, signal.SIGKILL)) == comparable(expected)


def leftover_checkpoint(tmp_path, tiny_text_model_dir, glue_dir, monkeypatch, *extra):
    """A finished tiny run whose resume/ folder is kept (and metrics.json removed), as after a crash."""
    monkeypatch.setattr(Checkpointer, "discard", lambda self: None)
    cfg = compose_cfg([*tiny_text_overrides(tiny_text_model_dir, glue_dir), *RUN, "trainer.epochs=1", *extra])
    train(cfg, tmp_path)
    monkeypatch.undo()
    (tmp_path / "metrics.json").unlink()
    return tmp_path / "resume"


@pytest.mark.slow
def test_finished_run_is_skipped(tmp_path, tiny_text_model_dir, glue_dir):
    cfg = compose_cfg([*tiny_text_overrides(tiny_text_model_dir, glue_dir), *RUN, "trainer.epochs=1"])
    first = train(cfg, tmp_path)
    record = (tmp_path / ".hydra" / "config.yaml").stat().st_mtime_ns
    assert train(cfg, tmp_path) == json.loads(json.dumps(first))      # read back, not trained again
    assert (tmp_path / ".hydra" / "config.yaml").stat().st_mtime_ns == record          # and its record left alone


@pytest.mark.slow
def test_mismatched_resume_checkpoint_is_refused(tmp_path, tiny_text_model_dir, glue_dir, monkeypatch):
    leftover_checkpoint(tmp_path, tiny_text_model_dir, glue_dir, monkeypatch)
    cfg = compose_cfg([*tiny_text_overrides(tiny_text_model_dir, glue_dir), *RUN, "trainer.epochs=1", "mask.sparsity=0.5"])
    with pytest.raises(checkpoint.CheckpointError) as error:
        train(cfg, tmp_path)
    assert "mask.sparsity=0.9 there, 0.5 here" in str(error.value)
    assert "\n" not in str(error.value) and not (tmp_path / "metrics.json").exists()
    assert rundir.recorded_config(tmp_path).mask.sparsity == 0.9                # the record still says what was trained


@pytest.mark.slow
def test_checkpoint_cut_off_inside_its_folder_swap_is_recovered(tmp_path, tiny_text_model_dir, glue_dir, monkeypatch):
    """A kill between the swap's two renames leaves only .resume.old: the next run puts it back and resumes
    from it (one checkpoint behind, never a half-written one)."""
    resume = leftover_checkpoint(tmp_path, tiny_text_model_dir, glue_dir, monkeypatch)
    saved = (resume / "state.json").read_text()
    os.replace(resume, tmp_path / ".resume.old")
    cfg = compose_cfg([*tiny_text_overrides(tiny_text_model_dir, glue_dir), *RUN, "trainer.epochs=1"])
    checkpointer = Checkpointer(tmp_path, cfg)
    assert checkpointer.exists() and (resume / "state.json").read_text() == saved
    assert not (tmp_path / ".resume.old").exists()
    assert train(cfg, tmp_path)["steps"] == json.loads(saved)["result"]["steps"]     # resumed at its end


@pytest.mark.slow
def test_corrupted_resume_checkpoint_is_refused(tmp_path, tiny_text_model_dir, glue_dir, monkeypatch):
    resume = leftover_checkpoint(tmp_path, tiny_text_model_dir, glue_dir, monkeypatch)
    tensors = resume / "state.safetensors"
    tensors.write_bytes(tensors.read_bytes()[: tensors.stat().st_size // 2])          # truncated
    cfg = compose_cfg([*tiny_text_overrides(tiny_text_model_dir, glue_dir), *RUN, "trainer.epochs=1"])
    with pytest.raises(checkpoint.CheckpointError, match="state.safetensors is corrupted"):      # its manifest says so
        train(cfg, tmp_path)


@pytest.mark.slow
def test_diverged_run_stops_with_one_line_and_keeps_its_last_good_checkpoint(tmp_path, tiny_text_model_dir, glue_dir):
    """Learning rates of 1e20 make the loss NaN at step 3: exit 2, one line (step, value, likely cause),
    no metrics.json, and resume/ holds the last state whose weights are all finite."""
    from safetensors.torch import load_file

    run_dir = tmp_path / "run"
    overrides = [*tiny_text_overrides(tiny_text_model_dir, glue_dir), *RUN, "trainer.epochs=1", "trainer.save_steps=1",
                 "data.max_train_examples=64", "prototype.lr=1e20", "trainer.head_lr=1e20"]
    process = start(run_dir, overrides)
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 2, stderr[-3000:]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "training stopped at step 3: the training loss (nan) is not finite" in lines[0], stderr[-3000:]
    assert "likely cause: learning rates too large" in lines[0] and "trainer.lr=1e+20" in lines[0]
    assert not (run_dir / "metrics.json").exists()
    state = json.loads((run_dir / "resume" / "state.json").read_text())
    assert 0 < state["result"]["steps"] < 3
    assert all(bool(t.float().isfinite().all()) for t in load_file(run_dir / "resume" / "state.safetensors").values())


# ----------------------------------------------------------------------------- saved task checkpoints

@pytest.fixture
def saved(tiny_cfg, tmp_path):
    import torch

    from propetl.models import backbone

    cfg = tiny_cfg("method=propetl", "prototype=lora")
    torch.manual_seed(0)
    model = backbone.build(ModelSetup.from_config(cfg), 2)
    return checkpoint.save_checkpoint(model, ModelSetup.from_config(cfg), tmp_path / "checkpoint")


@pytest.mark.parametrize("victim", ["shared/prototype.safetensors", "shared/layer_masks.safetensors",
                                    "tasks/*/head.safetensors"])
def test_corrupted_task_checkpoint_is_refused(saved, victim):
    path = next(saved.glob(victim))
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(checkpoint.CheckpointError) as error:
        checkpoint.load_checkpoint(saved)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_garbage_header_is_refused(saved):
    next(saved.glob("tasks/*/head.safetensors")).write_bytes(b"\xff" * 64)
    with pytest.raises(checkpoint.CheckpointError, match="head.safetensors"):
        checkpoint.load_checkpoint(saved)


@pytest.mark.parametrize("key,value,needle", [("prototype", {"name": "adapter", "reduction_factor": 12, "bottleneck": 8,
                                                                 "non_linearity": "relu", "init_std": 0.02, "lr": 1e-4,
                                                                 "mask_sparsity": 0.5, "mask_lr": 0.01},
                                                 "do not match"),
                                                ("mask", None, "ones per layer"),
                                                ("format_version", 99, "format_version")])
def test_mismatched_task_checkpoint_is_refused(saved, key, value, needle):
    config = json.loads((saved / "shared" / "propetl.json").read_text())
    if key == "mask":
        config["mask"]["sparsity"] = 0.5
    else:
        config[key] = value
    (saved / "shared" / "propetl.json").write_text(json.dumps(config))
    files.seal(saved / "shared")                      # a consistent folder of another config: past the checksums
    with pytest.raises(checkpoint.CheckpointError) as error:
        checkpoint.load_checkpoint(saved)
    assert needle in str(error.value) and "\n" not in str(error.value)


def test_never_unpickles(saved, monkeypatch):
    import pickle

    import torch

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used")
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    checkpoint.load_checkpoint(saved)


def test_a_loss_gone_bad_on_any_process_stops_every_process_at_that_step(tiny_text_model_dir, glue_dir, monkeypatch):
    """Data-parallel: each process sees its own slice, so one process's loss can be NaN while another's is not.
    The check goes through distributed.any_process, so every process raises Diverged at the same step (none
    waits forever in the next all-reduce). Here a stand-in for another process reports a NaN at step 2."""
    import torch

    from propetl.models import backbone
    from propetl.run import distributed, loop

    cfg = compose_cfg([*tiny_text_overrides(tiny_text_model_dir, glue_dir), *RUN, "trainer.epochs=1"])
    model, loader = tiny_fit_inputs(cfg, 4)
    calls = []
    real_any_process = distributed.any_process

    def another_process_diverges_at_step_2(ctx, flag):
        if len(calls) < 8:
            calls.append(flag)
        return real_any_process(ctx, flag) or len(calls) == 3      # calls: loss 1, stop 1, loss 2 (NaN there)

    monkeypatch.setattr(distributed, "any_process", another_process_diverges_at_step_2)
    with pytest.raises(loop.Diverged) as stopped:
        loop.fit(model, loader, lambda m: ({}, 0.0), cfg, backbone.head_parameter_names(model), torch.device("cpu"))
    message = str(stopped.value)
    assert "training stopped at step 2" in message and "not finite on at least one process" in message
    assert "\n" not in message and calls == [False, False, False]        # finite here, every time
