"""Storage: what a task costs to keep, counted and written. All storage accounting lives here.

Counting (`account`):
  - trainable parameters: unique tensors (a shared tensor counts once), with and without the head;
  - stored parameters: the 32-bit floats a task must keep (ProPETL: the prototype ONCE; plain PETL:
    every layer's module; finetune: the whole backbone), plus mask bits (1 bit per mask entry);
  - bits, bytes, fp32-equivalent parameters, % of the backbone, and the ratio to plain PETL of the
    same prototype, each with and without the head.
Writing (`save_checkpoint` / `load_checkpoint`): a folder with
    propetl.json            what to rebuild (model, method, prototype, mask, task)
    prototype.safetensors   method=propetl: the shared tensors, once   | petl.safetensors: per-layer stacks
                            | backbone.safetensors: method=finetune
    masks.safetensors       every mask bit-packed (8 entries a byte), uint8
    head.safetensors        the task's classification head, apart so storage can be read with and without it
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

from propetl import methods
from propetl.masks import pack_bits, unpack_bits

FORMAT_VERSION = 1
CONFIG_FILE, MASKS_FILE, HEAD_FILE = "propetl.json", "masks.safetensors", "head.safetensors"
DENSE_FILE = {"propetl": "prototype.safetensors", "petl": "petl.safetensors", "finetune": "backbone.safetensors"}


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


def stored_dense_tensors(model: nn.Module, method: str, head_names: set[str]) -> dict[str, torch.Tensor]:
    """The float tensors a task keeps, without the head (ProPETL: the prototype once, as produced)."""
    weights = methods.petl_weights(model)
    if method == "finetune":
        return {n: p.detach() for n, p in model.named_parameters() if n not in head_names}
    with torch.no_grad():
        return {n: t.detach() for n, t in weights.base_tensors().items()}


def stored_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    weights = methods.petl_weights(model)
    return {} if weights is None else weights.binary_masks()


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
    return figures


def file_sizes(checkpoint_dir: Path) -> dict:
    """Bytes of the files actually written, with and without the head file."""
    files = {p.name: p.stat().st_size for p in sorted(Path(checkpoint_dir).iterdir()) if p.suffix == ".safetensors"}
    without_head = sum(size for name, size in files.items() if name != HEAD_FILE)
    return {"file_bytes": without_head, "file_bytes_with_head": sum(files.values()),
            **{f"file_bytes/{name}": size for name, size in files.items()}}


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
    keep["data"] = {"protocol": cfg.data.protocol, "split_seed": int(cfg.data.split_seed), "max_length": int(cfg.data.max_length)}
    return {"format_version": FORMAT_VERSION, **keep}


def save_checkpoint(model: nn.Module, cfg, head_names: set[str], directory: Path) -> Path:
    """Write the task's checkpoint folder atomically (built beside it, then renamed into place)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.", suffix=".tmp"))
    try:
        method = cfg.method.name
        dense = {n: t.contiguous().cpu() for n, t in stored_dense_tensors(model, method, head_names).items()}
        save_file(dense, str(building / DENSE_FILE[method]))
        masks = stored_masks(model)
        if masks:
            packed = {n: pack_bits(m) for n, m in masks.items()}
            shapes = {n: list(m.shape) for n, m in masks.items()}
            save_file(packed, str(building / MASKS_FILE), metadata={"shapes": json.dumps(shapes, separators=(",", ":"))})
        save_file({n: t.contiguous().cpu() for n, t in head_tensors(model, head_names).items()}, str(building / HEAD_FILE))
        (building / CONFIG_FILE).write_text(json.dumps(checkpoint_config(cfg), indent=2))
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
    if config.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {config.get('format_version')!r}, this propetl reads {FORMAT_VERSION}")
    return config


def load_checkpoint(directory: Path) -> tuple[nn.Module, "OmegaConf"]:
    """Rebuild the trained model from a checkpoint folder. Returns (model in eval mode, its config)."""
    from propetl import model as model_module  # late import: model imports methods, storage must stay light

    directory = Path(directory)
    cfg = OmegaConf.create(read_checkpoint_config(directory))
    model = model_module.build(cfg, int(cfg.task.num_labels), for_training=False)
    head_names = model_module.head_parameter_names(model)
    method = cfg.method.name
    dense, _ = read_safetensors(directory / DENSE_FILE[method])
    head, _ = read_safetensors(directory / HEAD_FILE)
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        if method == "finetune":
            _copy_into({n: parameters[n] for n in parameters if n not in head_names}, dense, directory / DENSE_FILE[method])
        else:
            weights = methods.petl_weights(model)
            _copy_into(dict(weights.weights.items()), dense, directory / DENSE_FILE[method])
            if weights.masks and any(m.kind != "none" for m in weights.masks.values()):
                packed, metadata = read_safetensors(directory / MASKS_FILE)
                shapes = json.loads(metadata.get("shapes", "{}"))
                for name, mask in weights.masks.items():
                    if name not in packed:
                        raise CheckpointError(f"{directory / MASKS_FILE}: no mask for '{name}'")
                    try:
                        mask.load_binary(unpack_bits(packed[name], tuple(shapes[name])))
                    except ValueError as error:     # another sparsity or shape than propetl.json says
                        raise CheckpointError(f"{directory / MASKS_FILE}: mask '{name}': {error}") from None
        _copy_into({n: parameters[n] for n in head_names}, head, directory / HEAD_FILE)
    return model.eval(), cfg


def _copy_into(targets: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], path: Path) -> None:
    if set(targets) != set(tensors):
        missing, extra = sorted(set(targets) - set(tensors)), sorted(set(tensors) - set(targets))
        raise CheckpointError(f"{path}: tensors do not match the model (missing {missing[:3]}, unexpected {extra[:3]})")
    for name, target in targets.items():
        if tuple(target.shape) != tuple(tensors[name].shape):
            raise CheckpointError(f"{path}: '{name}' has shape {tuple(tensors[name].shape)}, the model needs {tuple(target.shape)}")
        target.copy_(tensors[name])
