"""Exports and saves never destroy what propetl did not write (issue 29): propetl-export refuses an OUT that is, is
inside or holds the checkpoint or its run folder, the working folder, or a folder holding foreign files, in one line
(exit 2) with every file under tmp_path unchanged; --overwrite replaces only a previous export; a killed export's
`.tmp` / `.old` litter is cleaned on the next one. propetl-eval refuses a bad --batch-size or --device in one line.
(save_propetl, which follows the same rule: tests/test_api.py.)"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from test_methods import logits
from transformers import AutoModelForSequenceClassification

from propetl.cli import evaluate, export
from propetl.configs import ModelSetup
from propetl.models import backbone
from propetl.storage import checkpoint, files

CHECKPOINT_CONFIG = ("method=propetl", "prototype=lora", "prototype.r=4", "mask.sparsity=0.5")


@pytest.fixture
def run(tiny_cfg, tmp_path) -> Path:
    """A finished run's folder, as propetl-train leaves it: checkpoint/, metrics.json, .hydra/, train.log."""
    run = tmp_path / "runs" / "rte" / "run"
    cfg = tiny_cfg(*CHECKPOINT_CONFIG)
    torch.manual_seed(0)
    checkpoint.save_checkpoint(backbone.build(ModelSetup.from_config(cfg), 2), ModelSetup.from_config(cfg), run / "checkpoint")
    (run / "metrics.json").write_text('{"glue_score": 61.0}\n')
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text("seed: 42\n")
    (run / "train.log").write_text("done\n")
    return run


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones included) and its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(capsys, *arguments) -> str:
    """propetl-export's one-line error (exit 2)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        export.main([str(a) for a in arguments])
    error = capsys.readouterr().err
    assert stop.value.code == 2 and error.count("\n") == 1 and error.startswith("propetl-export: error: "), error
    return error.removeprefix("propetl-export: error: ").strip()


# ----------------------------------------------------------------------------- the source and its run folder

@pytest.mark.parametrize("where,relation,what", [
    ("checkpoint", "is", "the checkpoint"),
    ("checkpoint/shared", "is inside", "the checkpoint"),
    (".", "is", "its run folder"),                       # the checkpoint's parent, which holds metrics.json
    ("hf", "is inside", "its run folder"),
    ("..", "holds", "its run folder"),
    ("../../..", "holds", "its run folder"),
])
def test_export_into_the_checkpoint_its_run_folder_or_above_is_refused(run, tmp_path, capsys, where, relation, what):
    before = snapshot(tmp_path)
    out = (run / where).resolve()
    source = run / "checkpoint" if what == "the checkpoint" else run
    error = refused(capsys, run / "checkpoint", out, "--format", "hf", "--overwrite")
    assert error == f"{out} {relation} {what} {source}: writing it would replace that; choose an OUT outside {source}"
    assert snapshot(tmp_path) == before                                  # metrics, .hydra, log, checkpoint: all there
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith((".tmp", ".old"))]      # no temporary either


def test_a_checkpoint_outside_a_run_folder_protects_only_itself(tiny_cfg, tmp_path, capsys):
    """A plain folder holding a checkpoint (no metrics.json, .hydra, train.log, resume/) is no run folder: a sibling
    OUT is fine, the checkpoint itself still refused."""
    cfg = tiny_cfg(*CHECKPOINT_CONFIG)
    source = checkpoint.save_checkpoint(backbone.build(ModelSetup.from_config(cfg), 2), ModelSetup.from_config(cfg), tmp_path / "ck")
    error = refused(capsys, source, source, "--format", "hf", "--overwrite")
    assert error.startswith(f"{source} is the checkpoint {source}: ")
    export.main([str(source), str(tmp_path / "hf"), "--format", "hf"])
    assert (tmp_path / "hf" / "model.safetensors").exists()


def test_a_link_to_the_checkpoint_is_the_checkpoint(run, tmp_path, capsys):
    (tmp_path / "link").symlink_to(run / "checkpoint", target_is_directory=True)
    before = snapshot(run)
    error = refused(capsys, tmp_path / "link" / ".." / "checkpoint", tmp_path / "link", "--format", "hf", "--overwrite")
    assert error.startswith(f"{run / 'checkpoint'} is the checkpoint {run / 'checkpoint'}: ")
    assert snapshot(run) == before and (tmp_path / "link").is_symlink()


def test_export_into_the_working_folder_is_one_line(run, tmp_path, capsys, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)                             # '.': even an empty working folder is not replaced
    error = refused(capsys, run / "checkpoint", ".", "--format", "hf", "--overwrite")
    assert error.startswith(f"{empty} is the working folder {empty}: ") and "choose a new folder" in error
    assert list(empty.iterdir()) == [] and Path.cwd() == empty
    monkeypatch.chdir(run)                               # '.' is the run folder: that rule speaks first
    before = snapshot(tmp_path)
    assert refused(capsys, "checkpoint", ".", "--format", "hf").startswith(f"{run} is its run folder {run}: ")
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------- foreign folders and earlier exports

def test_overwrite_refuses_a_folder_propetl_did_not_write(run, tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "sub").mkdir(parents=True)
    for name in ("a.txt", "b.txt", "c.txt", "d.txt", "e.txt", "f.txt"):
        (out / name).write_text(name)
    before = snapshot(tmp_path)
    error = refused(capsys, run / "checkpoint", out, "--format", "hf", "--overwrite")
    assert error == f"{out} holds files propetl did not write: a.txt, b.txt, c.txt, d.txt, e.txt and 2 more; " \
                    f"choose another OUT"
    assert snapshot(tmp_path) == before
    (tmp_path / "file").write_text("x")
    assert refused(capsys, run / "checkpoint", tmp_path / "file", "--format", "hf", "--overwrite") == \
        f"{tmp_path / 'file'} is a file, not a folder propetl wrote; choose another OUT"


def test_overwrite_replaces_a_previous_export_but_not_a_file_added_to_it(run, tmp_path, capsys, tiny_model_dir):
    peft = pytest.importorskip("peft")
    out = tmp_path / "exported"
    export.main([str(run / "checkpoint"), str(out), "--format", "hf"])
    marker = json.loads((out / files.OUTPUT_MARKER).read_text())
    assert marker["written_by"].startswith("propetl-export --format hf ") and "model.safetensors" in marker["files"]
    assert "exists (a previous export or save)" in refused(capsys, run / "checkpoint", out, "--format", "peft")

    export.main([str(run / "checkpoint"), str(out), "--format", "peft", "--overwrite"])
    assert not (out / "model.safetensors").exists() and (out / "adapter_config.json").exists()   # replaced, not mixed
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    expected = logits(checkpoint.load_checkpoint(run / "checkpoint")[0])
    torch.testing.assert_close(logits(peft.PeftModel.from_pretrained(base, out)), expected, atol=1e-5, rtol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported", "runs"]                 # no litter

    (out / "notes.txt").write_text("mine")                # the user's file inside an earlier export: kept
    before = snapshot(tmp_path)
    assert refused(capsys, run / "checkpoint", out, "--format", "hf", "--overwrite") == \
        f"{out} holds files propetl did not write: notes.txt; choose another OUT"
    assert snapshot(tmp_path) == before


def test_a_killed_exports_tmp_and_old_are_cleaned_on_the_next_export(run, tmp_path, capsys):
    out = tmp_path / "hf"
    export.main([str(run / "checkpoint"), str(out), "--format", "hf"])
    building = tmp_path / ".hf.k1ll3d_x.tmp"              # a build killed before its swap (mkdtemp's name)
    building.mkdir()
    (building / "config.json").write_text("{")
    shutil.copytree(out, tmp_path / ".hf.old")           # a kill after the swap, before the old one went
    keep = [tmp_path / ".hf.notes", tmp_path / ".hf2.k1ll3d_x.tmp", tmp_path / ".hf.k1ll3d_x.tmp.bak"]
    for path in keep:                                    # not this target's temporaries: never touched
        path.write_text("mine")
    export.main([str(run / "checkpoint"), str(out), "--format", "hf", "--overwrite"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["hf", "runs", *(p.name for p in keep)])
    assert AutoModelForSequenceClassification.from_pretrained(out) is not None


def test_a_kill_between_the_swaps_renames_puts_the_previous_export_back(run, tmp_path, capsys):
    out = tmp_path / "hf"
    export.main([str(run / "checkpoint"), str(out), "--format", "hf"])
    out.rename(tmp_path / ".hf.old")                     # killed after stepping the old one aside
    assert "exists (a previous export or save)" in refused(capsys, run / "checkpoint", out, "--format", "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "runs"]
    assert (out / "model.safetensors").exists()


def test_the_runners_own_folder_writes_need_no_marker_and_clean_their_litter(tmp_path):
    """checkpoint.save_checkpoint / resume.py write inside a run folder the run owns: no marker, litter cleaned."""
    target = tmp_path / "checkpoint"
    target.mkdir()
    (target / "old.bin").write_text("previous")
    tempfile.mkdtemp(dir=tmp_path, prefix=".checkpoint.", suffix=".tmp")       # as write_folder_atomically names it
    (tmp_path / ".checkpoint.old").mkdir()
    files.write_folder_atomically(target, lambda folder: (folder / "new.bin").write_text("new"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    assert sorted(p.name for p in target.iterdir()) == ["new.bin"]


# ----------------------------------------------------------------------------- propetl-eval's arguments

@pytest.mark.parametrize("arguments,message", [
    (["--batch-size", "0"], "--batch-size 0 is invalid; allowed: a positive integer"),
    (["--batch-size", "-5"], "--batch-size -5 is invalid; allowed: a positive integer"),
    (["--batch-size", "2.5"], "--batch-size 2.5 is invalid; allowed: a positive integer"),
    (["--device", "nope"], "--device nope is invalid; allowed: cpu, cuda, cuda:N"),
    (["--device", "cuda:x"], "--device cuda:x is invalid; allowed: cpu, cuda, cuda:N"),
    (["--device", "cuda"], "--device cuda: this machine has no CUDA device; allowed: cpu"),
    (["--device", "cuda:7"], "--device cuda:7: this machine has no CUDA device; allowed: cpu"),
])
def test_eval_refuses_bad_arguments_in_one_line_before_loading(tmp_path, capsys, monkeypatch, arguments, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)       # as on a machine without CUDA
    with pytest.raises(SystemExit) as stop:
        evaluate.main([str(tmp_path / "missing-checkpoint"), *arguments])
    assert stop.value.code == 2
    assert capsys.readouterr().err == f"propetl-eval: error: {message}\n"


def test_eval_names_the_cuda_devices_a_machine_has(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert evaluate.available_device("cuda:1") == "cuda:1" and evaluate.positive_batch_size("8") == 8
    with pytest.raises(evaluate.ConfigError, match=r"^--device cuda:2: this machine has 2 CUDA device\(s\); "
                                                   r"allowed: cpu, cuda, cuda:0, cuda:1$"):
        evaluate.available_device("cuda:2")
