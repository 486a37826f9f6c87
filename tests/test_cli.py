"""The user's commands, as subprocesses: errors are one line and leave nothing; multirun makes one directory a job."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}


SCRIPT = shutil.which("propetl-train") or str(Path(sys.executable).parent / "propetl-train")


def propetl_train(tmp_path, *arguments, check=False):
    """The installed console script, exactly as a user runs it (from an unrelated working directory)."""
    command = [SCRIPT, *arguments, f"hydra.run.dir={tmp_path}/run",
               f"hydra.sweep.dir={tmp_path}/sweep"]
    return subprocess.run(command, capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=900, check=check)


@pytest.mark.parametrize("argument,names", [
    ("task=nope", ["task=nope", "cola", "rte", "sst2"]),
    ("prototype=nope", ["prototype=nope", "adapter, lora, prefix"]),
    ("method=nope", ["method=nope", "finetune, peft, petl, propetl"]),
])
def test_unknown_choice_is_one_line_and_writes_nothing(tmp_path, argument, names):
    result = propetl_train(tmp_path, argument)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and all(name in lines[0] for name in names), result.stderr
    assert not list(tmp_path.rglob("metrics.json")) and not (tmp_path / "run").exists()


def test_missing_data_dir_is_one_line_and_writes_nothing(tmp_path):
    result = propetl_train(tmp_path, "data.dir=/no/such/folder", "data.allow_hub=false", "logger.mode=disabled")
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "/no/such/folder" in lines[0] and "rte" in lines[0], result.stderr[-2000:]
    assert not list(tmp_path.rglob("metrics.json")) and not (tmp_path / "run").exists()


def test_invalid_value_is_one_line(tmp_path):
    result = propetl_train(tmp_path, "mask.sparsity=1.5")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "mask.sparsity=1.5" in lines[0] and "[0.0, 1.0)" in lines[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argument,expected", [
    ("+trainer.max_step=3", "did you mean trainer.max_steps?"), ("trainer.max_step=3", "did you mean trainer.max_steps?"),
])
def test_unknown_key_is_one_line(tmp_path, argument, expected):
    """Refused before Hydra runs (no torch imported). A bool seed (seed=true) is refused by validation, as
    every invalid value is (tests/test_config.py; its command-line path: test_invalid_value_is_one_line)."""
    result = propetl_train(tmp_path, argument, "logger.mode=disabled")
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr[-2000:]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_multirun_gives_one_directory_per_job(tmp_path, glue_dir):
    """Each job's folder is named by its overrides (hydra.sweep.subdir), so a re-run finds its runs."""
    result = propetl_train(tmp_path, "-m", "task=rte", "seed=1,2", "method=petl", "trainer.max_steps=2",
                           "trainer.batch_size=4", "trainer.eval_batch_size=128", "logger.mode=disabled",
                           f"data.dir={glue_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted((tmp_path / "sweep").glob("*/metrics.json"))
    assert len(runs) == 2
    common = "trainer.batch_size=4,trainer.eval_batch_size=128,trainer.max_steps=2"     # logger.mode left out
    data_dir = str(glue_dir).replace("/", "%2F")                     # data.dir kept (other data: another folder)
    assert [run.parent.name for run in runs] == [f"data.dir={data_dir},method=petl,seed={s},task=rte,{common}"
                                                 for s in (1, 2)]
    seen = {(m["task"], m["seed"]) for m in (json.loads(p.read_text()) for p in runs)}
    assert seen == {("rte", 1), ("rte", 2)}
    for run in runs:                         # each job's record, written by propetl: its own overrides
        overrides = (run.parent / ".hydra" / "overrides.yaml").read_text()
        metrics = json.loads(run.read_text())
        assert f"task={metrics['task']}" in overrides and f"seed={metrics['seed']}" in overrides
        assert sorted(p.name for p in (run.parent / ".hydra").iterdir()) == ["config.yaml", "overrides.yaml"]


def test_a_failed_run_leaves_no_empty_folders_under_outputs(tmp_path):
    """With the default run directory (outputs/runs/<task>/<label>/<time>/), nothing at all is left."""
    result = subprocess.run([SCRIPT, "data.dir=/no/such/folder", "data.allow_hub=false", "logger.mode=disabled"],
                            capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=900)
    assert result.returncode == 2, result.stderr[-2000:]
    assert not (tmp_path / "outputs").exists() or not list((tmp_path / "outputs").rglob("*"))


def test_help_is_propetls_own(tmp_path):
    result = subprocess.run([SCRIPT, "--help"], capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    text = result.stdout
    assert text.startswith("propetl-train: ProPETL") and "Powered by Hydra" not in text
    assert "\ntask: cola, mnli, mrpc, qnli, qqp, rte, sst2, stsb, wmt16_ro_en, xsum\n" in text  # the T5 tasks: refused
    assert "\nprototype: adapter, lora, prefix\n" in text and "task=xsum and task=wmt16_ro_en" in text
    assert all(part in text for part in ("== Main options", "mask.sparsity=", "== Examples ==", "propetl-train -m ",
                                         "experiment=", "profile=", "--config-dir"))


def test_the_command_line_answers_without_torch(tmp_path):
    """--help and tab completion run propetl.cli.train's checks and Hydra, never the training code's imports."""
    code = ("import atexit, sys; atexit.register(lambda: print('imported torch:', 'torch' in sys.modules)); "
            "from propetl.cli.train import main; sys.argv = ['propetl-train', *sys.argv[1:]]; main()")
    helped = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True, text=True, env=ENV,
                            cwd=tmp_path, timeout=120)
    assert helped.returncode == 0 and helped.stdout.rstrip().endswith("imported torch: False"), helped.stdout[-500:]
    completed = subprocess.run([sys.executable, "-c", code, "-sc", "query=bash"], capture_output=True, text=True,
                               env={**ENV, "COMP_LINE": "propetl-train task=r"}, cwd=tmp_path, timeout=120)
    assert completed.stdout.splitlines() == ["task=rte", "imported torch: False"], completed.stdout + completed.stderr[-500:]


@pytest.mark.slow
def test_a_four_job_sweep_prints_its_jobs_compared_and_propetl_report_writes_them(tmp_path, tiny_text_model_dir,
                                                                                   glue_dir):
    """The end of a -m sweep builds its report (<sweep>/report/) and prints one line a job; propetl-report on the
    sweep's folder writes the same table anywhere."""
    from conftest import tiny_text_overrides

    result = propetl_train(tmp_path, "-m", *tiny_text_overrides(tiny_text_model_dir, glue_dir), "task=rte",
                           "trainer.max_steps=1", "data.max_train_examples=16", "seed=1,2", "mask.sparsity=0.5,0.9")
    assert result.returncode == 0, result.stderr[-3000:]
    printed = result.stdout.split("The sweep's jobs", 1)[1]
    jobs = [line for line in printed.splitlines() if line.startswith("| ") and "RTE" in line]
    assert len(jobs) == 4 and {"mask.sparsity=0.5" in j for j in jobs} == {True, False}
    assert (tmp_path / "sweep" / "report" / "jobs.md").is_file() and (tmp_path / "sweep" / "report" / "table.md").is_file()

    done = subprocess.run([shutil.which("propetl-report") or "propetl-report", str(tmp_path / "sweep"), "--out",
                           str(tmp_path / "tables")], capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    table = (tmp_path / "tables" / "jobs.md").read_text()
    assert sum("| RTE |" in line for line in table.splitlines()) == 4 and "ProPETL-Adapter (s=0.9)" in table
