"""A sealed folder says only that its files are as saved, not that what they say is valid: a checkpoint's propetl.json
or a resume folder's state.json edited and resealed (manifest rewritten) is refused in one line naming the file and
the key, as the command line's config would be; a folder without a manifest loads only if it predates the seal
(format 1-2) and the caller asks propetl-upgrade to rewrite it (issue 29)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_checksums import (  # noqa: F401
    load_checkpoint_state,
    load_resume_state,
    multitask_checkpoint,
    refused,
    rewrite_config,
    run_copy,
    saved_run,
)

from conftest import format1_packed_masks

from propetl.configs import ModelSetup
from propetl.cli import upgrade
from propetl.run.resume import START_OVER, STATE_JSON, STATE_TENSORS, Checkpointer
from propetl.storage import checkpoint, files


def edited(config: dict, key: str, value) -> dict:
    """`config` with the dotted `key` set to `value` (a key of DELETE: removed)."""
    section, _, name = key.partition(".")
    if not name:
        return {k: v for k, v in config.items() if k != key} if value is DELETE else {**config, key: value}
    inner = {k: v for k, v in config[section].items() if k != name}
    return {**config, section: inner if value is DELETE else {**inner, name: value}}


DELETE = object()


# ----------------------------------------------------------------------------- propetl.json

@pytest.mark.parametrize("key,value,says", [
    # the checkpoint's own keys
    ("format_version", "4", "format_version='4' is invalid; allowed: 4"),
    ("format_version", 5, "format_version=5 is invalid; allowed: 4"),
    ("format_version", True, "format_version=True is invalid"),
    ("tasks", "rte", "tasks='rte' is invalid; allowed: a non-empty list of distinct task names"),
    ("tasks", [], "tasks=[] is invalid"),
    ("tasks", [{"name": "rte"}], "tasks=[{'name': 'rte'}] is invalid"),
    ("num_labels", {"rte": "x"}, "num_labels.rte='x' is invalid; allowed: a positive integer"),
    ("num_labels", {"rte": -1}, "num_labels.rte=-1 is invalid; allowed: a positive integer"),
    ("num_labels", {"rte": True}, "num_labels.rte=True is invalid"),
    ("num_labels", [2], "num_labels=[2] is invalid; allowed: an object of each task's label count (rte)"),
    ("num_labels", {"rte": 2, "mrpc": 2}, "num_labels={'rte': 2, 'mrpc': 2} is invalid"),
    ("task_masks", "false", "task_masks='false' is invalid; allowed: true or false"),
    ("model.name_or_path", ["x"], "model.name_or_path=['x'] is invalid"),
    ("model.name_or_path", "", "model.name_or_path='' is invalid"),
    # sections and values by the command line's rules (validate.py)
    ("model", "bert", "model='bert' is invalid; allowed: an object"),
    ("storage", [], "storage=[] is invalid; allowed: an object"),
    ("storage", DELETE, "storage=None is invalid; allowed: an object"),
    ("task_masks", DELETE, "task_masks=None is invalid; allowed: true or false"),
    ("mask.combine", DELETE, "mask.combine=None is invalid"),
    ("method.name", "lora", "method.name='lora' is invalid; allowed: propetl, petl, finetune, peft"),
    ("mask.sparsity", 1.5, "mask.sparsity=1.5 is invalid; allowed: a number in [0.0, 1.0)"),
    ("mask.sparsity", "0.5", "mask.sparsity='0.5' is invalid"),
    ("mask.seed", 0.5, "mask.seed=0.5 is invalid; allowed: an integer"),
    ("mask.combine", "xor", "mask.combine='xor' is invalid"),
    ("prototype.r", -1, "prototype.r=-1 is invalid"),
    ("prototype.r", DELETE, "prototype.r=None is invalid"),
    ("prototype.lr", 0, "prototype.lr=0 is invalid; allowed: a positive number"),
    ("model.hidden_size", "32", "model.hidden_size='32' is invalid; allowed: a positive integer"),
    ("model.num_layers", 0, "model.num_layers=0 is invalid"),
    ("data.protocol", DELETE, "data.protocol=None is invalid; allowed: split, full_dev"),
    ("data.max_length", -5, "data.max_length=-5 is invalid; allowed: a positive integer"),
    ("data.split_seed", "42", "data.split_seed='42' is invalid; allowed: an integer"),
    ("storage.mask_coding", None, "storage.mask_coding=None is invalid; allowed: bits, entropy"),
])
def test_an_edited_resealed_config_is_refused_naming_the_file_and_key(run_copy, key, value, says):
    run, _ = run_copy
    shared = run / "checkpoint" / "shared"
    rewrite_config(shared, lambda config: edited(config, key, value))
    message = refused(lambda: checkpoint.load_checkpoint(run / "checkpoint"), run)
    assert message.startswith(f"{shared / checkpoint.CONFIG_FILE}: ") and says in message


def test_an_interpolation_in_a_config_is_refused_in_one_line(run_copy):
    run, _ = run_copy
    rewrite_config(run / "checkpoint" / "shared", lambda config: edited(config, "prototype.alpha", "${nowhere}"))
    assert "config does not resolve" in refused(lambda: checkpoint.load_checkpoint(run / "checkpoint"), run)


def test_a_multitask_config_with_a_bad_label_count_is_refused(multitask_checkpoint):
    rewrite_config(multitask_checkpoint / "shared", lambda config: edited(config, "num_labels", {"rte": 2, "stsb": 0}))
    message = refused(lambda: checkpoint.load_multitask(multitask_checkpoint), multitask_checkpoint)
    assert "propetl.json: num_labels.stsb=0 is invalid; allowed: a positive integer" in message


def test_a_flat_config_with_a_bad_task_is_not_upgraded(tiny_cfg, tmp_path):
    from test_mask_coding import tiny_propetl, write_flat

    model, cfg, _ = tiny_propetl(tiny_cfg)
    folder = checkpoint.save_checkpoint(model, ModelSetup.from_config(cfg), tmp_path / "checkpoint")
    write_flat(folder, model)                                             # format 3, one task, flat
    for task, says in (({"name": "rte", "num_labels": "2"}, "num_labels.rte='2' is invalid"),
                       ({"name": "nope", "num_labels": 2}, "tasks='nope' is invalid"),
                       ("rte", "task='rte' is invalid; allowed: an object")):
        rewrite_config(folder, lambda config: {**config, "task": task})
        assert says in refused(lambda: upgrade.upgrade(folder, tmp_path / "new"), folder)
        assert not (tmp_path / "new").exists()


# ----------------------------------------------------------------------------- state.json

def rewrite_state(run: Path, change) -> None:
    """Edit a resume folder's state.json and reseal it."""
    path = run / "resume" / STATE_JSON
    path.write_text(json.dumps(change(json.loads(path.read_text()))))
    files.seal(run / "resume")


def state_refused(run: Path, cfg, says: str) -> None:
    """Refused in one line naming state.json (or state.safetensors), `says` and how to start over; nothing written."""
    message = refused(lambda: load_resume_state(run, cfg), run)
    assert str(run / "resume") in message and says in message and message.endswith(START_OVER), message


def nested(meta: dict, key: str, value) -> dict:
    """meta with the dotted key (objects only) set to value, or removed (DELETE)."""
    meta = json.loads(json.dumps(meta))
    *parents, last = key.split(".")
    inner = meta
    for name in parents:
        inner = inner[name]
    if value is DELETE:
        del inner[last]
    else:
        inner[last] = value
    return meta


@pytest.mark.parametrize("key,value,says", [
    ("fingerprint", ["seed", 42], "fingerprint=['seed', 42] is invalid; allowed: an object"),
    ("scheduler", DELETE, "scheduler=None is invalid; allowed: an object"),
    ("parameters", "param", "parameters='param' is invalid; allowed: a list of tensor names"),
    ("best", [1, 2], "best=[1, 2] is invalid"),
    ("extra", {"wandb_id": 5}, "extra={'wandb_id': 5} is invalid"),
    ("optimizer.param_groups", {}, "optimizer.param_groups={} is invalid; allowed: a list"),
    ("optimizer.state_keys", ["0"], "optimizer.state_keys=['0'] is invalid"),
    ("optimizer.state_keys.x", ["exp_avg"], "optimizer.state_keys.x=['exp_avg'] is invalid"),
    ("optimizer.state_shapes.0/exp_avg", DELETE, "optimizer.state_shapes.0/exp_avg=None is invalid"),
    ("optimizer.state_shapes.0/exp_avg", [-1], "optimizer.state_shapes.0/exp_avg=[-1] is invalid; allowed: a list"),
    ("optimizer.state_shapes.0/exp_avg", [3, 3, 3], "optimizer.state_shapes.0/exp_avg has 27 entries"),
])
def test_a_resealed_state_of_the_wrong_structure_is_refused_before_use(run_copy, key, value, says):
    run, cfg = run_copy
    rewrite_state(run, lambda meta: nested(meta, key, value))
    message = refused(lambda: Checkpointer(run, cfg).check_fingerprint(), run)          # at the run's start
    assert message.startswith(f"{run / 'resume' / STATE_JSON}: ") and says in message and message.endswith(START_OVER)


def test_a_state_that_is_not_an_object_is_refused(run_copy):
    run, cfg = run_copy
    rewrite_state(run, lambda meta: [meta])
    state_refused(run, cfg, "state=[{")


@pytest.mark.parametrize("key,value,says", [
    ("result.steps", DELETE, "result.steps is missing"),
    ("result.speed", 1.0, "result.speed is not a field"),
    ("result.epoch", "1", "result.epoch='1' is invalid; allowed: an integer"),
    ("result.steps", -1, "result.steps=-1 is invalid; allowed: an integer from 0"),
    ("result.best_score", None, "result.best_score=None is invalid; allowed: a number"),
    ("result.history", {}, "result.history={} is invalid; allowed: a list"),
    ("scheduler.last_epoch", "x", "scheduler.last_epoch='x' is invalid; allowed: an integer"),
    ("scheduler.base_lrs", [1e-4], "scheduler.base_lrs=[0.0001] is invalid; allowed: a list of 4"),
    ("optimizer.param_groups", lambda meta: meta["optimizer"]["param_groups"][:1], "optimizer.param_groups=[{"),
    ("optimizer.param_groups", lambda meta: [{k: v for k, v in group.items() if k != "lr"}
                                             for group in meta["optimizer"]["param_groups"]],
     "optimizer.param_groups[0].lr is missing"),
    ("optimizer.state_shapes.0/exp_avg", lambda meta: [1, 1, *meta["optimizer"]["state_shapes"]["0/exp_avg"]],
     "is invalid; allowed: [] or parameter 0's shape"),                 # as many values, another shape
    ("rng.python", [3, [1, 2], None], "is not a saved random state"),
    ("rng.numpy", ["XX", 0, 0, 0.0], "is not a saved random state"),
    ("parameters", lambda meta: meta["parameters"][1:], "its trainable tensors do not match"),
])
def test_a_resealed_state_that_does_not_fit_the_run_is_refused_before_anything_is_set(run_copy, key, value, says):
    run, cfg = run_copy
    rewrite_state(run, lambda meta: nested(meta, key, value(meta) if callable(value) else value))
    state_refused(run, cfg, says)


@pytest.mark.parametrize("victim", ["rng/torch", "rng/data_order", "param/", "best/", "opt/"])
def test_a_tensor_named_in_the_state_but_missing_from_its_file_is_refused(run_copy, victim):
    run, cfg = run_copy
    path = run / "resume" / STATE_TENSORS
    tensors = load_file(path)
    name = next(n for n in sorted(tensors) if n.startswith(victim))
    save_file({n: t for n, t in tensors.items() if n != name}, str(path))
    files.seal(run / "resume")
    message = refused(lambda: Checkpointer(run, cfg).check_fingerprint(), run)
    assert message == f"{path}: no tensor '{name}' (named in {STATE_JSON}); {START_OVER}"


def test_a_moment_of_no_parameter_is_refused(run_copy):
    run, cfg = run_copy
    path = run / "resume" / STATE_TENSORS
    save_file({**load_file(path), "opt/999/step": torch.zeros(())}, str(path))
    rewrite_state(run, lambda meta: nested(nested(meta, "optimizer.state_keys.999", ["step"]),
                                           "optimizer.state_shapes.999/step", []))
    state_refused(run, cfg, "optimizer.state_keys.999 is invalid; allowed: a parameter's index below")


def test_a_tensor_of_another_shape_is_refused(run_copy):
    run, cfg = run_copy
    path = run / "resume" / STATE_TENSORS
    tensors = load_file(path)
    name = next(n for n in sorted(tensors) if n.startswith("best/"))
    tensors[name] = torch.zeros(3)
    save_file(tensors, str(path))
    files.seal(run / "resume")
    state_refused(run, cfg, f"'{name}' has shape (3,), this model's (")


# ----------------------------------------------------------------------------- a folder without its manifest

def downgrade(folder: Path, version: int = 2) -> None:
    """What the attack did: a checkpoint's config says an older format, and its manifest is gone."""
    shared = folder / checkpoint.SHARED_DIR
    rewrite_config(shared, lambda config: {**config, "format_version": version})
    (shared / files.MANIFEST_FILE).unlink()


def test_a_downgrade_around_the_seal_is_not_loaded_nor_upgraded_unless_unsealed_folders_are_allowed(run_copy):
    run, _ = run_copy
    folder, new = run / "checkpoint", run.parent / "upgraded"
    expected = load_checkpoint_state(folder)
    downgrade(folder)
    for load in (lambda: checkpoint.load_checkpoint(folder), lambda: checkpoint.read_checkpoint_config(folder)):
        assert refused(load, run) == (f"{folder} is a checkpoint of format 2; this propetl reads format 4: "
                                      f"run `propetl-upgrade {folder} NEW_FOLDER` to rewrite it")
    assert refused(lambda: upgrade.upgrade(folder, new), run) == (
        f"{folder / 'shared'} has no manifest.json (format 2: written before checkpoints were sealed in format 3, "
        f"or edited); pass --allow-unsealed to upgrade an unsealed checkpoint")
    upgrade.upgrade(folder, new, allow_unsealed=True)                                  # asked for: it upgrades
    assert all(torch.equal(t, expected[n]) for n, t in checkpoint.load_checkpoint(new)[0].state_dict().items())


def test_a_task_folder_without_its_manifest_needs_the_same_permission(run_copy):
    run, _ = run_copy
    folder = run / "checkpoint"
    rewrite_config(folder / "shared", lambda config: {**config, "format_version": 2})   # resealed, an older format
    (folder / "tasks" / "rte" / files.MANIFEST_FILE).unlink()
    assert f"{folder / 'tasks' / 'rte'} has no manifest.json (format 2" in refused(
        lambda: upgrade.upgrade(folder, run.parent / "upgraded"), run)
    upgrade.upgrade(folder, run.parent / "upgraded", allow_unsealed=True)


def test_a_sealed_format_without_its_manifest_is_refused(run_copy):
    run, _ = run_copy
    folder = run / "checkpoint"
    (folder / "shared" / files.MANIFEST_FILE).unlink()
    assert "has no manifest.json" in refused(lambda: checkpoint.load_checkpoint(folder), run)
    rewrite_config(folder / "shared", lambda config: {**config, "format_version": 3})   # format 3 carried one too
    (folder / "shared" / files.MANIFEST_FILE).unlink()
    message = refused(lambda: upgrade.upgrade(folder, run.parent / "upgraded", allow_unsealed=True), run)
    assert "has no manifest.json" in message and "format 3 checkpoints carry one" in message


def test_a_multitask_checkpoint_of_format_1_is_upgraded(multitask_checkpoint, tmp_path):
    folder = multitask_checkpoint
    expected = {n: t.clone() for n, t in checkpoint.load_multitask(folder)[0].state_dict().items()}
    downgrade(folder, version=1)
    for part in ("rte", "stsb"):                    # format 1: no manifest anywhere, task mask rows [*shape]
        (folder / "tasks" / part / files.MANIFEST_FILE).unlink()
        path = folder / "tasks" / part / checkpoint.TASK_MASK_FILE
        rows = checkpoint.read_masks(path)
        save_file({n: format1_packed_masks(m[0]) for n, m in rows.items()}, str(path),
                  metadata={"shapes": json.dumps({n: list(m.shape[1:]) for n, m in rows.items()})})
    rewrite_config(folder / "shared", lambda config: {k: v for k, v in config.items() if k != "task_masks"})
    (folder / "shared" / files.MANIFEST_FILE).unlink()
    assert "run `propetl-upgrade" in refused(lambda: checkpoint.load_multitask(folder), folder)
    upgrade.upgrade(folder, tmp_path / "upgraded", allow_unsealed=True)
    model, saved = checkpoint.load_multitask(tmp_path / "upgraded")
    assert saved["format_version"] == 4 and saved["task_masks"] is True
    assert all(torch.equal(t, expected[n]) for n, t in model.state_dict().items())
