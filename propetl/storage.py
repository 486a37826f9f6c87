"""Storage: what a task costs to keep, counted and written. All storage accounting lives here.

Counting (`account`):
  - trainable parameters: unique tensors (a shared tensor counts once), with and without the head;
  - stored parameters: the 32-bit floats a task must keep (ProPETL: the prototype ONCE; plain PETL:
    every layer's module; finetune: the whole backbone), plus mask bits (1 bit per mask entry);
  - bits, bytes, fp32-equivalent parameters, % of the backbone, and the ratio to plain PETL of the
    same prototype, each with and without the head (the paper's arithmetic: fp32 + 1 bit an entry);
  - as written: the dense tensors in `storage.dtype`, the masks in each coding of mask_coding (`bits`,
    `entropy`), their information bound log2 C(n, k), bits per mask entry and the ratio to plain PETL
    stored in the same dtype (`coding_figures`); `file_figures` reads the same off the written files.
Writing (`save_checkpoint` / `load_checkpoint`): a folder with
    propetl.json            what to rebuild (model, method, prototype, mask, task) and how it is stored
    prototype.safetensors   method=propetl: the shared tensors, once   | petl.safetensors: per-layer stacks
                            | backbone.safetensors: method=finetune    | peft.safetensors: PEFT's lora_A /
                            lora_B of every layer, under the model's parameter names (method=peft)
    masks.safetensors       every mask, coded as `storage.mask_coding` says (propetl/mask_coding.py)
    head.safetensors        the task's classification head, apart so storage can be read with and without it
Dense tensors are written in `storage.dtype` (fp32, bf16, fp16) and loaded back as fp32. Format 2 (this
one) adds the coded masks file and the dtype; format-1 checkpoints (bit-packed masks, fp32) still load.
Files are written under a temporary name and renamed: a crash never leaves a half-written checkpoint.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from propetl import mask_coding, methods

FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
STORAGE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CONFIG_FILE, MASKS_FILE, HEAD_FILE = "propetl.json", "masks.safetensors", "head.safetensors"
DENSE_FILE = {"propetl": "prototype.safetensors", "petl": "petl.safetensors", "finetune": "backbone.safetensors",
              "peft": "peft.safetensors"}


class CheckpointError(Exception):
    """One-line, user-facing error about a checkpoint."""


# ----------------------------------------------------------------------------- counting

def unique_parameters(parameters) -> list[nn.Parameter]:
    """Parameters deduplicated by identity: a tensor shared by many layers counts once."""
    seen, out = set(), []
    for p in parameters:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def count(parameters) -> int:
    return sum(p.numel() for p in unique_parameters(parameters))


def dense_parameters(model: nn.Module, method: str, head_names: set[str]) -> dict[str, torch.Tensor]:
    """Where a checkpoint's float tensors load into: the backbone (finetune), PEFT's LoRA pairs (peft),
    the PETL store's parameters (petl, propetl)."""
    if method == "finetune":
        return {n: p for n, p in model.named_parameters() if n not in head_names}
    if method == "peft":
        return methods.peft_parameters(model)
    return dict(methods.petl_weights(model).weights.items())


def stored_dense_tensors(model: nn.Module, method: str, head_names: set[str]) -> dict[str, torch.Tensor]:
    """The float tensors a task keeps, without the head (ProPETL: the prototype once, as produced)."""
    if method in ("finetune", "peft"):
        return {n: p.detach() for n, p in dense_parameters(model, method, head_names).items()}
    with torch.no_grad():
        return {n: t.detach() for n, t in methods.petl_weights(model).base_tensors().items()}


def stored_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    weights = methods.petl_weights(model)
    return {} if weights is None else weights.binary_masks()


def backbone_params(model: nn.Module, head_names: set[str]) -> int:
    """Parameters of the pre-trained backbone: everything but the head(s) and the PETL store (or PEFT's LoRA)."""
    added = methods.peft_parameters(model)
    return sum(p.numel() for n, p in model.named_parameters()
               if n not in head_names and n not in added and not n.startswith(methods.WEIGHTS_ATTRIBUTE + "."))


def plain_value(cfg, key: str):
    """cfg's value at a dotted key as plain python (containers resolved): for comparing configs."""
    value = OmegaConf.select(cfg, key)
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def head_tensors(model: nn.Module, head_names: set[str]) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if n in head_names}


def plain_petl_params(cfg, hidden: int, num_layers: int) -> int:
    """What plain PETL of the same prototype stores: every layer's own module, no masks."""
    specs = methods.PROTOTYPES[cfg.prototype.name].specs(cfg.prototype, hidden)
    return num_layers * sum(spec.numel for spec in specs.values())


def mask_bytes(entries_per_tensor: list[int]) -> int:
    """Bytes of bit-packed masks: each mask tensor is padded to whole bytes."""
    return sum(math.ceil(n / 8) for n in entries_per_tensor)


def account(model: nn.Module, cfg, head_names: set[str], backbone_params: int) -> dict:
    """Every storage figure of a run, as a flat dict of numbers (for metrics.json and W&B)."""
    method = cfg.method.name
    trainable = [p for p in model.parameters() if p.requires_grad]
    head = [p for n, p in model.named_parameters() if n in head_names]
    head_params = count(head)
    dense = stored_dense_tensors(model, method, head_names)
    masks = stored_masks(model)
    stored_params = sum(t.numel() for t in dense.values())
    mask_entries = sum(m.numel() for m in masks.values())
    mask_ones = int(sum(float(m.sum()) for m in masks.values()))
    bits = 32 * stored_params + mask_entries
    size_bytes = 4 * stored_params + mask_bytes([m.numel() for m in masks.values()])
    fp32_equivalent = stored_params + mask_entries / 32
    if method == "finetune":
        plain = backbone_params
    else:
        plain = plain_petl_params(cfg, model.config.hidden_size, model.config.num_hidden_layers)
    figures = {
        "backbone_params": backbone_params,
        "head_params": head_params,
        "trainable_params": count(trainable) - head_params,
        "trainable_params_with_head": count(trainable),
        "prototype_params": stored_params if method == "propetl" else 0,
        "stored_params": stored_params,
        "mask_entries": mask_entries,
        "mask_ones": mask_ones,
        "mask_density": (mask_ones / mask_entries) if mask_entries else None,
        "plain_petl_params": plain,
        "storage_bits": bits,
        "storage_bytes": size_bytes,
        "storage_fp32_params": fp32_equivalent,
        "storage_percent_of_backbone": 100.0 * fp32_equivalent / backbone_params,
        "storage_ratio_to_plain_petl": fp32_equivalent / plain,
        "storage_bits_with_head": bits + 32 * head_params,
        "storage_bytes_with_head": size_bytes + 4 * head_params,
        "storage_fp32_params_with_head": fp32_equivalent + head_params,
        "storage_percent_of_backbone_with_head": 100.0 * (fp32_equivalent + head_params) / backbone_params,
        "storage_ratio_to_plain_petl_with_head": (fp32_equivalent + head_params) / (plain + head_params),
    }
    width = dtype_bytes(cfg)
    figures.update(storage_settings(cfg), dense_bytes=width * stored_params, plain_petl_bytes_as_stored=width * plain)
    figures.update(coding_figures([masks], width * stored_params, width * plain))
    return figures


def storage_settings(cfg) -> dict:
    """How a run's checkpoint is written: {"mask_coding": ..., "dtype": ...} (cfg.storage)."""
    return {"mask_coding": str(cfg.storage.mask_coding), "dtype": str(cfg.storage.dtype)}


def dtype_bytes(cfg) -> int:
    """Bytes of one stored dense value in cfg.storage.dtype."""
    return STORAGE_DTYPES[cfg.storage.dtype].itemsize


def coding_figures(mask_files: list[dict[str, torch.Tensor]], dense_bytes: int, plain_bytes: float,
                   tasks: int = 1, ratio_key: str = "storage_ratio_to_plain_petl") -> dict:
    """The masks' information bound Σ log2 C(n, k) and, for each coding, their coded bytes (each dict of
    `mask_files` one masks file: digest + payload, as format 2 writes them), bits per mask entry, and
    `ratio_key`/<coding>: (dense_bytes + those bytes) / tasks / plain_bytes; `ratio_key`/bound the same
    with the information bound in place of the coded bytes."""
    entries = sum(m.numel() for masks in mask_files for m in masks.values())
    information = sum(mask_coding.information_bits_of(masks) for masks in mask_files)
    out = {"mask_information_bits": information,
           "mask_bits_per_entry_bound": information / entries if entries else None,
           f"{ratio_key}/bound": (dense_bytes + information / 8) / tasks / plain_bytes}
    for coding in mask_coding.CODINGS:
        size = sum(mask_coding.coded_bytes(masks, coding) for masks in mask_files)
        out.update({f"mask_bytes/{coding}": size, f"mask_bits_per_entry/{coding}": 8 * size / entries if entries else None,
                    f"{ratio_key}/{coding}": (dense_bytes + size) / tasks / plain_bytes})
    return out


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

def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file in the same folder and rename: readers never see half a file."""
    path = Path(path)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def checkpoint_config(cfg) -> dict:
    """What load_checkpoint needs to rebuild the model (resolved plain values)."""
    keep = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("model", "prototype", "method", "mask")}
    keep["task"] = {"name": cfg.task.name, "num_labels": int(cfg.task.num_labels)}
    if cfg.get("data") is not None:           # a run's data split (propetl-eval re-makes it); the Python API has none
        keep["data"] = {"protocol": cfg.data.protocol, "split_seed": int(cfg.data.split_seed),
                        "max_length": int(cfg.data.max_length)}
    return {"format_version": FORMAT_VERSION, **keep, "storage": storage_settings(cfg)}


def recover_folder_swap(directory: Path) -> bool:
    """After a kill between the two renames of write_folder_atomically's swap, `directory` is missing and
    its previous version waits in `.<name>.old`: put that back. True if it did."""
    directory = Path(directory)
    old = directory.with_name(f".{directory.name}.old")
    if directory.exists() or not old.is_dir():
        return False
    os.replace(old, directory)
    return True


def write_folder_atomically(directory: Path, build) -> Path:
    """Call build(folder) on a temporary folder beside `directory`, then rename it into place (an
    existing folder is replaced only once the new one is complete)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    recover_folder_swap(directory)
    building = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.", suffix=".tmp"))
    try:
        os.chmod(building, 0o755)                   # mkdtemp makes it owner-only
        build(building)
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
            os.replace(building, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(building, directory)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return directory


def save_masks(masks: dict[str, torch.Tensor], path: Path, cfg) -> None:
    """0/1 masks -> one safetensors file, coded as cfg.storage.mask_coding says (mask_coding.encode)."""
    tensors, metadata = mask_coding.encode(masks, cfg.storage.mask_coding)
    save_file(tensors, str(path), metadata=metadata)


def read_masks(path: Path) -> dict[str, torch.Tensor]:
    """A masks file of either format -> {name: 0/1 float tensor}; a corrupted one gives a one-line error."""
    tensors, metadata = read_safetensors(path)
    try:
        return mask_coding.decode(tensors, metadata)
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


def save_checkpoint(model: nn.Module, cfg, head_names: set[str], directory: Path) -> Path:
    """Write the task's checkpoint folder atomically (built beside it, then renamed into place)."""
    def build(folder: Path) -> None:
        method = cfg.method.name
        save_dense(stored_dense_tensors(model, method, head_names), folder / DENSE_FILE[method], cfg)
        masks = stored_masks(model)
        if masks:
            save_masks(masks, folder / MASKS_FILE, cfg)
        save_dense(head_tensors(model, head_names), folder / HEAD_FILE, cfg)
        (folder / CONFIG_FILE).write_text(json.dumps(checkpoint_config(cfg), indent=2))
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
    path = Path(directory) / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"cannot read {path}: {error}") from None
    if config.get("format_version") not in READABLE_FORMATS:
        raise CheckpointError(f"{path}: format_version {config.get('format_version')!r}, this propetl reads "
                              f"{', '.join(map(str, READABLE_FORMATS))}")
    return config


def load_checkpoint(directory: Path) -> tuple[nn.Module, "OmegaConf"]:
    """Rebuild the trained model from a checkpoint folder. Returns (model in eval mode, its config)."""
    from propetl import model as model_module  # late import: model imports methods, storage must stay light

    directory = Path(directory)
    cfg = OmegaConf.create(read_checkpoint_config(directory))
    method = cfg.method.name
    if method == "peft" and (missing := methods.peft_missing()):
        raise CheckpointError(f"{directory}: {missing}")
    model = model_module.build(cfg, int(cfg.task.num_labels), for_training=False)
    load_weights(model, cfg, model_module.head_parameter_names(model), directory)
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


def _split_task_layer(stores: dict) -> tuple[dict, dict]:
    """mask_stores() of a multi-task store -> ({tensor: task LayerMasks}, {tensor: layer LayerMasks})."""
    tasks = {n[:-len("@task")]: m for n, m in stores.items() if n.endswith("@task") and m.kind != "none"}
    layers = {n[:-len("@layer")]: m for n, m in stores.items() if n.endswith("@layer") and m.kind != "none"}
    return tasks, layers


def account_multitask(model: nn.Module, cfg, task_names: list[str], backbone_params: int) -> dict:
    """Storage of one multi-task model for N tasks: the shared part once (prototype in fp32, layer mask
    bits), the per-task part N times (task mask bits; the head), total and amortised per task, against
    N separate single-task ProPETL runs and plain PETL per task; and as written (coding_figures: the
    dense tensors in storage.dtype, the masks in each coding, amortised over the tasks)."""
    weights = methods.petl_weights(model)
    shared_params = sum(t.numel() for t in weights.base_tensors().values())
    task_masks, layer_masks = _split_task_layer(weights.mask_stores())
    layer_entries = [m.count * m.entries_per_mask for m in layer_masks.values()]
    task_entries = [m.entries_per_mask for m in task_masks.values()]                    # per task
    n = len(task_names)
    shared_bytes = 4 * shared_params + mask_bytes(layer_entries)
    task_bytes = mask_bytes(task_entries)
    heads = {t: count(model.heads[t].parameters()) for t in task_names}
    total = shared_bytes + n * task_bytes
    total_with_heads = total + 4 * sum(heads.values())
    plain_params = plain_petl_params(cfg, model.config.hidden_size, model.config.num_hidden_layers)
    plain = 4 * plain_params
    separate = shared_bytes               # one single-task run: the prototype + its L layer masks (or one PETL set)
    return {
        "tasks": n, "backbone_params": backbone_params, "shared_params": shared_params,
        "layer_mask_entries": sum(layer_entries), "task_mask_entries_per_task": sum(task_entries),
        "shared_bytes": shared_bytes, "task_mask_bytes_per_task": task_bytes,
        "head_params": heads, "head_bytes_per_task_mean": 4 * sum(heads.values()) / n,
        "total_bytes": total, "total_bytes_with_heads": total_with_heads,
        "amortised_bytes_per_task": total / n, "amortised_bytes_per_task_with_head": total_with_heads / n,
        "separate_single_task_bytes_per_task": separate, "plain_petl_bytes_per_task": plain,
        "amortised_ratio_to_separate": (total / n) / separate,
        "amortised_ratio_to_plain_petl": (total / n) / plain,
        "amortised_percent_of_backbone": 100.0 * (total / n) / (4 * backbone_params),
        **storage_settings(cfg), "mask_entries": sum(layer_entries) + n * sum(task_entries),
        "dense_bytes": dtype_bytes(cfg) * shared_params, "plain_petl_bytes_as_stored": dtype_bytes(cfg) * plain_params,
        **coding_figures(multitask_mask_files(model, task_names), dtype_bytes(cfg) * shared_params,
                         dtype_bytes(cfg) * plain_params, tasks=n, ratio_key="amortised_ratio_to_plain_petl"),
    }


def multitask_mask_files(model: nn.Module, task_names: list[str]) -> list[dict[str, torch.Tensor]]:
    """The masks of each masks file of a multi-task checkpoint: the layer masks, then each task's ([1, *shape])."""
    task_masks, layer_masks = _split_task_layer(methods.petl_weights(model).mask_stores())
    with torch.no_grad():
        layers = {n: m() for n, m in layer_masks.items()}
        tasks = {n: m() for n, m in task_masks.items()}
    files = [layers] if layers else []
    if tasks:
        files += [{n: m[i:i + 1] for n, m in tasks.items()} for i in range(len(task_names))]
    return files


def multitask_checkpoint_config(cfg, task_names: list[str], num_labels: list[int]) -> dict:
    keep = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("model", "prototype", "method", "mask")}
    keep["data"] = {"protocol": cfg.data.protocol, "split_seed": int(cfg.data.split_seed), "max_length": int(cfg.data.max_length)}
    return {"format_version": FORMAT_VERSION, "mode": "multitask", "tasks": list(task_names),
            "num_labels": dict(zip(task_names, map(int, num_labels))), **keep, "storage": storage_settings(cfg)}


def save_multitask(model: nn.Module, cfg, directory: Path) -> Path:
    """Write a multi-task checkpoint folder atomically: the shared part once, each task's part apart."""
    weights = methods.petl_weights(model)
    _, layer_masks = _split_task_layer(weights.mask_stores())
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
        config = multitask_checkpoint_config(cfg, model.task_names, model.num_labels)
        (shared / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return write_folder_atomically(directory, build)


def read_multitask_config(directory: Path) -> dict:
    config = read_checkpoint_config(Path(directory) / SHARED_DIR)
    if config.get("mode") != "multitask":
        raise CheckpointError(f"{directory} is not a multi-task checkpoint")
    return config


def load_multitask(directory: Path, tasks: list[str] | None = None, cfg=None, extra_tasks=(), for_training=False):
    """Rebuild a multi-task model from `shared/` and the named tasks' folders (default: all). With
    `cfg`, its settings must match the checkpoint's; `extra_tasks` (task configs) get fresh masks and
    heads (adding tasks). Returns (model in eval mode, the checkpoint's config)."""
    from propetl.multitask import MultiTaskModel     # late import: multitask imports storage

    directory = Path(directory)
    saved = read_multitask_config(directory)
    if cfg is not None:
        for key in MULTITASK_MATCH_KEYS:
            ours, theirs = plain_value(cfg, key), plain_value(OmegaConf.create(saved), key)
            if ours != theirs:
                raise CheckpointError(f"{directory} was trained with {key}={theirs!r}, this run has {key}={ours!r}")
    names = list(saved["tasks"] if tasks is None else tasks)
    for name in names:
        if not (directory / TASKS_DIR / name).is_dir():
            raise CheckpointError(f"{directory} has no task '{name}'; it has: {', '.join(saved['tasks'])}")
    extra = [t.name for t in extra_tasks]
    model = MultiTaskModel(OmegaConf.create(saved), names + extra,
                           [saved["num_labels"][n] for n in names] + [int(t.num_labels) for t in extra_tasks], for_training)
    weights = methods.petl_weights(model)
    shared = directory / SHARED_DIR
    dense, _ = read_safetensors(shared / DENSE_FILE[saved["method"]["name"]])
    task_masks, layer_masks = _split_task_layer(weights.mask_stores())
    with torch.no_grad():
        _copy_into(dict(weights.weights.items()), dense, shared / DENSE_FILE[saved["method"]["name"]])
        if layer_masks:
            _load_masks(layer_masks, read_masks(shared / LAYER_MASKS_FILE), shared / LAYER_MASKS_FILE)
    load_task_parts(model, directory, names)
    return model.eval(), saved


def load_task_parts(model: nn.Module, directory: Path, names: list[str]) -> None:
    """Set the named tasks' mask rows and heads of a multi-task model from their checkpoint folders
    (also used after adding a task, to put the old tasks' parts back exactly as they were saved)."""
    task_masks, _ = _split_task_layer(methods.petl_weights(model).mask_stores())
    with torch.no_grad():
        for name in names:
            index, part = model.task_names.index(name), Path(directory) / TASKS_DIR / name
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
