"""The T5 backbone, text to text (paper.md §2.3): its adapter sites and the model a T5 run trains.
Sites: the feed-forward sub-layer of every encoder block, then of every decoder block (t5-base: 12 + 12 = 24), all
served by ONE store (LayerWeights over the sites, site i = store layer i). method=propetl: one prototype for all sites,
encoder and decoder (the reference's share_encoder_decoder_single_adapter), a binary mask per site and, with several
tasks, a task mask OR a site mask (mask.combine); method=petl: one adapter per site; finetune: every weight trains.
Prototypes on T5: adapter only, so far (the reference's T5 runs use non_linearity=gelu_new, init_std=0.01);
LoRA and prefix are refused in one line (check_t5_setup). lm_head and LayerNorms stay frozen as the reference's.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import T5ForConditionalGeneration
from transformers.modeling_outputs import Seq2SeqLMOutput
from transformers.utils import logging as hf_logging

from propetl import methods
from propetl.configs import ModelConfig, ModelSetup
from propetl.models.backbone import ModelError, resolve_model_path, swap_prefix

T5_PROTOTYPES = ("adapter",)  # prototypes whose attach knows T5's sites
T5_METHODS = ("propetl", "petl", "finetune")
IGNORE_INDEX = -100  # label positions the loss skips (padding), as transformers'


def t5_sites(t5: nn.Module) -> nn.ModuleList:
    """A T5ForConditionalGeneration's adapter sites in store order: encoder blocks 0..n-1, then decoder blocks
    0..m-1 (each block's last sub-layer is its feed-forward one). The list only points at the blocks."""
    model: Any = t5  # transformers' model (torch types a module's attributes as Tensor | Module)
    return nn.ModuleList([*model.encoder.block, *model.decoder.block])


def check_t5_setup(method: str, prototype: str | None) -> None:
    """A one-line ModelError for a method or prototype T5 does not support (yet)."""
    if method not in T5_METHODS:
        raise ModelError(f"method={method} is not supported on T5; allowed: {', '.join(T5_METHODS)}")
    if method != "finetune" and prototype not in T5_PROTOTYPES:
        raise ModelError(f"prototype={prototype} is not supported on T5 yet; allowed: {', '.join(T5_PROTOTYPES)}")


def adds_task_prefix(method: str) -> bool:
    """Whether a T5 run's sources start with the task name (text_to_text add_prefix): only full fine-tuning's, as the
    reference's glue/finetune (add_prefix=True); its adapter and ProPETL runs leave it out (a plain adapter shared by
    all tasks then has no way to tell the tasks apart but the text itself; ProPETL has its task masks)."""
    return method == "finetune"


def seq2seq_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Token-mean cross-entropy of logits [B, T, V] against labels [B, T], skipping IGNORE_INDEX; label_smoothing
    eps: (1 - eps) * NLL + eps * mean over the vocabulary of -log p (the reference's 0.1, as HF's LabelSmoother)."""
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        label_smoothing=label_smoothing,
    )


def load_t5(config: ModelConfig) -> T5ForConditionalGeneration:
    """The pre-trained T5 of the model group `config` (a folder, pkg:// folder or hub id; safetensors only)."""
    path = resolve_model_path(config.name_or_path)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model = T5ForConditionalGeneration.from_pretrained(path, use_safetensors=True)
    except OSError as error:
        hint = " (weights load from safetensors only)" if os.path.isdir(path) else ""
        raise ModelError(f"cannot load model.name_or_path={config.name_or_path!r}{hint}: {str(error).splitlines()[0]}")
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    if model.config.d_model != config.hidden_size or model.config.num_layers != config.num_layers:
        raise ModelError(
            f"model '{config.name}' has d_model {model.config.d_model} x {model.config.num_layers} encoder blocks, "
            f"config says {config.hidden_size} x {config.num_layers}: fix conf/model/{config.name}.yaml"
        )
    return model


class TextToTextModel(nn.Module):
    """A T5 with the method inside (one store for every site and task); forward(..., task=[B] task indices, labels)
    -> Seq2SeqLMOutput(loss, logits), loss = seq2seq_loss with `label_smoothing`; generate(..., task=) decodes with
    that task's masks. A batch holds one task (the reference samples single-task batches). `backbone`: a loaded
    T5ForConditionalGeneration (None: load_t5(setup.model)); task_masks=False: per-site masks only (one task).
    T5 with more decoder than encoder blocks cannot generate in transformers 5.24 (its cache has num_layers entries).
    `num_labels`: each task's label count, only recorded (checkpoints; default 1 each)."""

    def __init__(
        self,
        setup: ModelSetup,
        task_names: list[str],
        backbone: nn.Module | None = None,
        for_training: bool = True,
        task_masks: bool = True,
        label_smoothing: float = 0.0,
        num_labels: list[int] | None = None,
    ):
        super().__init__()
        prototype = setup.saved.get("prototype") or {}
        check_t5_setup(setup.method, prototype.get("name"))
        self.t5: Any = load_t5(setup.model) if backbone is None else backbone
        self.config = self.t5.config
        self.task_names, self.label_smoothing = list(task_names), float(label_smoothing)
        self.prototype_name = prototype.get("name")
        self.task_masks = bool(task_masks)
        # each task's label count as its yaml says (a GLUE task's; 1 for a generation task): a checkpoint records it,
        # nothing computes with it (the text is the output)
        self.num_labels = [1] * len(self.task_names) if num_labels is None else [int(n) for n in num_labels]
        num_tasks = len(task_names) if task_masks else 0  # as MultiTaskModel: the runner passes len(tasks) > 1
        methods.attach(self, self.sites(), setup, set(), for_training, num_tasks=num_tasks)

    def sites(self) -> nn.ModuleList:
        return t5_sites(self.t5)

    def head_names(self, tasks=None) -> set[str]:
        """No task heads: the text is the output (lm_head stays frozen, as the reference's); MultiTaskModel's API."""
        return set()

    def transformers_name(self, name: str) -> str:
        """A parameter's name in the T5ForConditionalGeneration (t5.X -> X), as MultiTaskModel.transformers_name."""
        return swap_prefix(name, {"t5.": ""})

    def select_task(self, task: torch.Tensor | int | None) -> int:
        """Make the store apply task `task`'s masks (a [B] tensor: its first entry; None: the first task)."""
        index = 0 if task is None else int(task[0] if isinstance(task, torch.Tensor) else task)
        weights = methods.petl_weights(self)
        if weights is not None:
            weights.active_task = index
        return index

    def forward(self, input_ids, attention_mask, labels=None, task=None, decoder_input_ids=None):
        self.select_task(task)
        if decoder_input_ids is None:  # teacher forcing: the labels shifted right (-100 -> pad), as transformers'
            if labels is None:
                raise ValueError("TextToTextModel.forward needs labels or decoder_input_ids")
            decoder_input_ids = self.t5._shift_right(labels)
        out = self.t5(
            input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids, use_cache=False
        )
        loss = None if labels is None else seq2seq_loss(out.logits, labels, self.label_smoothing)
        return Seq2SeqLMOutput(loss=loss, logits=out.logits)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, task=None, **kwargs) -> torch.Tensor:
        """transformers' generate with task `task`'s masks (greedy unless kwargs say otherwise)."""
        self.select_task(task)
        kwargs.setdefault("do_sample", False)
        return self.t5.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def merge(self) -> None:
        """Fold the active task's masks into plain per-site adapters (methods.merge): the same predictions for that
        task, plain PETL's cost (several tasks: merge a copy per task)."""
        if self.prototype_name is not None:
            methods.merge(self, self.sites(), self.prototype_name)
