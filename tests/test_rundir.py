"""A run directory has one owner at a time, and its record (.hydra/) is written by propetl only once the
run owns the directory and is new or the same config: a finished run of another config is refused and left
byte for byte as it was; two real processes race for one directory and the second is refused; a lock left
by a killed (SIGKILL) run does not block the next run."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import compose_cfg, tiny_text_overrides
from omegaconf import OmegaConf
from test_cli import ENV, SCRIPT

from propetl.run import rundir
from propetl.run.fingerprint import fingerprint

FAST = ["task=rte", "method=propetl", "prototype=lora", "data.max_train_examples=16", "trainer.epochs=1",
        "trainer.save_steps=1", "trainer.eval_batch_size=512"]


def snapshot(folder: Path) -> dict:
    """Every file under a folder: its bytes and its modification time."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))
            if p.is_file()}


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def start(run_dir: Path, overrides: list[str]) -> subprocess.Popen:
    return subprocess.Popen([SCRIPT, *overrides, f"hydra.run.dir={run_dir}"], env=ENV, cwd=run_dir.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run(run_dir: Path, overrides: list[str]) -> subprocess.CompletedProcess:
    process = start(run_dir, overrides)
    stdout, stderr = process.communicate(timeout=600)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


# ----------------------------------------------------------------------------- the record and the skip (in process)

def finished_folder(folder: Path, overrides: list[str] = ()) -> Path:
    """A run folder as a finished run leaves it: metrics.json and its recorded config."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps({"glue_score": 50.0}))
    rundir.write_record(folder, compose_cfg(list(overrides)), list(overrides))
    return folder


def test_record_is_written_in_hydras_format(tmp_path):
    cfg = compose_cfg(["seed=3", "prototype=lora"])
    rundir.write_record(tmp_path, cfg, ["seed=3", "prototype=lora"])
    assert OmegaConf.load(tmp_path / ".hydra" / "config.yaml") == cfg
    assert OmegaConf.to_container(OmegaConf.load(tmp_path / ".hydra" / "overrides.yaml")) == ["seed=3", "prototype=lora"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hydra"]          # swapped in whole, nothing left beside


def test_finished_run_of_the_same_config_is_skipped(tmp_path):
    finished_folder(tmp_path, ["seed=3"])
    assert rundir.finished_run(tmp_path, fingerprint(compose_cfg(["seed=3", "trainer.threads=1"]))) == {"glue_score": 50.0}
    assert rundir.finished_run(tmp_path / "nothing", fingerprint(compose_cfg())) is None


def test_finished_run_of_another_config_names_every_differing_key(tmp_path):
    finished_folder(tmp_path, ["prototype=lora"])
    with pytest.raises(rundir.RunDirectoryError) as error:
        rundir.finished_run(tmp_path, fingerprint(compose_cfg(["prototype=lora", "seed=7", "mask.sparsity=0.3"])))
    message = str(error.value)
    assert "\n" not in message and "seed=42 there, 7 here" in message and "mask.sparsity=0.9 there, 0.3 here" in message


@pytest.mark.parametrize("damage", ["garbage metrics", "metrics list", "no record", "garbage record"])
def test_unreadable_finished_run_is_one_line(tmp_path, damage):
    finished_folder(tmp_path)
    if damage == "garbage metrics":
        (tmp_path / "metrics.json").write_bytes(b"\xff\xfe{not json")
    elif damage == "metrics list":
        (tmp_path / "metrics.json").write_text("[1, 2]")
    elif damage == "no record":
        shutil.rmtree(tmp_path / ".hydra")
    else:
        (tmp_path / ".hydra" / "config.yaml").write_text("a: [unclosed\n")
    with pytest.raises(rundir.RunDirectoryError) as error:
        rundir.finished_run(tmp_path, fingerprint(compose_cfg()))
    assert "\n" not in str(error.value) and str(tmp_path) in str(error.value)


# ----------------------------------------------------------------------------- the lock (in process)

def test_a_claimed_directory_is_refused_naming_the_owner(tmp_path):
    with rundir.claim(tmp_path / "run"):
        assert (tmp_path / "run" / rundir.LOCK_FILE).read_text().strip() == str(os.getpid())
        with pytest.raises(rundir.RunDirectoryInUse) as error:
            with rundir.claim(tmp_path / "run"):
                pass
        assert f"pid {os.getpid()}" in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "run" / rundir.LOCK_FILE).exists()
    with rundir.claim(tmp_path / "run"):                   # released: the next run owns it
        pass


# ----------------------------------------------------------------------------- the command line

@pytest.fixture(scope="module")
def finished_cli_run(tmp_path_factory, tiny_text_model_dir, glue_dir):
    overrides = [*tiny_text_overrides(tiny_text_model_dir, glue_dir), *FAST]
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    done = run(run_dir, overrides)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir, overrides


@pytest.mark.slow
def test_cli_writes_the_record_itself(finished_cli_run):
    run_dir, overrides = finished_cli_run
    assert sorted(p.name for p in (run_dir / ".hydra").iterdir()) == ["config.yaml", "overrides.yaml"]
    assert OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "overrides.yaml")) == overrides
    assert OmegaConf.load(run_dir / ".hydra" / "config.yaml").prototype.name == "lora"
    assert not (run_dir / rundir.LOCK_FILE).exists()


@pytest.mark.slow
def test_finished_run_of_another_config_is_refused_and_left_as_it_was(finished_cli_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_cli_run[0], run_dir)
    before = snapshot(run_dir)
    done = run(run_dir, [*finished_cli_run[1], "seed=7", "mask.sparsity=0.3"])
    assert done.returncode == 2
    line = one_line(done.stderr)
    assert "seed=42 there, 7 here" in line and "mask.sparsity=0.9 there, 0.3 here" in line
    assert snapshot(run_dir) == before                                      # nothing written, not even .hydra/


def wait_for(condition, process: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.time() < deadline
        time.sleep(0.01)


@pytest.mark.slow
def test_two_processes_race_for_one_directory_and_a_killed_owner_does_not_block_its_resume(
        tmp_path, tiny_text_model_dir, glue_dir):
    """The owner (stopped while it holds the lock, so that the race is decided) keeps the directory: the
    second run into it exits 2 with one line naming the owner's pid and writes nothing. The owner goes on,
    is killed with SIGKILL after its first checkpoint, its lock file stays behind, and the same command
    resumes the run to the end regardless."""
    run_dir = tmp_path / "run"
    overrides = [*tiny_text_overrides(tiny_text_model_dir, glue_dir), *FAST, "data.max_train_examples=32"]
    owner = start(run_dir, overrides)
    lock = run_dir / rundir.LOCK_FILE
    try:
        wait_for(lambda: lock.exists() and lock.read_text().strip() == str(owner.pid), owner)
        owner.send_signal(signal.SIGSTOP)
        before = snapshot(run_dir)
        second = run(run_dir, [*overrides, "mask.sparsity=0.5"])
        assert second.returncode == 2
        assert f"in use by another run (pid {owner.pid})" in one_line(second.stderr)
        assert snapshot(run_dir) == before
        owner.send_signal(signal.SIGCONT)
        wait_for(lambda: (run_dir / "resume" / "state.json").exists(), owner)
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.communicate(timeout=60)
    assert owner.returncode == -signal.SIGKILL and lock.read_text().strip() == str(owner.pid)   # a stale lock file
    assert not (run_dir / "metrics.json").exists()

    resumed = run(run_dir, overrides)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout + resumed.stderr
    assert json.loads((run_dir / "metrics.json").read_text())["mask_sparsity"] == 0.9 and not lock.exists()
    assert OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "overrides.yaml")) == overrides
