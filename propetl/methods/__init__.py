"""The methods registry: how a backbone becomes finetune / petl / propetl for a prototype.

Each prototype module (adapter, lora, prefix) provides
    specs(cfg, hidden) -> {name: TensorSpec}      the tensors of ONE layer's module
    attach(model, layers, weights, cfg)           wraps the backbone's layers so they read `weights`
    merge(layers, weights) -> weights | None      folds masks away for inference
and optionally make_weights(...) when its tensors are produced rather than stored (prefix).
"""
from __future__ import annotations

import torch
from torch import nn

from propetl.methods import adapter, lora, prefix
from propetl.methods.weights import LayerWeights

PROTOTYPES = {"adapter": adapter, "lora": lora, "prefix": prefix}
METHODS = ("propetl", "petl", "finetune")
WEIGHTS_ATTRIBUTE = "petl_weights"        # where the store is registered on the model


def make_weights(cfg, hidden: int, num_layers: int, for_training: bool = True, num_tasks: int = 0) -> LayerWeights:
    """The PETL store for cfg.method.name in {petl, propetl} and cfg.prototype (num_tasks > 0: multi-task masks)."""
    prototype = PROTOTYPES[cfg.prototype.name]
    shared = cfg.method.name == "propetl"
    mask_kwargs = dict(mask_sparsity=float(cfg.mask.sparsity), mask_kind=cfg.mask.kind, mask_seed=int(cfg.mask.seed),
                       num_tasks=num_tasks, mask_combine=str(cfg.mask.get("combine", "or")))
    if hasattr(prototype, "make_weights"):
        return prototype.make_weights(cfg.prototype, hidden, num_layers, shared, for_training, **mask_kwargs)
    return LayerWeights(prototype.specs(cfg.prototype, hidden), num_layers, shared, **mask_kwargs)


def attach(model: nn.Module, layers: nn.ModuleList, cfg, head_names: set[str], for_training: bool = True,
           num_tasks: int = 0):
    """Freeze the backbone and insert the method. Returns the PETL store (None for finetune)."""
    if cfg.method.name == "finetune":
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return None
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in head_names)
    weights = make_weights(cfg, model.config.hidden_size, len(layers), for_training, num_tasks)
    setattr(model, WEIGHTS_ATTRIBUTE, weights)
    PROTOTYPES[cfg.prototype.name].attach(model, layers, weights, cfg.prototype)
    model.register_forward_pre_hook(_forget_step_cache)
    return weights


def _forget_step_cache(model: nn.Module, args) -> None:
    """Masks and masked weights are computed once per training step: forget them before each forward with grad."""
    weights = petl_weights(model)
    if weights is not None and torch.is_grad_enabled():
        weights.invalidate()


def petl_weights(model: nn.Module) -> LayerWeights | None:
    return getattr(model, WEIGHTS_ATTRIBUTE, None)


def merge(model: nn.Module, layers: nn.ModuleList, prototype_name: str) -> None:
    """Fold masks into plain per-layer modules (LoRA: into the frozen weights). Predictions are unchanged."""
    weights = petl_weights(model)
    if weights is None:
        return
    merged = PROTOTYPES[prototype_name].merge(layers, weights)
    if merged is None:              # LoRA: folded into the frozen weights, nothing left to store
        delattr(model, WEIGHTS_ATTRIBUTE)
    else:
        setattr(model, WEIGHTS_ATTRIBUTE, merged)
