"""Checkpoints: the folder a trained model is kept in, written and read. (What it costs: accounting.py.)

One layout for one task or several (format 4; save_checkpoint):
    shared/propetl.json             what to rebuild: model, method, prototype, mask, tasks, label counts, split, storage
    shared/<dense file>             DENSE_FILE[method] (none for a frozen prototype: prototype.seed draws it again)
    shared/adapter_model.safetensors, shared/adapter_config.json   method=peft: PEFT's save_pretrained
    shared/layer_masks.safetensors  the L layer masks of every masked tensor, coded (mask_coding.py)
    tasks/<task>/task_mask.safetensors, tasks/<task>/head.safetensors   several tasks: the task's mask [1, *shape]; head
Each folder carries a manifest.json (files.py), written last and checked before anything is read. Dense tensors are
written in `storage.dtype`, loaded as fp32; the folder is built beside its place and renamed (never half-written).
Formats 1-3 are refused in one line naming propetl-upgrade. check_config checks every value before use.
Readers: load_multitask (any tasks); load_checkpoint (one task; the API's load_propetl). A T5 run (model.family=t5)
writes the same layout (its heads files empty: the text is the output) and loads back as a TextToTextModel.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from propetl import methods, validate
from propetl.configs import ConfigError, ModelSetup, group_choices, plain_value
from propetl.methods import rules
from propetl.models import backbone
from propetl.models.t5 import TextToTextModel
from propetl.storage import mask_coding
from propetl.storage.accounting import (
    STORAGE_DTYPES,
    UNNAMED_TASK,
    Kept,
    MaskFile,
    dense_parameters,
    kept,
    split_task_layer,
)
from propetl.storage.files import CheckpointError, check_seal, seal, write_folder_atomically

FORMAT_VERSION = 4
SHARED_DIR, TASKS_DIR = "shared", "tasks"
CONFIG_FILE, HEAD_FILE = "propetl.json", "head.safetensors"
LAYER_MASKS_FILE, TASK_MASK_FILE = mask_coding.LAYER_MASKS_FILE, "task_mask.safetensors"
DENSE_FILE = {
    "propetl": "prototype.safetensors",
    "petl": "petl.safetensors",
    "finetune": "backbone.safetensors",
    "peft": methods.PEFT_FILES[0],
}
# What a checkpoint config may hold (check_config): the sections and keys of the command line's config it keeps,
# checked by the same rules (validate.py), and the checkpoint's own keys.
CONFIG_SECTIONS = ("model", "method", "prototype", "mask", "storage")
OPTIONAL_SECTIONS = ("data", "peft")  # the Python API saves no data split; peft: method=peft's tuner (conf/peft/)
SAVED_RUN_KEYS = (
    "model.name_or_path",
    "model.hidden_size",
    "model.num_layers",
    "mask.combine",
    "data.protocol",
    "data.split_seed",
    "data.max_length",
    "storage.dtype",
    "storage.mask_coding",
)  # validate.RUN_RULES'
OBJECT = rules.Rule(lambda v: isinstance(v, dict), "an object")
FORMAT_RULE = rules.Rule(lambda v: rules.integer().accepts(v) and v == FORMAT_VERSION, str(FORMAT_VERSION))
UPGRADABLE_FORMATS = (1, 2, 3)  # propetl-upgrade rewrites them into FORMAT_VERSION
TASK_LIST = rules.Rule(
    lambda v: isinstance(v, list) and bool(v) and all(isinstance(t, str) for t in v) and len(set(v)) == len(v),
    "a non-empty list of distinct task names",
)
MATCH_KEYS = methods.WithShapeKeys(
    ("model.name_or_path", "method.name", "prototype.name", "mask.kind", "mask.sparsity", "mask.combine")
)  # + prototype.<key> of each prototype's shape keys


def file_sizes(checkpoint_dir: Path) -> dict:
    """Bytes of the files written (tensors, and PEFT's adapter_config.json): each (file_bytes/<path in the folder>),
    all but the heads (file_bytes) and all."""
    directory = Path(checkpoint_dir)
    files = {
        p.relative_to(directory).as_posix(): p.stat().st_size
        for p in sorted(directory.rglob("*"))
        if p.suffix == ".safetensors" or p.name in methods.PEFT_FILES
    }
    heads = sum(size for name, size in files.items() if name.endswith(HEAD_FILE))
    return {
        "file_bytes": sum(files.values()) - heads,
        "file_bytes_with_head": sum(files.values()),
        **{f"file_bytes/{name}": size for name, size in files.items()},
    }


def file_figures(checkpoint_dir: Path, figures: dict) -> dict:
    """file_sizes, and beside the run's counted `figures` (accounting.account): bits per mask entry of the whole
    masks files, and the files without heads over plain PETL in the same dtype (several tasks: per task)."""
    out = file_sizes(checkpoint_dir)
    masks = sum(size for name, size in out.items() if name.endswith((LAYER_MASKS_FILE, TASK_MASK_FILE)))
    if figures.get("mask_entries"):
        out["file_mask_bits_per_entry"] = 8 * masks / figures["mask_entries"]
    tasks = figures.get("tasks")
    ratio_key = "file_amortised_ratio_to_plain_petl" if tasks else "file_ratio_to_plain_petl"
    out[ratio_key] = out["file_bytes"] / (tasks or 1) / figures["plain_petl_bytes_as_stored"]
    return out


# ----------------------------------------------------------------------------- writing


def checkpoint_config(setup: ModelSetup, task_names: list[str], num_labels: list[int], task_masks: bool) -> dict:
    """shared/propetl.json: what load_checkpoint and load_multitask need to rebuild the model (plain values)."""
    return {
        "format_version": FORMAT_VERSION,
        "tasks": list(task_names),
        "num_labels": dict(zip(task_names, map(int, num_labels))),
        "task_masks": task_masks,
        **setup.saved,
        "storage": asdict(setup.storage),
    }


def save_masks(masks: MaskFile, path: Path, coding: str) -> None:
    """A masks file -> one safetensors file in mask `coding` (storage.mask_coding; mask_coding.encode)."""
    tensors, metadata = masks.coded(coding)
    save_file({name: torch.from_numpy(t) for name, t in tensors.items()}, str(path), metadata=metadata)


def read_masks(path: Path) -> dict[str, torch.Tensor]:
    """A masks file of either format -> {name: 0/1 float tensor}; a corrupted one gives a one-line error."""
    tensors, metadata = read_safetensors(path)
    try:
        return {name: torch.from_numpy(m) for name, m in mask_coding.decode(tensors, metadata).items()}
    except mask_coding.MaskCodingError as error:
        raise CheckpointError(f"{path}: {error}") from None


def save_dense(tensors: dict[str, torch.Tensor], path: Path, dtype_name: str) -> None:
    """Float tensors -> a safetensors file in `dtype_name` (storage.dtype; fp16 refuses values beyond its range)."""
    dtype = STORAGE_DTYPES[dtype_name]
    out = {}
    for name, tensor in tensors.items():
        cast = tensor.detach().to(dtype).contiguous().cpu()
        if not torch.equal(cast.isfinite(), tensor.detach().cpu().isfinite()):
            raise CheckpointError(
                f"storage.dtype={dtype_name}: '{name}' has values beyond its range "
                f"(largest |value| {float(tensor.detach().abs().max()):.4g}); use bf16 or fp32"
            )
        out[name] = cast
    save_file(out, str(path))


def save_checkpoint(model: nn.Module, setup: ModelSetup, directory: Path, keep: Kept | None = None) -> Path:
    """Write a checkpoint folder (format 4, the layout above) atomically. `model`: the MultiTaskModel of a run, or
    a transformers model with the method inside, built from `setup`; `keep`: its accounting.kept, if the caller has
    it (the run, which hands the same to accounting.account: what is kept, and its masks' coding, computed once)."""
    written = keep or kept(model, setup.method, setup.task)
    coding, dtype = setup.storage.mask_coding, setup.storage.dtype

    def build(folder: Path) -> None:
        shared = folder / SHARED_DIR
        shared.mkdir()
        if written.adapter:
            for name, content in written.adapter.items():
                (shared / name).write_bytes(content)
        elif written.dense:  # none of a frozen prototype: prototype.seed in propetl.json redraws it
            save_dense(written.dense, shared / DENSE_FILE[setup.method], dtype)
        if written.layer_masks.masks:
            save_masks(written.layer_masks, shared / LAYER_MASKS_FILE, coding)
        for index, task in enumerate(written.tasks):
            part = folder / TASKS_DIR / task
            part.mkdir(parents=True)
            if written.task_masks:
                save_masks(written.task_masks[index], part / TASK_MASK_FILE, coding)
            save_dense(written.heads[index], part / HEAD_FILE, dtype)
            (part / "task.json").write_text(json.dumps({"task": task, "num_labels": written.num_labels[index]}))
            seal(part)
        config = checkpoint_config(setup, written.tasks, written.num_labels, written.has_task_masks)
        (shared / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        seal(shared)

    return write_folder_atomically(directory, build)


# ----------------------------------------------------------------------------- reading


@contextmanager
def _reading(path: Path):
    """A safetensors file that cannot be read (truncated, corrupted) as a one-line error."""
    try:
        yield
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"cannot read {path}: {str(error).splitlines()[0]}") from None


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """safetensors only (never pickle); a truncated or corrupted file gives a one-line error."""
    with _reading(path):
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(str(path)), metadata


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """The names and shapes of a safetensors file's tensors, from its header (nothing is loaded)."""
    with _reading(path), safe_open(str(path), framework="pt") as f:
        return {name: list(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118 (a safetensors handle, not a dict)


def read_checkpoint_config(directory: Path) -> dict:
    """A checkpoint's shared/propetl.json, once its folder matches its manifest and every value is valid
    (check_config); a folder of formats 1-3 (upgradable_format) or anything else wrong: one line."""
    directory = Path(directory)
    version = upgradable_format(directory)
    if version is not None:
        raise CheckpointError(
            f"{directory} is a checkpoint of format {version}; this propetl reads format {FORMAT_VERSION}: "
            f"run `propetl-upgrade {directory} NEW_FOLDER` to rewrite it"
        )
    folder = directory / SHARED_DIR
    check_seal(folder, required=True)
    config = read_json(folder / CONFIG_FILE)
    _check_value(folder / CONFIG_FILE, "format_version", config.get("format_version"), FORMAT_RULE)
    check_config(config, folder / CONFIG_FILE)
    return config


def upgradable_format(directory: Path) -> int | None:
    """The format_version (1-3) of a checkpoint propetl-upgrade rewrites (its propetl.json in the folder, or in
    shared/), peeked at before any seal is checked: it only picks the error; None for any other folder."""
    for path in (directory / CONFIG_FILE, directory / SHARED_DIR / CONFIG_FILE):
        try:
            version = json.loads(path.read_bytes()).get("format_version")
        except (OSError, ValueError, AttributeError):  # missing, not JSON, not an object
            continue
        if rules.integer().accepts(version) and version in UPGRADABLE_FORMATS:
            return version
    return None


def read_json(path: Path) -> dict:
    """A checkpoint's JSON object (propetl.json), or one line."""
    try:
        config = json.loads(path.read_bytes())
    except (OSError, ValueError) as error:  # ValueError: not UTF-8, not JSON
        raise CheckpointError(f"cannot read {path}: {str(error).splitlines()[0]}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} holds a {type(config).__name__}, not a checkpoint config (a JSON object)")
    return config


def _check_value(path: Path, key: str, value, rule: rules.Rule) -> None:
    if not rule.accepts(value):
        raise CheckpointError(f"{path}: {key}={value!r} is invalid; allowed: {rule.allowed}")


def check_config(config: dict, path: Path) -> None:
    """Every value of a checkpoint config by the rules of the command line's config (validate.validate_method and
    validate.RUN_RULES: names against the registry before any is used to open a config, a folder or a module), and
    the checkpoint's own keys (the tasks and their label counts, task_masks); the first invalid one in one line."""
    for section in (*CONFIG_SECTIONS, *(s for s in OPTIONAL_SECTIONS if s in config)):
        _check_value(path, section, config.get(section), OBJECT)
    try:
        cfg = OmegaConf.create(config)
        validate.check_resolves(cfg)
        validate.validate_method(cfg)
    except ConfigError as error:
        raise CheckpointError(f"{path}: {error}") from None
    for key in SAVED_RUN_KEYS:
        section, name = key.split(".")
        if section in config:
            _check_value(path, key, config[section].get(name), validate.RUN_RULES[key])
    tasks: Any = config.get("tasks")  # a list of names once checked
    labels: Any = config.get("num_labels")
    _check_value(path, "tasks", tasks, TASK_LIST)
    for task in tasks:
        _check_value(path, "tasks", task, rules.one_of((*group_choices("task"), UNNAMED_TASK)))
    _check_value(
        path,
        "num_labels",
        labels,
        rules.Rule(
            lambda v: isinstance(v, dict) and set(v) == set(tasks),
            f"an object of each task's label count ({', '.join(tasks)})",
        ),
    )
    for task in tasks:
        _check_value(path, f"num_labels.{task}", labels[task], rules.positive_int())
    _check_value(path, "task_masks", config.get("task_masks"), validate.BOOLEAN)


def single_task_config(config: dict, directory: Path) -> dict:
    """A checkpoint config (read_checkpoint_config) of one task with its `task` (name, num_labels), as the
    one-task readers use it; one of several tasks, or with task masks, is refused in one line."""
    tasks = config["tasks"]
    if len(tasks) != 1 or config["task_masks"]:
        raise CheckpointError(
            f"{directory} is a multi-task checkpoint (tasks {', '.join(tasks)}); this reads one "
            f"task's checkpoint (a run of task=NAME); checkpoint.load_multitask reads it"
        )
    name = tasks[0]
    return {
        **config,
        "task": {"name": None if name == UNNAMED_TASK else name, "num_labels": config["num_labels"][name]},
    }


def load_checkpoint(directory: Path, config: dict | None = None) -> tuple[backbone.MultiTaskModel, DictConfig]:
    """A one-task checkpoint as the one-task MultiTaskModel, in eval mode, and its config with `task` (`config`: its
    read_checkpoint_config, if the caller has it: the folder is not hashed again)."""
    directory = Path(directory)
    config = read_checkpoint_config(directory) if config is None else config
    cfg = OmegaConf.create(single_task_config(config, directory))
    return load_multitask(directory, config=config)[0], cfg


def _copy_into(targets: Mapping[str, torch.Tensor], tensors: dict[str, torch.Tensor], path: Path) -> None:
    if set(targets) != set(tensors):
        missing, extra = sorted(set(targets) - set(tensors)), sorted(set(tensors) - set(targets))
        raise CheckpointError(f"{path}: tensors do not match the model (missing {missing[:3]}, unexpected {extra[:3]})")
    for name, target in targets.items():
        if tuple(target.shape) != tuple(tensors[name].shape):
            raise CheckpointError(
                f"{path}: '{name}' has shape {tuple(tensors[name].shape)}, the model needs {tuple(target.shape)}"
            )
        target.copy_(tensors[name])


# ----------------------------------------------------------------------------- into the MultiTaskModel


def check_can_add(directory: Path, config: dict, adding: list[str]) -> None:
    """Tasks can be added to a checkpoint of two or more tasks; one of a single task has no task masks: one line."""
    if not config["task_masks"]:
        raise CheckpointError(
            f"{directory} was trained on one task, with layer masks only: tasks can be added to a "
            f"multi-task checkpoint of two or more; train {', '.join([*config['tasks'], *adding])} "
            f"together"
        )


def load_multitask(
    directory: Path,
    tasks: list[str] | None = None,
    setup: ModelSetup | None = None,
    extra_tasks=(),
    for_training=False,
    config: dict | None = None,
    t5: nn.Module | None = None,
):
    """The MultiTaskModel (model.family=t5: the TextToTextModel) from `shared/` and the named tasks' folders (default:
    all), in eval mode, and the checkpoint's config. With a run's `setup`, its settings must match the checkpoint's;
    `extra_tasks` (task configs) get fresh masks and heads (adding tasks); `config`: its read_checkpoint_config, if the
    caller has it; `t5`: a loaded T5ForConditionalGeneration to put the method into (None: load the saved model's)."""
    directory = Path(directory)
    extra = [t.name for t in extra_tasks]
    saved = read_checkpoint_config(directory) if config is None else config
    if extra:
        check_can_add(directory, saved, extra)
    if setup is not None:
        run, trained = OmegaConf.create(setup.saved), OmegaConf.create(saved)
        for key in MATCH_KEYS:
            ours, theirs = plain_value(run, key), plain_value(trained, key)
            if ours != theirs:
                raise CheckpointError(f"{directory} was trained with {key}={theirs!r}, this run has {key}={ours!r}")
    names = list(saved["tasks"] if tasks is None else tasks)
    for name in names:
        if name not in saved["tasks"] or not (directory / TASKS_DIR / name).is_dir():
            raise CheckpointError(f"{directory} has no task {name!r}; it has: {', '.join(saved['tasks'])}")
    model = build_model(
        ModelSetup.from_checkpoint(saved),
        names + extra,
        [saved["num_labels"][n] for n in names] + [int(t.num_labels) for t in extra_tasks],
        for_training,
        saved["task_masks"],
        t5,
    )
    weights, method = methods.petl_weights(model), saved["method"]["name"]
    shared = directory / SHARED_DIR
    targets = {model.transformers_name(n): p for n, p in dense_parameters(model, method, model.head_names()).items()}
    dense_path, masks_path = shared / DENSE_FILE[method], shared / LAYER_MASKS_FILE
    dense = read_safetensors(dense_path)[0] if targets or dense_path.exists() else {}  # none: a frozen prototype
    _, layer_masks = split_task_layer(weights.mask_stores()) if weights is not None else ({}, {})
    masks = read_masks(masks_path) if layer_masks else {}
    with torch.no_grad():
        if not methods.uses_peft(model):
            _copy_into(targets, dense, dense_path)
        elif unmatched := methods.peft_module().load_adapter(model, dense):  # PEFT's file into its tuner
            raise CheckpointError(f"{dense_path}: tensors do not match the model's PEFT tuner ({unmatched[:3]})")
        for name, mask in layer_masks.items():
            if name not in masks:
                raise CheckpointError(f"{masks_path}: no mask for '{name}'")
            try:
                mask.load_binary(masks[name])
            except ValueError as error:  # another sparsity or shape than the config says
                raise CheckpointError(f"{masks_path}: mask '{name}': {error}") from None
    load_task_parts(model, directory, names)
    return model.eval(), saved


def build_model(
    setup: ModelSetup,
    task_names: list[str],
    num_labels: list[int],
    for_training: bool,
    task_masks: bool,
    t5: nn.Module | None = None,
) -> backbone.MultiTaskModel | TextToTextModel:
    """A checkpoint's model, untrained: MultiTaskModel, or TextToTextModel (model.family=t5; into `t5` if given)."""
    if setup.model.text_to_text:
        return TextToTextModel(setup, task_names, t5, for_training, task_masks, num_labels=num_labels)
    if t5 is not None:
        raise CheckpointError(f"a {setup.model.name} checkpoint (model.family=encoder) is not loaded into a T5")
    return backbone.MultiTaskModel(setup, task_names, num_labels, for_training, task_masks=task_masks)


def load_task_parts(model: backbone.MultiTaskModel | TextToTextModel, directory: Path, names: list[str]) -> None:
    """Set the named tasks' mask rows and heads of a multi-task model from their folders, each checked against its
    manifest first (also after adding a task: the old tasks' parts back exactly as they were saved)."""
    weights = methods.petl_weights(model)
    task_masks, _ = split_task_layer(weights.mask_stores()) if weights is not None else ({}, {})
    with torch.no_grad():
        for name in names:
            index, part = model.task_names.index(name), Path(directory) / TASKS_DIR / name
            check_seal(part, required=True)
            if task_masks:
                rows = read_masks(part / TASK_MASK_FILE)
                for tensor, mask in task_masks.items():
                    row = rows.get(tensor)  # [1, *shape]
                    if row is None or tuple(row.shape) != (1, *mask.shape):
                        raise CheckpointError(f"{part / TASK_MASK_FILE}: no mask of shape {mask.shape} for '{tensor}'")
                    if int(row.sum()) != mask.ones_per_mask:
                        raise CheckpointError(
                            f"{part / TASK_MASK_FILE}: '{tensor}' has {int(row.sum())} ones, "
                            f"expected {mask.ones_per_mask} at sparsity {mask.sparsity}"
                        )
                    mask.scores[index].copy_(row.reshape(mask.shape))  # ones score 1, zeros 0: top-k gives them back
                    mask.invalidate()
            head, _ = read_safetensors(part / HEAD_FILE)
            targets: dict[str, nn.Parameter] = {}  # T5: no head
            if isinstance(model, backbone.MultiTaskModel):
                targets = dict(model.heads[name].named_parameters())
            _copy_into(targets, head, part / HEAD_FILE)
