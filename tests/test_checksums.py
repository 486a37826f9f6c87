"""Nothing lost, nothing wrong in silence: every checkpoint folder (single-task, multi-task, resume/) is sealed
with a sha256 manifest and refused in one line when a file changed, went missing or was added; names read
from a checkpoint are the registry's before use; backbones load from safetensors only; the remaining
failures (bad bytes in data, unwritable folders, absurd learning rates) are one line, exit 2."""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import TINY, compose_cfg, tiny_batch, tiny_text_overrides
from test_cli import ENV, SCRIPT

from propetl.cli.train import check_output_folder
from propetl.configs import ConfigError, ModelSetup
from propetl.data import glue
from propetl.models import backbone
from propetl.models.backbone import MultiTaskModel
from propetl.run import log, loop, rundir
from propetl.run.resume import Checkpointer
from propetl.storage import checkpoint, files
from propetl.validate import validate


def snapshot(folder: Path) -> dict:
    """Every file under `folder`: its bytes and modification time (loads must write nothing)."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))
            if p.is_file()}


def refused(load, *places: Path) -> str:
    """`load()` raises a one-line CheckpointError and writes nothing under `places`; its message."""
    before = [snapshot(p) for p in places]
    with pytest.raises(checkpoint.CheckpointError) as error:
        load()
    message = str(error.value)
    assert "\n" not in message and message.strip() == message
    assert [snapshot(p) for p in places] == before
    return message


def flip(path: Path, offset: int, mask: int = 0x01) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= mask
    path.write_bytes(bytes(raw))


# ----------------------------------------------------------------------------- a saved run, in process

def fresh(cfg):
    """A tiny model with its optimizer, scheduler and (disabled) scaler, as the loop makes them."""
    torch.manual_seed(0)
    model = backbone.build(ModelSetup.from_config(cfg), 2)
    optimizer, scheduler = loop.make_optimizer(model, cfg, backbone.head_parameter_names(model), total_steps=10)
    return model, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False)


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, tiny_model_dir):
    """A run folder with checkpoint/ (ProPETL-LoRA) and resume/ after one optimizer step, and the config."""
    cfg = compose_cfg([f"model.name_or_path={tiny_model_dir}", "model.name=tiny", f"model.hidden_size={TINY['hidden']}",
                       f"model.num_layers={TINY['layers']}", "logger.mode=disabled", "method=propetl", "prototype=lora",
                       "task=rte"])
    run = tmp_path_factory.mktemp("saved") / "run"
    model, optimizer, scheduler, scaler = fresh(cfg)
    model(**tiny_batch()).loss.backward()
    optimizer.step()
    scheduler.step()
    result = loop.FitResult(steps=1, best_state=loop.trainable_state(model))
    Checkpointer(run, cfg).save(result, model, optimizer, scheduler, scaler, torch.Generator().manual_seed(0).get_state())
    checkpoint.save_checkpoint(model, ModelSetup.from_config(cfg), run / "checkpoint")
    return run, cfg


@pytest.fixture
def run_copy(saved_run, tmp_path):
    run, cfg = saved_run
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run", cfg


def load_checkpoint_state(folder: Path) -> dict:
    model, _ = checkpoint.load_checkpoint(folder)
    return {n: t.clone() for n, t in model.state_dict().items()}


def load_resume_state(run: Path, cfg) -> dict:
    model, optimizer, scheduler, scaler = fresh(cfg)
    result, order = Checkpointer(run, cfg).load(model, optimizer, scheduler, scaler, loop.FitResult)
    state = {f"param/{n}": p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    state.update({f"best/{n}": t for n, t in result.best_state.items()}, order=order)
    for index, moments in optimizer.state_dict()["state"].items():
        state.update({f"opt/{index}/{k}": torch.as_tensor(v).clone() for k, v in moments.items()})
    return {**state, "result": json.dumps({k: v for k, v in vars(result).items() if k != "best_state"}, default=str)}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


def test_saved_folders_carry_a_manifest_of_every_file(saved_run):
    run, _ = saved_run
    for folder in (run / "checkpoint" / "shared", run / "checkpoint" / "tasks" / "rte", run / "resume"):
        manifest = json.loads((folder / files.MANIFEST_FILE).read_text())["sha256"]
        assert sorted(manifest) == sorted(p.name for p in folder.iterdir() if p.name != files.MANIFEST_FILE)
        assert all(files.sha256_of(folder / name) == digest for name, digest in manifest.items())
    assert json.loads((run / "checkpoint" / "shared" / checkpoint.CONFIG_FILE).read_text())["format_version"] == 4
    assert sorted(p.name for p in (run / "checkpoint").iterdir()) == ["shared", "tasks"]


@pytest.mark.parametrize("kind", ["checkpoint", "resume"])
def test_a_flipped_byte_in_any_file_is_refused_naming_it(run_copy, kind):
    run, cfg = run_copy
    folder = run / kind
    load = (lambda: checkpoint.load_checkpoint(folder)) if kind == "checkpoint" else (lambda: load_resume_state(run, cfg))
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        original = path.read_bytes()
        flip(path, len(original) // 2, 0x40)
        assert path.name in refused(load, run)
        path.write_bytes(original)
    load()                                                            # the pristine folder loads


@pytest.mark.parametrize("kind", ["checkpoint", "resume"])
def test_a_missing_or_unlisted_file_or_no_manifest_is_refused(run_copy, kind):
    run, cfg = run_copy
    folder = run / kind / "shared" if kind == "checkpoint" else run / kind
    load = (lambda: checkpoint.load_checkpoint(run / kind)) if kind == "checkpoint" else (lambda: load_resume_state(run, cfg))
    victim = sorted(p for p in folder.glob("*.safetensors"))[0]
    original = victim.read_bytes()
    victim.unlink()
    assert f"{victim} is missing" in refused(load, run)
    victim.write_bytes(original)
    (folder / "extra.safetensors").write_bytes(original)
    assert "extra.safetensors is not listed" in refused(load, run)
    (folder / "extra.safetensors").unlink()
    (folder / files.MANIFEST_FILE).unlink()
    assert f"has no {files.MANIFEST_FILE}" in refused(load, run)     # format 3 / a resume folder: required


def test_flipped_bytes_anywhere_in_a_saved_run_are_refused_or_change_nothing(run_copy):
    """Property: a byte flipped at random (seeded) in a random file of a saved run's checkpoint/ or resume/
    is refused in one line with nothing written, or (where it cannot matter) loads to identical results."""
    run, cfg = run_copy
    pristine = {"checkpoint": load_checkpoint_state(run / "checkpoint"), "resume": load_resume_state(run, cfg)}
    candidates = sorted(p for kind in pristine for p in (run / kind).rglob("*") if p.is_file())
    rng = random.Random(16)
    outcomes = []
    for _ in range(24):
        path = rng.choice(candidates)
        kind, original = path.relative_to(run).parts[0], path.read_bytes()
        flip(path, rng.randrange(len(original)), rng.randrange(1, 256))
        load = (lambda: load_checkpoint_state(run / "checkpoint")) if kind == "checkpoint" else \
            (lambda: load_resume_state(run, cfg))
        before = snapshot(run)
        try:
            state = load()
        except checkpoint.CheckpointError as error:
            assert "\n" not in str(error) and str(run / kind) in str(error)
            assert snapshot(run) == before
            outcomes.append("refused")
        else:
            assert same(state, pristine[kind]), path.name
            outcomes.append("same")
        path.write_bytes(original)
    assert outcomes.count("refused") > len(outcomes) // 2             # not vacuous: most flips land in data


# ----------------------------------------------------------------------------- multi-task checkpoints

@pytest.fixture
def multitask_checkpoint(tiny_cfg, tmp_path):
    cfg = tiny_cfg("mode=multitask", "tasks=[rte,stsb]", "prototype=lora", "prototype.r=4")
    torch.manual_seed(0)
    model = MultiTaskModel(ModelSetup.from_config(cfg), ["rte", "stsb"], [2, 1], for_training=False)
    return checkpoint.save_checkpoint(model, ModelSetup.from_config(cfg), tmp_path / "checkpoint")


def test_every_part_of_a_multitask_checkpoint_is_checked(multitask_checkpoint):
    folder = multitask_checkpoint
    assert (folder / "shared" / files.MANIFEST_FILE).exists() and (folder / "tasks" / "rte" / files.MANIFEST_FILE).exists()
    for path in [*sorted((folder / "shared").iterdir()), *sorted((folder / "tasks" / "stsb").iterdir())]:
        original = path.read_bytes()
        flip(path, len(original) // 2, 0x40)
        assert str(path) in refused(lambda: checkpoint.load_multitask(folder), folder)
        path.write_bytes(original)
    checkpoint.load_multitask(folder)
    checkpoint.load_multitask(folder, tasks=["rte"])                     # a task shipped alone: its own manifest
    assert "has no task '../shared'" in refused(lambda: checkpoint.load_multitask(folder, tasks=["../shared"]), folder)


def test_a_multitask_checkpoint_read_once_is_not_hashed_again(multitask_checkpoint, monkeypatch):
    """Adding tasks reads the base checkpoint's config first (train.py), then loads it: shared/ is hashed once."""
    folder, checked = multitask_checkpoint, []
    config = checkpoint.read_checkpoint_config(folder)

    def counting_check_seal(part, *args, **kwargs):
        checked.append(Path(part).name)
        return files.check_seal(part, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "check_seal", counting_check_seal)
    checkpoint.load_multitask(folder, config=config)
    assert checked == ["rte", "stsb"]                                   # each task's folder once, shared/ not again


# ----------------------------------------------------------------------------- names read from a checkpoint

def rewrite_config(folder: Path, change) -> None:
    """Edit a checkpoint's propetl.json and reseal it: a consistent folder whose config says something else."""
    path = folder / checkpoint.CONFIG_FILE
    path.write_text(json.dumps(change(json.loads(path.read_text()))))
    files.seal(folder)


@pytest.mark.parametrize("key,value,choices", [
    ("tasks", "../../evil", "cola, mnli, mrpc"), ("prototype.name", "../evil", "adapter, lora, prefix"),
    ("method.name", "evil", "propetl, petl, finetune, peft"), ("mask.kind", "evil", "learned"),
    ("storage.dtype", "fp8", "fp32, bf16, fp16"),
])
def test_names_in_a_checkpoint_are_the_registrys(run_copy, key, value, choices):
    run, _ = run_copy
    def change(config: dict) -> dict:
        if key == "tasks":
            return {**config, "tasks": [value], "num_labels": {value: 2}}
        section, name = key.split(".")
        return {**config, section: {**config[section], name: value}}
    rewrite_config(run / "checkpoint" / "shared", change)
    message = refused(lambda: checkpoint.load_checkpoint(run / "checkpoint"), run)
    assert f"{key}={value!r} is invalid" in message and choices in message


def test_a_multitask_checkpoint_naming_a_path_as_task_is_refused(multitask_checkpoint):
    rewrite_config(multitask_checkpoint / "shared",
                   lambda config: {**config, "tasks": ["rte", "../../evil"], "num_labels": {"rte": 2, "../../evil": 1}})
    message = refused(lambda: checkpoint.load_multitask(multitask_checkpoint), multitask_checkpoint)
    assert "tasks='../../evil' is invalid" in message and "rte, sst2, stsb" in message


def test_a_config_that_is_not_an_object_is_one_line(run_copy):
    run, _ = run_copy
    rewrite_config(run / "checkpoint" / "shared", lambda config: [config])
    assert "holds a list, not a checkpoint config" in refused(lambda: checkpoint.load_checkpoint(run / "checkpoint"), run)


def test_a_format4_config_without_its_tasks_is_one_line(run_copy):
    run, _ = run_copy
    rewrite_config(run / "checkpoint" / "shared", lambda config: {
        **{k: v for k, v in config.items() if k not in ("tasks", "num_labels")}, "task": {"name": "rte", "num_labels": 2}})
    assert "tasks=None is invalid; allowed: a non-empty list of distinct task names" in refused(lambda: checkpoint.load_checkpoint(run / "checkpoint"), run)


# ----------------------------------------------------------------------------- safetensors only

def test_a_backbone_with_only_a_pickle_is_refused_without_unpickling(run_copy, tiny_model_dir, monkeypatch):
    run, _ = run_copy
    pickled = run / "pickled-backbone"
    shutil.copytree(tiny_model_dir, pickled)
    from safetensors.torch import load_file
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    rewrite_config(run / "checkpoint" / "shared", lambda config: {**config, "model": {**config["model"], "name_or_path": str(pickled)}})

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load reached")
    monkeypatch.setattr(torch, "load", refuse)
    with pytest.raises(backbone.ModelError) as error:
        checkpoint.load_checkpoint(run / "checkpoint")
    assert "\n" not in str(error.value) and str(pickled) in str(error.value) and "safetensors only" in str(error.value)


# ----------------------------------------------------------------------------- one line, exit 2

def glue_copy(glue_dir: Path, tmp_path: Path, offset_after_header: int | None) -> Path:
    """RTE's files with a byte that is not UTF-8 in train.tsv: in its header (None) or early in its rows."""
    shutil.copytree(glue_dir / "RTE", tmp_path / "glue" / "RTE")
    path = tmp_path / "glue" / "RTE" / "train.tsv"
    raw = path.read_bytes()
    at = 3 if offset_after_header is None else raw.index(b"\n") + offset_after_header
    path.write_bytes(raw[:at] + b"\xff" + raw[at + 1:])
    return tmp_path / "glue"


@pytest.mark.parametrize("where", [None, 5])
def test_a_byte_that_is_not_utf8_in_a_data_file_is_one_line(glue_dir, tmp_path, where):
    with pytest.raises(glue.DataError) as error:
        glue.load_glue(compose_cfg(["task=rte"]).task, glue_copy(glue_dir, tmp_path, where), allow_hub=False)
    assert "\n" not in str(error.value) and "train.tsv" in str(error.value) and "0xff" in str(error.value)


def test_cli_bad_data_bytes_are_one_line_and_leave_no_run_folder(glue_dir, tmp_path, tiny_text_model_dir):
    bad = glue_copy(glue_dir, tmp_path, None)
    overrides = [*tiny_text_overrides(tiny_text_model_dir, bad), "task=rte", "trainer.max_steps=2",
                 "data.allow_hub=false"]
    result = subprocess.run([SCRIPT, *overrides, f"hydra.run.dir={tmp_path}/run"], capture_output=True, text=True,
                            env=ENV, cwd=tmp_path, timeout=600)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "train.tsv" in lines[0], result.stderr[-3000:]
    assert not (tmp_path / "run").exists()


def test_garbage_resume_state_is_one_line(run_copy):
    run, cfg = run_copy
    (run / "resume" / "state.json").write_bytes(b"\x00\xff not json")
    files.seal(run / "resume")                              # even resealed: the JSON itself is refused
    assert "cannot read" in refused(lambda: Checkpointer(run, cfg).check_fingerprint(), run)


@pytest.mark.parametrize("lr", [1e38, float("inf")])
def test_an_absurd_learning_rate_is_refused_before_any_work(lr):
    with pytest.raises(ConfigError) as error:
        validate(compose_cfg([f"trainer.lr={lr}"]))
    assert "trainer.lr=" in str(error.value) and "a positive number up to 1e+30" in str(error.value)


def test_an_unwritable_run_folder_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="is not a folder"):
        check_output_folder([f"hydra.run.dir={tmp_path}/file/run"])
    with pytest.raises(rundir.RunDirectoryError, match="cannot write in"):
        with rundir.claim(tmp_path / "file" / "run"):
            pass
    monkeypatch.setattr(os, "access", lambda path, mode: False)          # a read-only folder (root ignores chmod)
    with pytest.raises(ConfigError, match="is not writable; choose another folder"):
        check_output_folder(["-m", f"hydra.sweep.dir={tmp_path}/sweep"])
    monkeypatch.chdir(tmp_path)                                          # no folder given: the default outputs/
    with pytest.raises(ConfigError, match=f"default output folder {tmp_path}/outputs cannot be written: {tmp_path} "
                                          f"is not writable; run from a writable folder or give hydra.run.dir=FOLDER"):
        check_output_folder(["task=rte"])
    check_output_folder(["experiment=table1"])                           # an overlay may set its own folder
    check_output_folder(["--help"])


def test_a_write_refused_mid_run_is_one_line_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    from propetl.run.lifecycle import USER_ERRORS

    def refuse(*args):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(files.WriteError) as error:
        log.write_metrics(tmp_path / "metrics.json", {"glue_score": 1.0})
    assert isinstance(error.value, USER_ERRORS) and "\n" not in str(error.value)
    assert "metrics.json: Permission denied" in str(error.value)
    with pytest.raises(files.WriteError, match="checkpoint: Permission denied"):
        files.write_folder_atomically(tmp_path / "checkpoint", files.seal)
    assert list(tmp_path.iterdir()) == []


def test_each_folder_is_hashed_once_per_load(run_copy, monkeypatch, tmp_path):
    """propetl-export reads a checkpoint's config, then loads it; a resumed run checks resume/ at its start, then
    loads it: each folder's manifest is checked once, not twice."""
    from propetl.cli import export
    from propetl.run import resume

    run, cfg = run_copy
    checked = []

    def counting_check_seal(folder, *args, **kwargs):
        checked.append(Path(folder).name)
        return files.check_seal(folder, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "check_seal", counting_check_seal)
    monkeypatch.setattr(resume, "check_seal", counting_check_seal)
    export.export(run / "checkpoint", tmp_path / "hf", "hf")
    assert checked == ["shared", "rte"]                           # each part of the checkpoint once
    checked.clear()
    checkpointer = Checkpointer(run, cfg)
    checkpointer.check_fingerprint()                                     # run.begin_run
    checkpointer.load(*fresh(cfg), loop.FitResult)                       # loop.fit
    assert checked == ["resume"]
