"""The methods registry: how a backbone becomes finetune / petl / propetl / peft for a prototype.
A prototype is a module plus conf/prototype/<name>.yaml, registered by register_prototype (or the yaml's `module:` key).
The module provides CONFIG (a rules.PrototypeConfig dataclass: the yaml's keys and rules; the API's config), FOLDABLE,
specs(config, hidden) (ONE layer's tensors), attach(model, layers, weights, config), merge(layers, weights) (folds
masks away; None: folded into the backbone) and optionally make_weights (tensors produced, not stored: prefix).
method=peft: a PEFT tuner instead (methods/peft_tuners.py, imported only on its path); peft=lora is the reference row.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import torch
from torch import nn

from propetl.configs import ConfigError, MaskConfig, ModelSetup
from propetl.methods import adapter, lora, prefix
from propetl.methods.rules import PrototypeConfig
from propetl.methods.weights import LayerWeights

PROTOTYPES: dict[str, ModuleType] = {}  # name -> module, filled by register_prototype
PROTOTYPE_PARTS = ("CONFIG", "FOLDABLE", "specs", "attach", "merge")
METHODS = ("propetl", "petl", "finetune", "peft")
WEIGHTS_ATTRIBUTE = "petl_weights"  # where the store is registered on the model
PEFT_MISSING = "method=peft needs the optional package peft: pip install 'propetl[peers]'"
PEFT_FILES = (
    "adapter_model.safetensors",
    "adapter_config.json",
)  # what PEFT's save_pretrained writes that a task keeps


def register_prototype(name: str, module: ModuleType) -> None:
    """Make `module` the prototype `name` (prototype=<name>, with conf/prototype/<name>.yaml on the config path)."""
    missing = [part for part in PROTOTYPE_PARTS if not hasattr(module, part)]
    if "CONFIG" in missing:  # the old interface had SETTINGS
        missing[0] = "CONFIG (a rules.PrototypeConfig dataclass; SETTINGS is the old form)"
    if missing:
        raise TypeError(f"prototype {name}: module {module.__name__} lacks {', '.join(missing)}")
    PrototypeConfig.check_definition(module.CONFIG, name)
    PROTOTYPES[name] = module


for _name, _module in (("adapter", adapter), ("lora", lora), ("prefix", prefix)):
    register_prototype(_name, _module)


def import_prototype(group: Mapping[str, Any]) -> None:
    """Register the module a user's prototype yaml names (`module: my_package.my_prototype`), once."""
    path, name = group.get("module"), str(group["name"])
    if name in PROTOTYPES or not path:
        return
    try:
        register_prototype(name, importlib.import_module(str(path)))
    except (ImportError, TypeError) as error:
        raise ConfigError(
            f"prototype.module={path!r} is invalid ({error}); allowed: an importable module "
            f"defining {', '.join(PROTOTYPE_PARTS)}"
        ) from None


class WithShapeKeys:
    """Config keys + prototype.<key> of every registered prototype's shape keys, read when iterated (late ones too)."""

    def __init__(self, keys: tuple[str, ...]):
        self.keys = keys

    def __iter__(self):
        shape_keys = (f"prototype.{key}" for module in PROTOTYPES.values() for key in module.CONFIG.shape_keys())
        return iter(dict.fromkeys((*self.keys, *shape_keys)))


def not_foldable(prototype_name: str) -> str | None:
    """Why a prototype cannot become plain weights of the backbone (one line), or None for one that can (LoRA):
    an adapter adds a module after the feed-forward block and a prefix adds attention positions."""
    if getattr(PROTOTYPES.get(prototype_name), "FOLDABLE", False):
        return None
    foldable = [name for name, module in PROTOTYPES.items() if module.FOLDABLE]
    why = "it adds modules the plain model does not have"
    return f"prototype={prototype_name} cannot be folded into BERT's weights ({why}); only {', '.join(foldable)} can"


def prototype_config(group: Mapping[str, Any]) -> PrototypeConfig:
    """The prototype's dataclass (its module's CONFIG) from its config group (a run's `prototype`, a checkpoint's)."""
    import_prototype(group)
    return PROTOTYPES[str(group["name"])].CONFIG.from_config(group)


def make_weights(
    method: str, prototype: PrototypeConfig, mask: MaskConfig, hidden: int, layers: int, for_training=True, num_tasks=0
) -> LayerWeights:
    """The PETL store of `method` (propetl: one prototype all layers share; petl: one per layer) for `prototype`,
    masked as `mask` says (num_tasks > 0: multi-task masks)."""
    module, shared = PROTOTYPES[prototype.name], method == "propetl"
    mask_kwargs = {
        "mask_sparsity": mask.sparsity,
        "mask_kind": mask.kind,
        "mask_seed": mask.seed,
        "num_tasks": num_tasks,
        "mask_combine": mask.combine,
        "frozen_seed": int(prototype.seed) if prototype.freeze else None,
    }
    if hasattr(module, "make_weights"):
        return module.make_weights(prototype, hidden, layers, shared, for_training, **mask_kwargs)
    return LayerWeights(module.specs(prototype, hidden), layers, shared, **mask_kwargs)


def attach(
    model: nn.Module, layers: nn.ModuleList, setup: ModelSetup, head_names: set[str], for_training=True, num_tasks=0
):
    """Freeze the backbone and insert `setup`'s method. Returns the PETL store (None for finetune and peft)."""
    if setup.method == "finetune":
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return None
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in head_names)
    if setup.method == "peft":
        peft_module().attach(model, setup.peft, head_names)
        return None
    config: Any = model.config  # transformers' config (torch types a module's attributes as Tensor | Module)
    prototype = prototype_config(setup.saved["prototype"])
    weights = make_weights(
        setup.method, prototype, setup.mask, config.hidden_size, len(layers), for_training, num_tasks
    )
    setattr(model, WEIGHTS_ATTRIBUTE, weights)
    PROTOTYPES[prototype.name].attach(model, layers, weights, prototype)
    model.register_forward_pre_hook(_forget_step_cache)
    return weights


def _forget_step_cache(model: nn.Module, args) -> None:
    """Masks and masked weights are computed once per training step: forget them before each forward with grad."""
    weights = petl_weights(model)
    if weights is not None and torch.is_grad_enabled():
        weights.invalidate()


def petl_weights(model: nn.Module) -> LayerWeights | None:
    return getattr(model, WEIGHTS_ATTRIBUTE, None)


def peft_missing() -> str | None:
    """The one-line error for method=peft without the optional package peft; None when it is installed."""
    try:
        import peft  # noqa: F401
    except ImportError:
        return PEFT_MISSING
    return None


def peft_module():
    """propetl.methods.peft_tuners, imported for method=peft only (not named peft_tuners: importing binds that name)."""
    missing = peft_missing()
    if missing:
        raise ImportError(missing)
    from propetl.methods import peft_tuners as module

    return module


def uses_peft(model: nn.Module) -> bool:
    """True for a method=peft model (peft_tuners.attach keeps the PeftModel on it)."""
    return hasattr(model, "peft_model")


def peft_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """name -> the PEFT tuner's parameters of a method=peft model; {} for every other method."""
    return peft_module().adapter_parameters(model) if uses_peft(model) else {}


def merge(model: nn.Module, layers: nn.ModuleList, prototype_name: str) -> None:
    """Fold masks into plain per-layer modules (LoRA: into the frozen weights). Predictions are unchanged."""
    if uses_peft(model):
        peft_module().merge(model)
        return
    weights = petl_weights(model)
    if weights is None:
        return
    merged = PROTOTYPES[prototype_name].merge(layers, weights)
    if merged is None:  # LoRA: folded into the frozen weights, nothing left to store: the plain model
        delattr(model, WEIGHTS_ATTRIBUTE)
        for key, hook in list(model._forward_pre_hooks.items()):
            if hook is _forget_step_cache:
                del model._forward_pre_hooks[key]
    else:
        setattr(model, WEIGHTS_ATTRIBUTE, merged)
