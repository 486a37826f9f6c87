"""Checkpoints: the folder a trained model is kept in, written and read. (What it costs: accounting.py.)

Every run, of one task or several, writes one layout (format 4; save_checkpoint):
    shared/propetl.json             what to rebuild: model, method, prototype, mask, the tasks and their label
                                    counts, whether there are task masks, the data split, how it is stored
    shared/<dense file>             DENSE_FILE[method]: propetl the prototype once, petl per-layer stacks,
                                    finetune the backbone, peft PEFT's lora_A / lora_B (transformers names)
    shared/layer_masks.safetensors  the L layer masks of every masked tensor, coded (mask_coding.py)
    tasks/<task>/task_mask.safetensors  several tasks: this task's mask of every masked tensor, [1, *shape]
    tasks/<task>/head.safetensors       this task's head (dense.*, classifier.*), apart so storage can be read
                                        with and without it
Each folder carries a manifest.json (files.py: the sha256 of its files), written last and checked before anything
is read. A task ships as shared/ + tasks/<task>/; adding a task adds a folder. Dense tensors are written in
`storage.dtype` and loaded back as fp32. The folder is built beside its place and renamed (never half-written).

Older checkpoints still load: formats 1-3 of one task are flat (propetl.json, the dense file, masks.safetensors,
head.safetensors under the transformers model's names; 1: bit-packed masks, no manifest; 2: coded masks and
dtype; 3: the manifest); formats 1-3 of several tasks have the layout above. A config's names are checked
against the registry before any is used (check_names). Readers: load_checkpoint (one task, into the
transformers model: propetl-eval, propetl-export, the Python API) and load_multitask (into the MultiTaskModel).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from propetl import mask_coding, methods
from propetl import model as backbone
from propetl.accounting import STORAGE_DTYPES, UNNAMED_TASK, dense_parameters, kept, split_task_layer, storage_settings
from propetl.configs import plain_value
from propetl.files import CheckpointError, check_seal, seal, write_folder_atomically
FORMAT_VERSION = 4
READABLE_FORMATS = (1, 2, 3, 4)
SEALED_FORMAT = 3                     # from this format on, every checkpoint folder carries a manifest
ONE_LAYOUT_FORMAT = 4                 # from this format on, one task or several: shared/ + tasks/<task>/
SHARED_DIR, TASKS_DIR = "shared", "tasks"
CONFIG_FILE, HEAD_FILE = "propetl.json", "head.safetensors"
LAYER_MASKS_FILE, TASK_MASK_FILE = mask_coding.LAYER_MASKS_FILE, "task_mask.safetensors"
MASKS_FILE = mask_coding.MASKS_FILE   # formats 1-3 of one task: the flat layout's masks file
DENSE_FILE = {"propetl": "prototype.safetensors", "petl": "petl.safetensors", "finetune": "backbone.safetensors",
              "peft": "peft.safetensors"}
MATCH_KEYS = methods.WithShapeKeys(("model.name_or_path", "method.name", "prototype.name", "mask.kind",
                                    "mask.sparsity", "mask.combine"))    # + every prototype's SHAPE_KEYS


def file_sizes(checkpoint_dir: Path) -> dict:
    """Bytes of the files written: each (file_bytes/<path in the folder>), all but the heads (file_bytes) and all."""
    directory = Path(checkpoint_dir)
    files = {p.relative_to(directory).as_posix(): p.stat().st_size for p in sorted(directory.rglob("*.safetensors"))}
    heads = sum(size for name, size in files.items() if name.endswith(HEAD_FILE))
    return {"file_bytes": sum(files.values()) - heads, "file_bytes_with_head": sum(files.values()),
            **{f"file_bytes/{name}": size for name, size in files.items()}}


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

def checkpoint_config(cfg, task_names: list[str], num_labels: list[int], task_masks: bool) -> dict:
    """shared/propetl.json: what load_checkpoint and load_multitask need to rebuild the model (plain values)."""
    keep = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("model", "prototype", "method", "mask")}
    if cfg.get("data") is not None:           # a run's data split (propetl-eval re-makes it); the Python API has none
        keep["data"] = {"protocol": cfg.data.protocol, "split_seed": int(cfg.data.split_seed),
                        "max_length": int(cfg.data.max_length)}
    return {"format_version": FORMAT_VERSION, "tasks": list(task_names),
            "num_labels": dict(zip(task_names, map(int, num_labels))), "task_masks": task_masks, **keep,
            "storage": storage_settings(cfg)}


def save_masks(masks: dict[str, torch.Tensor], path: Path, cfg) -> None:
    """0/1 masks -> one safetensors file, coded as cfg.storage.mask_coding says (mask_coding.encode)."""
    tensors, metadata = mask_coding.encode(masks, cfg.storage.mask_coding)
    save_file({name: torch.from_numpy(t) for name, t in tensors.items()}, str(path), metadata=metadata)


def read_masks(path: Path) -> dict[str, torch.Tensor]:
    """A masks file of either format -> {name: 0/1 float tensor}; a corrupted one gives a one-line error."""
    tensors, metadata = read_safetensors(path)
    try:
        return {name: torch.from_numpy(m) for name, m in mask_coding.decode(tensors, metadata).items()}
    except mask_coding.MaskCodingError as error:
        raise CheckpointError(f"{path}: {error}") from None


def save_dense(tensors: dict[str, torch.Tensor], path: Path, cfg) -> None:
    """Float tensors -> a safetensors file in cfg.storage.dtype (fp16 refuses values beyond its range)."""
    dtype = STORAGE_DTYPES[cfg.storage.dtype]
    out = {}
    for name, tensor in tensors.items():
        cast = tensor.detach().to(dtype).contiguous().cpu()
        if not torch.equal(cast.isfinite(), tensor.detach().cpu().isfinite()):
            raise CheckpointError(f"storage.dtype={cfg.storage.dtype}: '{name}' has values beyond its range "
                                  f"(largest |value| {float(tensor.detach().abs().max()):.4g}); use bf16 or fp32")
        out[name] = cast
    save_file(out, str(path))


def save_checkpoint(model: nn.Module, cfg, directory: Path) -> Path:
    """Write a checkpoint folder (format 4, the layout above) atomically. `model`: the MultiTaskModel of a run, or
    a transformers model with the method inside (accounting.kept: what is kept, counted by accounting.account)."""
    keep = kept(model, cfg)

    def build(folder: Path) -> None:
        shared = folder / SHARED_DIR
        shared.mkdir()
        save_dense(keep.dense, shared / DENSE_FILE[cfg.method.name], cfg)
        if keep.layer_masks:
            save_masks(keep.layer_masks, shared / LAYER_MASKS_FILE, cfg)
        for index, task in enumerate(keep.tasks):
            part = folder / TASKS_DIR / task
            part.mkdir(parents=True)
            if keep.task_masks:
                save_masks(keep.task_masks[index], part / TASK_MASK_FILE, cfg)
            save_dense(keep.heads[index], part / HEAD_FILE, cfg)
            (part / "task.json").write_text(json.dumps({"task": task, "num_labels": keep.num_labels[index]}))
            seal(part)
        config = checkpoint_config(cfg, keep.tasks, keep.num_labels, keep.has_task_masks)
        (shared / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        seal(shared)
    return write_folder_atomically(directory, build)


# ----------------------------------------------------------------------------- reading

def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """safetensors only (never pickle); a truncated or corrupted file gives a one-line error."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(str(path)), metadata
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"cannot read {path}: {str(error).splitlines()[0]}") from None


def read_checkpoint_config(directory: Path) -> dict:
    """A checkpoint's propetl.json (shared/, or the flat folder of formats 1-3), once its folder matches its
    manifest (required from format 3 on) and its names are the registry's (check_names); else one line."""
    directory = Path(directory)
    shared = directory / SHARED_DIR
    folder = shared if shared.is_dir() else directory
    path = folder / CONFIG_FILE
    sealed = check_seal(folder, required=False)
    try:
        config = json.loads(path.read_bytes())
    except (OSError, ValueError) as error:              # ValueError: not UTF-8, not JSON
        raise CheckpointError(f"cannot read {path}: {str(error).splitlines()[0]}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} holds a {type(config).__name__}, not a checkpoint config (a JSON object)")
    version = config.get("format_version")
    if version not in READABLE_FORMATS or isinstance(version, bool):
        raise CheckpointError(f"{path}: format_version {version!r}, this propetl reads "
                              f"{', '.join(map(str, READABLE_FORMATS))}")
    if version >= SEALED_FORMAT and not sealed:
        check_seal(folder, required=True, hint=f"format {version} checkpoints carry one")
    if version >= ONE_LAYOUT_FORMAT and (folder is not shared or "tasks" not in config):
        raise CheckpointError(f"{path}: format_version {version} keeps its config in {SHARED_DIR}/ and names its "
                              f"tasks ('tasks')")
    check_names(config, path)
    return config


def _check_choice(path: Path, key: str, value, choices) -> None:
    if not isinstance(value, str) or value not in choices:
        raise CheckpointError(f"{path}: {key}={value!r} is invalid; allowed: {', '.join(map(str, choices))}")


def check_names(config: dict, path: Path) -> None:
    """Every name a checkpoint config gives (method, prototype, mask kind and combine, storage, tasks) against the
    registry, before any is used to open a config, a folder or a module. Tasks: the task group's options."""
    from propetl.configs import group_choices
    from propetl.masks import COMBINES, MASK_KINDS

    for section in ("model", "method", "prototype", "mask"):
        if not isinstance(config.get(section), dict):
            raise CheckpointError(f"{path}: '{section}' is {config.get(section)!r}, expected an object")
    _check_choice(path, "method.name", config["method"].get("name"), methods.METHODS)
    _check_choice(path, "prototype.name", config["prototype"].get("name"), tuple(methods.PROTOTYPES))
    _check_choice(path, "mask.kind", config["mask"].get("kind"), MASK_KINDS)
    if "combine" in config["mask"]:                     # older checkpoints lack it
        _check_choice(path, "mask.combine", config["mask"]["combine"], COMBINES)
    if "storage" in config:                             # format 1 lacks it
        storage = config["storage"] if isinstance(config["storage"], dict) else {}
        _check_choice(path, "storage.dtype", storage.get("dtype"), tuple(STORAGE_DTYPES))
        _check_choice(path, "storage.mask_coding", storage.get("mask_coding"), mask_coding.CODINGS)
    if not isinstance(config["model"].get("name_or_path"), str):
        raise CheckpointError(f"{path}: model.name_or_path={config['model'].get('name_or_path')!r} is not a path")
    if "tasks" in config:                               # format 4, and several tasks of formats 1-3
        tasks, labels = config.get("tasks"), config.get("num_labels")
        if not isinstance(tasks, list) or not tasks or not isinstance(labels, dict) or set(labels) != set(tasks):
            raise CheckpointError(f"{path}: tasks={tasks!r} with num_labels={labels!r} is not a list of tasks "
                                  f"and their label counts")
        for task in tasks:
            _check_choice(path, "tasks", task, (*group_choices("task"), UNNAMED_TASK))
        if not isinstance(config.get("task_masks", True), bool):
            raise CheckpointError(f"{path}: task_masks={config['task_masks']!r} is not true or false")
        return
    task = config.get("task")
    if not isinstance(task, dict):
        raise CheckpointError(f"{path}: 'task' is {task!r}, expected an object")
    if task.get("name") is not None:                    # the Python API's save_propetl knows no task
        _check_choice(path, "task.name", task["name"], group_choices("task"))


def single_task_config(config: dict, directory: Path) -> dict:
    """A checkpoint config (read_checkpoint_config) of one task with its `task` (name, num_labels), as the
    transformers model's readers use it; one of several tasks, or with task masks, is refused in one line."""
    if "tasks" not in config:                           # formats 1-3 of one task
        return config
    tasks = config["tasks"]
    if len(tasks) != 1 or has_task_masks(config):
        raise CheckpointError(f"{directory} is a multi-task checkpoint (tasks {', '.join(tasks)}); this reads one "
                              f"task's checkpoint (a run of task=NAME); checkpoint.load_multitask reads it")
    name = tasks[0]
    return {**config, "task": {"name": None if name == UNNAMED_TASK else name, "num_labels": config["num_labels"][name]}}


def load_checkpoint(directory: Path, config: dict | None = None) -> tuple[nn.Module, "OmegaConf"]:
    """A one-task checkpoint as the transformers model with the method inside, in eval mode, and its config with
    `task` (`config`: its read_checkpoint_config, if the caller has it: the folder is not hashed again)."""
    directory = Path(directory)
    config = single_task_config(read_checkpoint_config(directory) if config is None else config, directory)
    cfg = OmegaConf.create(config)
    if cfg.method.name == "peft" and (missing := methods.peft_missing()):
        raise CheckpointError(f"{directory}: {missing}")
    model = backbone.build(cfg, int(cfg.task.num_labels), for_training=False)
    load_weights(model, cfg, backbone.head_parameter_names(model), directory)
    return model.eval(), cfg


def load_weights(model: nn.Module, cfg, head_names: set[str], directory: Path) -> None:
    """Copy a one-task checkpoint's tensors (dense, masks, head) into a transformers model built for inference
    with the checkpoint's config `cfg` (for_training=False; single_task_config)."""
    directory, method = Path(directory), cfg.method.name
    if cfg.get("tasks") is not None:                # format 4: shared/ + tasks/<task>/, the head under TaskHead's names
        shared, part = directory / SHARED_DIR, directory / TASKS_DIR / cfg.tasks[0]
        check_seal(part, required=cfg.format_version >= SEALED_FORMAT)
        dense_path, masks_path, head_path = shared / DENSE_FILE[method], shared / LAYER_MASKS_FILE, part / HEAD_FILE
        layout = backbone.head_layout(model)
    else:
        dense_path, masks_path, head_path = directory / DENSE_FILE[method], directory / MASKS_FILE, directory / HEAD_FILE
        layout = {}
    dense, _ = read_safetensors(dense_path)
    head, _ = read_safetensors(head_path)
    head = {backbone.swap_prefix(n, layout): t for n, t in head.items()}
    parameters = dict(model.named_parameters())
    weights = methods.petl_weights(model)
    with torch.no_grad():
        _copy_into(dense_parameters(model, method, head_names), dense, dense_path)
        stores = {} if weights is None else {n: m for n, m in weights.mask_stores().items() if m.kind != "none"}
        if stores:
            _load_masks(stores, read_masks(masks_path), masks_path)
        _copy_into({n: parameters[n] for n in head_names}, head, head_path)


def _load_masks(stores: dict, masks: dict[str, torch.Tensor], path: Path) -> None:
    for name, mask in stores.items():
        if name not in masks:
            raise CheckpointError(f"{path}: no mask for '{name}'")
        try:
            mask.load_binary(masks[name])
        except ValueError as error:     # another sparsity or shape than the config says
            raise CheckpointError(f"{path}: mask '{name}': {error}") from None


def _copy_into(targets: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], path: Path) -> None:
    if set(targets) != set(tensors):
        missing, extra = sorted(set(targets) - set(tensors)), sorted(set(tensors) - set(targets))
        raise CheckpointError(f"{path}: tensors do not match the model (missing {missing[:3]}, unexpected {extra[:3]})")
    for name, target in targets.items():
        if tuple(target.shape) != tuple(tensors[name].shape):
            raise CheckpointError(f"{path}: '{name}' has shape {tuple(tensors[name].shape)}, the model needs {tuple(target.shape)}")
        target.copy_(tensors[name])


# ----------------------------------------------------------------------------- into the MultiTaskModel

def read_multitask_config(directory: Path) -> dict:
    """The config of a checkpoint in the shared/ + tasks/ layout (format 4; several tasks of formats 1-3)."""
    config = read_checkpoint_config(Path(directory))
    if "tasks" not in config:
        raise CheckpointError(f"{directory} is a one-task checkpoint of format {config['format_version']} "
                              f"(flat): checkpoint.load_checkpoint reads it; tasks are added to a multi-task checkpoint")
    return config


def has_task_masks(config: dict) -> bool:
    """Whether a checkpoint has task masks: one task trains layer masks only; older ones (no key) always had them."""
    return config.get("task_masks", True)


def check_can_add(directory: Path, config: dict, adding: list[str]) -> None:
    """Tasks can be added to a checkpoint of two or more tasks; one of a single task has no task masks: one line."""
    if not has_task_masks(config):
        raise CheckpointError(f"{directory} was trained on one task, with layer masks only: tasks can be added to a "
                              f"multi-task checkpoint of two or more; train {', '.join([*config['tasks'], *adding])} "
                              f"together")


def load_multitask(directory: Path, tasks: list[str] | None = None, cfg=None, extra_tasks=(), for_training=False,
                   config: dict | None = None):
    """The MultiTaskModel from `shared/` and the named tasks' folders (default: all), in eval mode, and the
    checkpoint's config. With `cfg`, its settings must match the checkpoint's; `extra_tasks` (task configs) get
    fresh masks and heads (adding tasks); `config`: its read_multitask_config, if the caller has it."""
    directory = Path(directory)
    extra = [t.name for t in extra_tasks]
    saved = read_multitask_config(directory) if config is None else config
    if extra:
        check_can_add(directory, saved, extra)
    if cfg is not None:
        for key in MATCH_KEYS:
            ours, theirs = plain_value(cfg, key), plain_value(OmegaConf.create(saved), key)
            if ours != theirs:
                raise CheckpointError(f"{directory} was trained with {key}={theirs!r}, this run has {key}={ours!r}")
    names = list(saved["tasks"] if tasks is None else tasks)
    for name in names:
        if name not in saved["tasks"] or not (directory / TASKS_DIR / name).is_dir():
            raise CheckpointError(f"{directory} has no task {name!r}; it has: {', '.join(saved['tasks'])}")
    model = backbone.MultiTaskModel(OmegaConf.create(saved), names + extra,
                                    [saved["num_labels"][n] for n in names] + [int(t.num_labels) for t in extra_tasks],
                                    for_training, task_masks=has_task_masks(saved))
    weights, method = methods.petl_weights(model), saved["method"]["name"]
    shared = directory / SHARED_DIR
    dense, _ = read_safetensors(shared / DENSE_FILE[method])
    _, layer_masks = split_task_layer(weights.mask_stores()) if weights is not None else ({}, {})
    targets = {model.transformers_name(n): p for n, p in dense_parameters(model, method, model.head_names()).items()}
    with torch.no_grad():
        _copy_into(targets, dense, shared / DENSE_FILE[method])
        if layer_masks:
            _load_masks(layer_masks, read_masks(shared / LAYER_MASKS_FILE), shared / LAYER_MASKS_FILE)
    load_task_parts(model, directory, names, saved["format_version"])
    return model.eval(), saved


def load_task_parts(model: nn.Module, directory: Path, names: list[str], format_version: int | None = None) -> None:
    """Set the named tasks' mask rows and heads of a multi-task model from their folders, each checked against its
    manifest first (also after adding a task: the old tasks' parts back exactly as they were saved)."""
    if format_version is None:
        format_version = read_multitask_config(directory)["format_version"]
    weights = methods.petl_weights(model)
    task_masks, _ = split_task_layer(weights.mask_stores()) if weights is not None else ({}, {})
    with torch.no_grad():
        for name in names:
            index, part = model.task_names.index(name), Path(directory) / TASKS_DIR / name
            check_seal(part, required=format_version >= SEALED_FORMAT)
            if task_masks:
                rows = read_masks(part / TASK_MASK_FILE)
                for tensor, mask in task_masks.items():
                    row = rows.get(tensor)                        # [1, *shape] (format 1: [*shape])
                    if row is None or tuple(row.shape) not in (mask.shape, (1, *mask.shape)):
                        raise CheckpointError(f"{part / TASK_MASK_FILE}: no mask of shape {mask.shape} for '{tensor}'")
                    if int(row.sum()) != mask.ones_per_mask:
                        raise CheckpointError(f"{part / TASK_MASK_FILE}: '{tensor}' has {int(row.sum())} ones, "
                                              f"expected {mask.ones_per_mask} at sparsity {mask.sparsity}")
                    mask.scores[index].copy_(row.reshape(mask.shape))   # ones score 1, zeros 0: top-k gives them back
                    mask.invalidate()
            head, _ = read_safetensors(part / HEAD_FILE)
            _copy_into(dict(model.heads[name].named_parameters()), head, part / HEAD_FILE)
