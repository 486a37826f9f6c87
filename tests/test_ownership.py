"""A run removes only what it made (issue 29): a folder holding what no run wrote is refused before Hydra writes there
(or left as it was), a failed run cleans up its own entries only, trainer.resume=false keeps the old results until the
new run has finished, a kill in the middle is undone at the next start, and a sweep goes on past a failed job.
The property test builds random folder contents and random failures and checks that nothing the run did not write is
removed or changed."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import compose_cfg, tiny_text_overrides
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_cli import ENV, SCRIPT

from propetl.cli import train as cli
from propetl.data.glue import DataError
from propetl.run import rundir


def tree(folder: Path) -> dict:
    """Every file and folder under `folder`: bytes for files, None for folders."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def propetl_train(cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([SCRIPT, *overrides], env=ENV, cwd=cwd, capture_output=True, text=True, timeout=600)


def user_folder(folder: Path) -> Path:
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("x\n")
    (folder / "sub" / "data.csv").write_text("1,2\n")
    return folder


# ----------------------------------------------------------------------------- the attack's commands

def test_a_folder_with_user_files_is_refused_before_anything_is_written(tmp_path):
    folder = user_folder(tmp_path / "V")
    before = tree(folder)
    done = propetl_train(tmp_path, "mask.sparsity=1.5", f"hydra.run.dir={folder}")
    assert done.returncode == 2
    assert "holds files a run did not write (notes.txt, sub/)" in done.stderr.strip() and "\n" not in done.stderr.strip()
    assert tree(folder) == before


def test_the_working_folder_is_never_removed(tmp_path):
    user_folder(tmp_path)
    before = tree(tmp_path)
    done = propetl_train(tmp_path, "mask.sparsity=1.5", "hydra.run.dir=.")
    assert done.returncode == 2 and "holds files a run did not write" in done.stderr
    assert tree(tmp_path) == before
    allowed = propetl_train(tmp_path, "mask.sparsity=1.5", "hydra.run.dir=.", "run_dir.allow_other_files=true")
    assert allowed.returncode == 2 and "mask.sparsity=1.5 is invalid" in allowed.stderr
    assert tree(tmp_path) == before                   # allowed to run beside them: its failure removes only its own


def test_an_empty_working_folder_is_not_removed_either(tmp_path):
    done = propetl_train(tmp_path, "mask.sparsity=1.5", "hydra.run.dir=.")
    assert done.returncode == 2 and tmp_path.is_dir()


def test_a_new_folder_of_a_failed_run_is_removed(tmp_path):
    done = propetl_train(tmp_path, "mask.sparsity=1.5", "hydra.run.dir=new/run")
    assert done.returncode == 2 and not (tmp_path / "new" / "run").exists()


def test_a_run_folder_pointed_at_a_checkpoint_is_refused(tmp_path):
    checkpoint = tmp_path / "run" / "checkpoint"
    (checkpoint / "shared").mkdir(parents=True)
    (checkpoint / "shared" / "propetl.json").write_text("{}")
    (checkpoint / "manifest.json").write_text("{}")
    before = tree(tmp_path)
    done = propetl_train(tmp_path, "mask.sparsity=1.5", f"hydra.run.dir={checkpoint}")
    assert done.returncode == 2 and "holds files a run did not write (manifest.json, shared/)" in done.stderr
    assert tree(tmp_path) == before


def test_a_checkpoint_without_anything_to_continue_from_is_not_overwritten(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoint").mkdir(parents=True)
    (run_dir / "checkpoint" / "weights").write_text("trained")
    with pytest.raises(rundir.RunDirectoryError, match="holds a checkpoint/ but no metrics.json or resume/"):
        cli.run_owned(compose_cfg(["logger.mode=disabled"]), run_dir)
    assert (run_dir / "checkpoint" / "weights").read_text() == "trained"


def finished_run(folder: Path, overrides: list[str] = ()) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps({"glue_score": 61.0}))
    (folder / rundir.PREDICTIONS_FILE).write_bytes(b"old predictions")
    (folder / "checkpoint").mkdir()
    (folder / "checkpoint" / "weights").write_text("old weights")
    rundir.write_record(folder, compose_cfg(list(overrides)), list(overrides))
    return folder


def test_resume_false_followed_by_a_data_error_keeps_the_old_results(tmp_path):
    run_dir = finished_run(tmp_path / "run")
    before = tree(run_dir)
    cfg = compose_cfg(["trainer.resume=false", f"data.dir={tmp_path / 'nowhere'}", "data.allow_hub=false",
                       "logger.mode=disabled", "seed=5"])
    with pytest.raises(DataError):
        cli.run_owned(cfg, run_dir)
    assert tree(run_dir) == before                   # metrics.json, checkpoint/ and the old record, byte for byte


def test_a_replacement_killed_before_saving_anything_gives_the_old_results_back(tmp_path):
    run_dir = finished_run(tmp_path / "run")
    before = tree(run_dir)
    claim = rundir.Claim(run_dir, made=False)
    rundir.set_aside(claim)                          # then the process is killed: nothing else happens
    assert not (run_dir / "metrics.json").exists() and (run_dir / rundir.PREVIOUS_DIR / "metrics.json").exists()
    rundir.recover(run_dir)
    assert tree(run_dir) == before


def test_a_set_aside_cut_off_in_the_middle_is_undone(tmp_path):
    run_dir = finished_run(tmp_path / "run")
    before = tree(run_dir)
    partial = run_dir / f"{rundir.PREVIOUS_DIR}.partial"
    partial.mkdir()
    os.replace(run_dir / "metrics.json", partial / "metrics.json")          # killed after the first move
    rundir.recover(run_dir)
    assert tree(run_dir) == before


def test_the_run_s_own_error_is_told_when_the_lock_cannot_be_removed(tmp_path, monkeypatch):
    """Permission lost mid-run: removing the lock fails too, and must not replace the run's one-line error."""
    with pytest.raises(RuntimeError, match="the run's own error"):
        with rundir.claim(tmp_path / "run"):
            def refuse(self, *args, **kwargs):
                raise PermissionError(13, "Permission denied")
            monkeypatch.setattr(Path, "unlink", refuse)
            raise RuntimeError("the run's own error")


def test_sweep_job_folders_are_one_level_with_path_values():
    from propetl import _job_folder

    assert _job_folder("data.dir=/a/b,seed=1", 0) == "data.dir=%2Fa%2Fb,seed=1"
    assert _job_folder("data.dir=/a/c,seed=1", 0) != _job_folder("data.dir=/a/b,seed=1", 0)
    long = _job_folder("x=" + "y" * 400, 3)
    assert len(long) < 255 and "/" not in long and long != _job_folder("x=" + "y" * 399, 3)
    assert _job_folder("", 3) == "3"


@pytest.mark.slow
def test_a_sweep_with_one_failing_job_finishes_the_others_and_reports_one_failure(tmp_path, tiny_text_model_dir,
                                                                                   glue_dir):
    overrides = [*tiny_text_overrides(tiny_text_model_dir, glue_dir), "trainer.max_steps=1", "data.max_train_examples=16",
                 "task=rte"]
    done = propetl_train(tmp_path, "-m", *overrides, "mask.sparsity=1.5,0.5", "seed=1",
                         f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert done.returncode == 1, done.stderr[-3000:]            # the exit code: how many jobs failed
    finished = list((tmp_path / "sweep").glob("*/metrics.json"))
    errors = list((tmp_path / "sweep").glob("*/error.txt"))
    assert len(finished) == 1 and len(errors) == 1 and "mask.sparsity=1.5" in errors[0].parent.name
    summary = json.loads((tmp_path / "sweep" / "sweep_summary.json").read_text())
    assert summary["failed"] == 1 and "mask.sparsity=1.5 is invalid" in summary["failures"][0]["error"]
    assert "1 job(s) of the sweep failed" in done.stderr


# ----------------------------------------------------------------------------- the property

USER_FILES = ("notes.txt", "sub/", "sub/data.csv", "model.bin")
RUN_WRITES = (".hydra/", "wandb/", "resume/", "checkpoint/", "metrics.json", ".metrics.json.a1b2.tmp", "error.txt",
              "predictions.npz")


def write(folder: Path, name: str, text: str) -> None:
    path = folder / name.rstrip("/")
    if name.endswith("/"):
        path.mkdir(parents=True, exist_ok=True)
        (path / "inside").write_text(text)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(exists=st.booleans(), user=st.sets(st.sampled_from(USER_FILES)), old_run=st.booleans(),
       allow=st.booleans(), resume_false=st.booleans(), writes=st.lists(st.sampled_from(RUN_WRITES), max_size=5),
       error=st.sampled_from([DataError("bad data"), RuntimeError("a bug"), KeyboardInterrupt()]))
def test_nothing_the_run_did_not_write_is_removed(tmp_path_factory, monkeypatch, exists, user, old_run, allow,
                                                  resume_false, writes, error):
    run_dir = tmp_path_factory.mktemp("prop") / "run"
    if exists:
        run_dir.mkdir()
        for name in sorted(user):
            write(run_dir, name, f"user {name}")
        if old_run:
            finished_run(run_dir)
    before = tree(run_dir)
    ours_before = {k: v for k, v in before.items()}
    if not (run_dir / "train.log").exists():                    # what Hydra does before the job: the folder, its log
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "train.log").touch()

    def failing_train(cfg, output_dir, claim):
        if resume_false:
            rundir.set_aside(claim)
        (output_dir / "train.log").write_text("log of the failing run\n")
        for name in writes:
            write(output_dir, name, "new")
        raise error

    monkeypatch.setattr("propetl.run.train.train", failing_train)
    cfg = compose_cfg([f"run_dir.allow_other_files={str(allow).lower()}"])
    with pytest.raises((type(error), rundir.RunDirectoryError)):
        cli.run_owned(cfg, run_dir)
    after = tree(run_dir)
    for name, content in ours_before.items():                    # everything that was there is there, unchanged,
        if name == "train.log" or name.startswith(("train.log",)):
            continue
        resumable = any(w.rstrip("/") in ("resume", "checkpoint", "metrics.json") for w in writes)
        overwritten = name.split("/")[0] in ("metrics.json", "checkpoint", ".hydra") and resumable or name in writes
        if overwritten and not resume_false:
            continue                                            # (the fake run overwrote its own folder's results)
        assert after.get(name, "MISSING") == content, (name, sorted(after))
    if not exists:                                              # a folder the run made: gone unless resumable
        resumable = any(w.rstrip("/") in ("resume", "checkpoint", "metrics.json") for w in writes)
        assert run_dir.exists() == resumable, sorted(after)
