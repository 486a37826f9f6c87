"""Storage accounting: what a task costs to keep, in parameters, bits and bytes; all counting lives here.
One `account`, of one task or several, from what the checkpoint keeps (`kept`): trainable parameters (unique tensors);
stored fp32 parameters (ProPETL: the prototype ONCE, none if frozen) plus 1 bit per mask entry; bits, bytes, % of
the backbone and the ratio to plain PETL, with and without the head, shared part once and per task; and as written
(`coding_figures`): dense tensors in `storage.dtype`, masks in each coding with their bound log2 C(n, k).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from propetl import methods
from propetl.configs import ModelSetup
from propetl.models import backbone
from propetl.models.t5 import TextToTextModel
from propetl.storage import mask_coding

STORAGE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
UNNAMED_TASK = "unnamed"  # the task of a checkpoint that names none (the Python API's save_propetl)


# ----------------------------------------------------------------------------- counting


def count(parameters) -> int:
    """Parameters counted once each however often they appear (a tensor shared by many layers counts once)."""
    return sum(p.numel() for p in {id(p): p for p in parameters}.values())


def dense_parameters(model: nn.Module, method: str, head_names: set[str]) -> dict[str, nn.Parameter]:
    """The method's own float tensors: backbone (finetune), the PEFT tuner's (peft), PETL store (petl, propetl)."""
    if method == "finetune":
        return {n: p for n, p in model.named_parameters() if n not in head_names}
    if method == "peft":
        return methods.peft_parameters(model)
    weights = petl_store(model)
    return {} if weights.frozen else dict(weights.weights.items())  # a frozen prototype: its seed, no tensor


def petl_store(model: nn.Module) -> methods.LayerWeights:
    """The PETL store of a model of method petl or propetl (which always has one)."""
    weights = methods.petl_weights(model)
    assert weights is not None, "method petl or propetl without a PETL store"
    return weights


def stored_dense_tensors(model: nn.Module, method: str, head_names: set[str]) -> dict[str, torch.Tensor]:
    """The float tensors a task keeps, without the head (ProPETL: the prototype once, as produced, none when it is
    frozen: prototype.seed regenerates it; peft: none here, PEFT's own files hold its tensors, Kept.adapter)."""
    if method == "peft":
        return {}
    if method == "finetune":
        return {n: p.detach() for n, p in dense_parameters(model, method, head_names).items()}
    with torch.no_grad():
        return {n: t.detach() for n, t in petl_store(model).stored_tensors().items()}


def stored_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """The 0/1 masks of a model by stored name ({} without a PETL store)."""
    weights = methods.petl_weights(model)
    return {} if weights is None else {name: m.cpu() for name, m in weights.binary_masks().items()}


def backbone_params(model: nn.Module, head_names: set[str]) -> int:
    """Parameters of the pre-trained backbone: everything but the head(s) and the PETL store (or PEFT's LoRA)."""
    added = methods.peft_parameters(model)
    return sum(
        p.numel()
        for n, p in model.named_parameters()
        if n not in head_names and n not in added and not n.startswith(methods.WEIGHTS_ATTRIBUTE + ".")
    )


def plain_petl_params(setup: ModelSetup, hidden: int, num_layers: int) -> int:
    """What plain PETL of the same prototype stores: every layer's own module, no masks."""
    prototype = methods.prototype_config(setup.saved["prototype"])
    specs = methods.PROTOTYPES[prototype.name].specs(prototype, hidden)
    return num_layers * sum(spec.numel for spec in specs.values())


def petl_sites(model: nn.Module) -> int:
    """How many modules plain PETL keeps: one per site (T5: every encoder and decoder block), else per layer."""
    if isinstance(model, TextToTextModel):
        return len(model.sites())
    config: Any = model.config
    return int(config.num_hidden_layers)


def mask_bytes(entries_per_tensor: list[int]) -> int:
    """Bytes of bit-packed masks: each mask tensor is padded to whole bytes."""
    return sum(math.ceil(n / 8) for n in entries_per_tensor)


def coding_figures(
    mask_files: list[MaskFile],
    dense_bytes: int,
    plain_bytes: float,
    tasks: int = 1,
    ratio_key: str = "storage_ratio_to_plain_petl",
) -> dict:
    """The masks' information bound Σ log2 C(n, k) and, per coding, their coded bytes (each of `mask_files` one
    masks file: digest + payload, as format 2 writes them), bits per mask entry, and `ratio_key`/<coding>:
    (dense_bytes + those bytes) / tasks / plain_bytes; `ratio_key`/bound: the same with the bound's bytes."""
    entries = sum(m.numel() for file in mask_files for m in file.masks.values())
    information = float(sum(mask_coding.information_bits_of(file.masks) for file in mask_files))
    out = {
        "mask_information_bits": information,
        "mask_bits_per_entry_bound": information / entries if entries else None,
        f"{ratio_key}/bound": (dense_bytes + information / 8) / tasks / plain_bytes,
    }
    for coding in mask_coding.CODINGS:
        size = sum(file.coded_bytes(coding) for file in mask_files)
        out.update(
            {
                f"mask_bytes/{coding}": size,
                f"mask_bits_per_entry/{coding}": 8 * size / entries if entries else None,
                f"{ratio_key}/{coding}": (dense_bytes + size) / tasks / plain_bytes,
            }
        )
    return out


def split_task_layer(stores: dict) -> tuple[dict, dict]:
    """mask_stores() -> ({tensor: task LayerMasks}, {tensor: layer LayerMasks}); the first is {} without task masks."""
    tasks = {n.removesuffix("@task"): m for n, m in stores.items() if n.endswith("@task") and m.kind != "none"}
    layers = {n.removesuffix("@layer"): m for n, m in stores.items() if not n.endswith("@task") and m.kind != "none"}
    return tasks, layers


@dataclass
class MaskFile:
    """One masks file a checkpoint writes: its 0/1 masks by stored name, coded at most once per coding
    (mask_coding.encode): the checkpoint writes storage.mask_coding's, the accounting counts every coding's bytes."""

    masks: dict[str, torch.Tensor]
    _coded: dict[str, tuple[dict, dict[str, str]]] = field(default_factory=dict, repr=False)

    def coded(self, coding: str) -> tuple[dict, dict[str, str]]:
        """(the safetensors tensors, the metadata) of this file in `coding`."""
        if coding not in self._coded:
            self._coded[coding] = mask_coding.encode(self.masks, coding)
        return self._coded[coding]

    def coded_bytes(self, coding: str) -> int:
        """Bytes of the file's `masks` tensor in `coding`: digest + payload (0 without masks)."""
        return int(self.coded(coding)[0][mask_coding.BLOB].size) if self.masks else 0


def mask_files(model: nn.Module, num_tasks: int) -> tuple[MaskFile, list[MaskFile]]:
    """The masks a checkpoint writes: the layer masks (shared/layer_masks.safetensors; no masks if none) and each
    task's rows [1, *shape] (tasks/<task>/task_mask.safetensors; [] without task masks)."""
    weights = methods.petl_weights(model)
    if weights is None:
        return MaskFile({}), []
    task_masks, layer_masks = split_task_layer(weights.mask_stores())
    with torch.no_grad():
        layers = {n: m().cpu() for n, m in layer_masks.items()}
        tasks = {n: m().cpu() for n, m in task_masks.items()}
    rows = [MaskFile({n: m[i : i + 1] for n, m in tasks.items()}) for i in range(num_tasks)] if tasks else []
    return MaskFile(layers), rows


# ----------------------------------------------------------------------------- what a checkpoint keeps, counted


@dataclass
class Kept:
    """What a checkpoint keeps of a model: checkpoint.save_checkpoint writes exactly this, account counts it
    (method=peft: PEFT's least-storing save instead, peft_figures); a run computes it once for both."""

    tasks: list[str]
    num_labels: list[int]
    dense: dict[str, torch.Tensor]  # the float tensors (transformers model's names), heads apart
    layer_masks: MaskFile  # [L, *shape] per masked tensor (empty without masks)
    task_masks: list[MaskFile]  # per task: [1, *shape] per masked tensor ([] without task masks)
    heads: list[dict[str, torch.Tensor]]  # per task: TaskHead's names (dense.*, classifier.*)
    has_task_masks: bool
    adapter: dict[str, bytes]  # method=peft: the files save_pretrained writes, by name ({} otherwise)


def kept(model: nn.Module, method: str, task: str | None = None) -> Kept:
    """Kept of a run's MultiTaskModel or TextToTextModel (no heads), or of a transformers model with the method inside (backbone.build, the Python
    API: one task, `task`, its label count the model's), `method` the run's method.name."""
    if isinstance(model, (backbone.MultiTaskModel, TextToTextModel)):
        tasks, labels, rename, head_names = (
            model.task_names,
            model.num_labels,
            model.transformers_name,
            model.head_names(),
        )
        if isinstance(model, TextToTextModel):  # text to text: no heads (an empty head file per task)
            heads: list[dict[str, torch.Tensor]] = [{} for _ in tasks]
        else:
            heads = [{n: p.detach() for n, p in model.heads[name].named_parameters()} for name in tasks]
    else:
        config: Any = model.config  # transformers' (torch types a module's attributes as Tensor | Module)
        tasks, labels, rename = [task or UNNAMED_TASK], [int(config.num_labels)], (lambda name: name)
        head_names = backbone.head_parameter_names(model)
        ours = {theirs: ours for ours, theirs in backbone.head_layout(model).items()}
        heads = [{backbone.swap_prefix(n, ours): p.detach() for n, p in model.named_parameters() if n in head_names}]
    dense = {rename(n): t for n, t in stored_dense_tensors(model, method, head_names).items()}
    layer_masks, task_masks = mask_files(model, len(tasks))
    adapter = methods.peft_module().adapter_files(model) if method == "peft" else {}
    return Kept(
        list(tasks), list(labels), dense, layer_masks, task_masks, heads, getattr(model, "task_masks", False), adapter
    )


def peft_figures(model: nn.Module) -> dict:
    """method=peft: what a task keeps is what PEFT's save_pretrained writes with the method's least-storing options
    (peft_tuners.LEAST_STORING; the seeds that regenerate frozen projections are in adapter_config.json): the bytes of
    each file, their sum, and what the method's file holds (peft_tuners.KEPT)."""
    tuners = methods.peft_module()
    files = tuners.adapter_files(model, least=True)
    kind = tuners.peft_model(model).peft_config["default"].peft_type.value
    return {
        "storage_counted": f"{kind}: {tuners.KEPT.get(kind, 'the tensors PEFT saves')} + adapter_config.json",
        "adapter_bytes": sum(map(len, files.values())),
        **{f"adapter_bytes/{n}": len(b) for n, b in files.items()},
    }


def account(model: nn.Module, setup: ModelSetup, backbone_params: int, keep: Kept | None = None) -> dict:
    """Every storage figure of a model (metrics.json, W&B), counted from `kept`: dense tensors in fp32, one bit a mask
    entry (each mask tensor padded to whole bytes), heads apart. One task: with and without its head, against plain
    PETL of the same prototype (finetune: the backbone). Several: the shared part once (dense tensors, layer masks),
    each task's part apart (task mask bits; the head), total and amortised per task, against N separate one-task runs
    and plain PETL per task. Both: as written, in storage.dtype and each mask coding (coding_figures). `keep`: the
    model's Kept, if the caller has it (the run, which also writes it)."""
    keep = keep or kept(model, setup.method, setup.task)
    n, width = len(keep.tasks), STORAGE_DTYPES[setup.storage.dtype].itemsize
    stored_params = sum(t.numel() for t in keep.dense.values())
    layer_entries = [m.numel() for m in keep.layer_masks.masks.values()]
    task_entries = [m.numel() for m in keep.task_masks[0].masks.values()] if keep.task_masks else []  # per task
    masks = [*keep.layer_masks.masks.values(), *(m for rows in keep.task_masks for m in rows.masks.values())]
    mask_entries = sum(layer_entries) + n * sum(task_entries)
    shared_bytes = 4 * stored_params + mask_bytes(layer_entries)
    task_bytes = mask_bytes(task_entries)
    heads = {task: sum(t.numel() for t in head.values()) for task, head in zip(keep.tasks, keep.heads)}
    peft = peft_figures(model) if setup.method == "peft" else {}
    if setup.method == "finetune":
        plain = backbone_params
    elif peft:  # the tuner's own tensors, as a plain PETL run of it stores them
        stored_params = plain = count(methods.peft_parameters(model).values())
    else:
        config: Any = model.config
        plain = plain_petl_params(setup, config.hidden_size, petl_sites(model))
    dense_bytes = peft["adapter_bytes"] if peft else width * stored_params
    coded = coding_figures(
        [keep.layer_masks] * bool(keep.layer_masks.masks) + keep.task_masks,
        dense_bytes,
        width * plain,
        tasks=n,
        ratio_key="storage_ratio_to_plain_petl" if n == 1 else "amortised_ratio_to_plain_petl",
    )
    trainable = count(p for p in model.parameters() if p.requires_grad)
    if n > 1:
        total = shared_bytes + n * task_bytes
        total_with_heads = total + 4 * sum(heads.values())
        return {
            "tasks": n,
            "backbone_params": backbone_params,
            "shared_params": stored_params,
            "trainable_params": trainable - sum(heads.values()),  # every task's together (mask scores, heads apart)
            "layer_mask_entries": sum(layer_entries),
            "task_mask_entries_per_task": sum(task_entries),
            "shared_bytes": shared_bytes,
            "task_mask_bytes_per_task": task_bytes,
            "head_params": heads,
            "head_bytes_per_task_mean": 4 * sum(heads.values()) / n,
            "total_bytes": total,
            "total_bytes_with_heads": total_with_heads,
            "amortised_bytes_per_task": total / n,
            "amortised_bytes_per_task_with_head": total_with_heads / n,
            "separate_single_task_bytes_per_task": shared_bytes,
            "plain_petl_bytes_per_task": 4 * plain,
            "amortised_ratio_to_separate": (total / n) / shared_bytes,
            "amortised_ratio_to_plain_petl": (total / n) / (4 * plain),
            "amortised_percent_of_backbone": 100.0 * (total / n) / (4 * backbone_params),
            **asdict(setup.storage),
            "mask_entries": mask_entries,
            "dense_bytes": width * stored_params,
            "plain_petl_bytes_as_stored": width * plain,
            **coded,
        }
    mask_ones = int(sum(float(m.sum()) for m in masks))
    head_params = heads[keep.tasks[0]]
    bits, size_bytes = 32 * stored_params + mask_entries, shared_bytes + task_bytes
    if peft:  # PEFT's files as written (their bytes / 4 as fp32-equivalent parameters)
        bits, size_bytes = 8 * peft["adapter_bytes"], peft["adapter_bytes"]
    fp32_equivalent = bits / 32
    return {
        "backbone_params": backbone_params,
        "head_params": head_params,
        "trainable_params": trainable - head_params,
        "trainable_params_with_head": trainable,
        "prototype_params": stored_params if setup.method == "propetl" else 0,
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
        **asdict(setup.storage),
        "dense_bytes": dense_bytes,
        "plain_petl_bytes_as_stored": width * plain,
        **coded,
        **peft,
    }
