"""Checkpoints: the folder a trained task is kept in, written and read. (What it costs: accounting.py.)

`save_checkpoint` / `load_checkpoint` write and rebuild a folder with
    propetl.json            what to rebuild (model, method, prototype, mask, task) and how it is stored
    prototype.safetensors   method=propetl: the shared tensors, once   | petl.safetensors: per-layer stacks
                            | backbone.safetensors: method=finetune    | peft.safetensors: PEFT's lora_A /
                            lora_B of every layer, under the model's parameter names (method=peft)
    masks.safetensors       every mask, coded as `storage.mask_coding` says (propetl/mask_coding.py)
    head.safetensors        the task's classification head, apart so storage can be read with and without it
    manifest.json           the sha256 of every file above (propetl/files.py), written last
Dense tensors are written in `storage.dtype` (fp32, bf16, fp16) and loaded back as fp32. Format 2 adds the
coded masks file and the dtype; format 3 (this one) the manifest, checked before anything is read: a
changed, missing or unlisted file is refused in one line naming it. Format-1 and -2 checkpoints (bit-packed
masks, fp32; no manifest) still load, checked as before (safetensors headers, shapes, mask densities).
The names a checkpoint gives (method, prototype, mask kind, storage, tasks) are checked against the
registry before any is used (check_names). The folder is built beside its place and renamed: a crash never
leaves a half-written checkpoint. A multi-task model ships as shared/ + tasks/<task>/ (save_multitask).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from propetl import mask_coding, methods
from propetl import model as backbone
from propetl.accounting import (
    STORAGE_DTYPES, dense_parameters, head_tensors, multitask_mask_files, split_task_layer, storage_settings,
    stored_dense_tensors, stored_masks
)
from propetl.configs import plain_value
from propetl.files import CheckpointError, check_seal, seal, write_folder_atomically
FORMAT_VERSION = 3
READABLE_FORMATS = (1, 2, 3)
SEALED_FORMAT = 3                     # from this format on, every checkpoint folder carries a manifest
MASKS_FILE = mask_coding.MASKS_FILE
CONFIG_FILE, HEAD_FILE = "propetl.json", "head.safetensors"
DENSE_FILE = {"propetl": "prototype.safetensors", "petl": "petl.safetensors", "finetune": "backbone.safetensors",
              "peft": "peft.safetensors"}


def file_sizes(checkpoint_dir: Path) -> dict:
    """Bytes of the files actually written, with and without the head file."""
    files = {p.name: p.stat().st_size for p in sorted(Path(checkpoint_dir).iterdir()) if p.suffix == ".safetensors"}
    without_head = sum(size for name, size in files.items() if name != HEAD_FILE)
    return {"file_bytes": without_head, "file_bytes_with_head": sum(files.values()),
            **{f"file_bytes/{name}": size for name, size in files.items()}}


def file_figures(checkpoint_dir: Path, figures: dict) -> dict:
    """The sizes of the files written (file_sizes; multi-task: multitask_file_sizes) and what they mean
    beside the run's counted `figures` (account / account_multitask): bits per mask entry of the masks
    files (whole files, headers included), and the files without heads over plain PETL stored in the same
    dtype (multi-task: amortised per task)."""
    directory = Path(checkpoint_dir)
    tasks = figures.get("tasks")
    out = multitask_file_sizes(directory) if tasks else file_sizes(directory)
    masks = sum(p.stat().st_size for p in directory.rglob("*.safetensors")
                if p.name in (MASKS_FILE, LAYER_MASKS_FILE, TASK_MASK_FILE))
    if figures.get("mask_entries"):
        out["file_mask_bits_per_entry"] = 8 * masks / figures["mask_entries"]
    ratio_key = "file_amortised_ratio_to_plain_petl" if tasks else "file_ratio_to_plain_petl"
    out[ratio_key] = out["file_bytes"] / (tasks or 1) / figures["plain_petl_bytes_as_stored"]
    return out


# ----------------------------------------------------------------------------- writing

def checkpoint_config(cfg) -> dict:
    """What load_checkpoint needs to rebuild the model (resolved plain values)."""
    keep = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("model", "prototype", "method", "mask")}
    keep["task"] = {"name": cfg.task.name, "num_labels": int(cfg.task.num_labels)}
    if cfg.get("data") is not None:           # a run's data split (propetl-eval re-makes it); the Python API has none
        keep["data"] = {"protocol": cfg.data.protocol, "split_seed": int(cfg.data.split_seed),
                        "max_length": int(cfg.data.max_length)}
    return {"format_version": FORMAT_VERSION, **keep, "storage": storage_settings(cfg)}


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


def save_checkpoint(model: nn.Module, cfg, head_names: set[str], directory: Path, rename=lambda name: name) -> Path:
    """Write the task's checkpoint folder atomically (built beside it, then renamed into place); every tensor
    under `rename(its name)` (a one-task MultiTaskModel: transformers_name, the names load_checkpoint knows)."""
    def renamed(tensors: dict) -> dict:
        return {rename(name): tensor for name, tensor in tensors.items()}

    def build(folder: Path) -> None:
        method = cfg.method.name
        save_dense(renamed(stored_dense_tensors(model, method, head_names)), folder / DENSE_FILE[method], cfg)
        masks = stored_masks(model)
        if masks:
            save_masks(renamed(masks), folder / MASKS_FILE, cfg)
        save_dense(renamed(head_tensors(model, head_names)), folder / HEAD_FILE, cfg)
        (folder / CONFIG_FILE).write_text(json.dumps(checkpoint_config(cfg), indent=2))
        seal(folder)
    return write_folder_atomically(directory, build)


# ----------------------------------------------------------------------------- reading

def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """safetensors only (never pickle); a truncated or corrupted file gives a one-line error."""
    try:
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(str(path)), metadata
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"cannot read {path}: {str(error).splitlines()[0]}") from None


def read_checkpoint_config(directory: Path) -> dict:
    """A checkpoint folder's propetl.json, once the folder matches its manifest (format 3 on: required) and
    the names it gives are the registry's (check_names); else a one-line CheckpointError."""
    directory = Path(directory)
    path = directory / CONFIG_FILE
    sealed = check_seal(directory, required=False)
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
        check_seal(directory, required=True, hint=f"format {version} checkpoints carry one")
    check_names(config, path)
    return config


def _check_choice(path: Path, key: str, value, choices) -> None:
    if not isinstance(value, str) or value not in choices:
        raise CheckpointError(f"{path}: {key}={value!r} is invalid; allowed: {', '.join(map(str, choices))}")


def check_names(config: dict, path: Path) -> None:
    """Every name a checkpoint config gives, against the registry, before any is used (to open a config, a
    folder, a module): method, prototype, mask kind and combine, the storage settings, the task(s). Tasks
    are the task group's options on the run's config search path."""
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
    if config.get("mode") == "multitask":
        tasks, labels = config.get("tasks"), config.get("num_labels")
        if not isinstance(tasks, list) or not tasks or not isinstance(labels, dict) or set(labels) != set(tasks):
            raise CheckpointError(f"{path}: tasks={tasks!r} with num_labels={labels!r} is not a list of tasks "
                                  f"and their label counts")
        for task in tasks:
            _check_choice(path, "tasks", task, group_choices("task"))
        if not isinstance(config.get("task_masks", True), bool):
            raise CheckpointError(f"{path}: task_masks={config['task_masks']!r} is not true or false")
        return
    task = config.get("task")
    if not isinstance(task, dict):
        raise CheckpointError(f"{path}: 'task' is {task!r}, expected an object")
    if task.get("name") is not None:                    # the Python API's save_propetl knows no task
        _check_choice(path, "task.name", task["name"], group_choices("task"))


def load_checkpoint(directory: Path, config: dict | None = None) -> tuple[nn.Module, "OmegaConf"]:
    """Rebuild the trained model from a checkpoint folder (`config`: its read_checkpoint_config, if the caller
    has it: the folder is then not hashed again). Returns (model in eval mode, its config)."""
    directory = Path(directory)
    cfg = OmegaConf.create(read_checkpoint_config(directory) if config is None else config)
    method = cfg.method.name
    if method == "peft" and (missing := methods.peft_missing()):
        raise CheckpointError(f"{directory}: {missing}")
    model = backbone.build(cfg, int(cfg.task.num_labels), for_training=False)
    load_weights(model, cfg, backbone.head_parameter_names(model), directory)
    return model.eval(), cfg


def load_weights(model: nn.Module, cfg, head_names: set[str], directory: Path) -> None:
    """Copy a checkpoint folder's tensors (dense, masks, head) into `model`, built for inference with the
    checkpoint's config `cfg` (for_training=False)."""
    directory, method = Path(directory), cfg.method.name
    dense, _ = read_safetensors(directory / DENSE_FILE[method])
    head, _ = read_safetensors(directory / HEAD_FILE)
    parameters = dict(model.named_parameters())
    weights = methods.petl_weights(model)
    with torch.no_grad():
        _copy_into(dense_parameters(model, method, head_names), dense, directory / DENSE_FILE[method])
        stores = {} if weights is None else {n: m for n, m in weights.mask_stores().items() if m.kind != "none"}
        if stores:
            _load_masks(stores, read_masks(directory / MASKS_FILE), directory / MASKS_FILE)
        _copy_into({n: parameters[n] for n in head_names}, head, directory / HEAD_FILE)


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


# ----------------------------------------------------------------------------- multi-task
# checkpoint/
#   shared/propetl.json            model, method, prototype, mask, the tasks and their label counts
#   shared/prototype.safetensors   the prototype once (method=petl: petl.safetensors, one module per layer)
#   shared/layer_masks.safetensors the L layer masks of every masked tensor, coded (mask_coding)
#   tasks/<task>/task_mask.safetensors  this task's mask of every masked tensor, [1, *shape], coded
#   tasks/<task>/head.safetensors       this task's head
# A task ships as shared/ + tasks/<task>/; adding a task adds a folder and leaves the rest unchanged.

SHARED_DIR, TASKS_DIR = "shared", "tasks"
LAYER_MASKS_FILE, TASK_MASK_FILE = "layer_masks.safetensors", "task_mask.safetensors"
MULTITASK_MATCH_KEYS = methods.WithShapeKeys(("model.name_or_path", "method.name", "prototype.name", "mask.kind",
                                              "mask.sparsity", "mask.combine"))    # + every prototype's SHAPE_KEYS


def multitask_checkpoint_config(cfg, task_names: list[str], num_labels: list[int], task_masks: bool) -> dict:
    keep = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("model", "prototype", "method", "mask")}
    keep["data"] = {"protocol": cfg.data.protocol, "split_seed": int(cfg.data.split_seed), "max_length": int(cfg.data.max_length)}
    return {"format_version": FORMAT_VERSION, "mode": "multitask", "tasks": list(task_names),
            "num_labels": dict(zip(task_names, map(int, num_labels))), "task_masks": task_masks, **keep,
            "storage": storage_settings(cfg)}


def save_multitask(model: nn.Module, cfg, directory: Path) -> Path:
    """Write a multi-task checkpoint folder atomically: the shared part once, each task's part apart."""
    weights = methods.petl_weights(model)
    _, layer_masks = split_task_layer(weights.mask_stores())
    mask_files = multitask_mask_files(model, model.task_names)
    task_files = mask_files[1:] if layer_masks else mask_files

    def build(folder: Path) -> None:
        shared = folder / SHARED_DIR
        shared.mkdir()
        save_dense(weights.base_tensors(), shared / DENSE_FILE[cfg.method.name], cfg)
        if layer_masks:
            save_masks(mask_files[0], shared / LAYER_MASKS_FILE, cfg)
        for index, task in enumerate(model.task_names):
            part = folder / TASKS_DIR / task
            part.mkdir(parents=True)
            if task_files:
                save_masks(task_files[index], part / TASK_MASK_FILE, cfg)
            save_dense(dict(model.heads[task].named_parameters()), part / HEAD_FILE, cfg)
            (part / "task.json").write_text(json.dumps({"task": task, "num_labels": model.num_labels[index]}))
            seal(part)
        config = multitask_checkpoint_config(cfg, model.task_names, model.num_labels, model.task_masks)
        (shared / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        seal(shared)
    return write_folder_atomically(directory, build)


def read_multitask_config(directory: Path) -> dict:
    config = read_checkpoint_config(Path(directory) / SHARED_DIR)
    if config.get("mode") != "multitask":
        raise CheckpointError(f"{directory} is not a multi-task checkpoint")
    return config


def has_task_masks(config: dict) -> bool:
    """Whether a multi-task checkpoint (its read_multitask_config) has task masks: one of a single task trains
    layer masks only; older checkpoints lack the key and every run had them."""
    return config.get("task_masks", True)


def check_can_add(directory: Path, config: dict, adding: list[str]) -> None:
    """Tasks can be added to a multi-task checkpoint (its read_multitask_config) of two or more tasks; one of a
    single task has layer masks only, no task masks to add to: one line."""
    if not has_task_masks(config):
        raise CheckpointError(f"{directory} was trained on one task, with layer masks only: tasks can be added to a "
                              f"multi-task checkpoint of two or more; train {', '.join([*config['tasks'], *adding])} "
                              f"together")


def load_multitask(directory: Path, tasks: list[str] | None = None, cfg=None, extra_tasks=(), for_training=False):
    """Rebuild a multi-task model from `shared/` and the named tasks' folders (default: all). With
    `cfg`, its settings must match the checkpoint's; `extra_tasks` (task configs) get fresh masks and
    heads (adding tasks). Returns (model in eval mode, the checkpoint's config)."""

    directory = Path(directory)
    extra = [t.name for t in extra_tasks]
    saved = read_multitask_config(directory)
    if extra:
        check_can_add(directory, saved, extra)
    if cfg is not None:
        for key in MULTITASK_MATCH_KEYS:
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
    weights = methods.petl_weights(model)
    shared = directory / SHARED_DIR
    dense, _ = read_safetensors(shared / DENSE_FILE[saved["method"]["name"]])
    task_masks, layer_masks = split_task_layer(weights.mask_stores())
    with torch.no_grad():
        _copy_into(dict(weights.weights.items()), dense, shared / DENSE_FILE[saved["method"]["name"]])
        if layer_masks:
            _load_masks(layer_masks, read_masks(shared / LAYER_MASKS_FILE), shared / LAYER_MASKS_FILE)
    load_task_parts(model, directory, names, saved["format_version"])
    return model.eval(), saved


def load_task_parts(model: nn.Module, directory: Path, names: list[str], format_version: int | None = None) -> None:
    """Set the named tasks' mask rows and heads of a multi-task model from their checkpoint folders
    (also used after adding a task, to put the old tasks' parts back exactly as they were saved). Each
    task's folder is checked against its manifest first (required from format 3 on)."""
    if format_version is None:
        format_version = read_multitask_config(directory)["format_version"]
    task_masks, _ = split_task_layer(methods.petl_weights(model).mask_stores())
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


def multitask_file_sizes(directory: Path) -> dict:
    """Bytes on disk: the shared folder, and each task's folder with and without its head."""
    directory = Path(directory)
    def size(paths):
        return sum(p.stat().st_size for p in paths)
    shared = size((directory / SHARED_DIR).glob("*.safetensors"))
    per_task = {p.name: size(p.glob("*.safetensors")) for p in sorted((directory / TASKS_DIR).iterdir())}
    masks_only = {p.name: size(p.glob(TASK_MASK_FILE)) for p in sorted((directory / TASKS_DIR).iterdir())}
    return {"file_bytes_shared": shared, "file_bytes_task_masks": masks_only, "file_bytes_tasks_with_heads": per_task,
            "file_bytes": shared + sum(masks_only.values()), "file_bytes_with_heads": shared + sum(per_task.values())}
