"""ProPETLTrainer: transformers' Trainer for a ProPETLModel (propetl/api.py), without its two traps.
- The optimizer has ProPETL's groups: the prototype at TrainingArguments.learning_rate, the mask scores at mask_lr,
  the head at head_lr, weight decay on all but biases and LayerNorm weights; the optimizer class is the Trainer's.
- A checkpoint holds the trainable tensors only (model.safetensors, by name), not the frozen backbone;
  resume_from_checkpoint and load_best_model_at_end read them back, refusing a mismatched file in one line."""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file, save_file
from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.utils import SAFE_WEIGHTS_NAME

from propetl.configs import ConfigError
from propetl.run.loop import load_trainable_state, trainable_state


class ProPETLTrainer(Trainer):
    """transformers.Trainer for a ProPETLModel: ProPETL's optimizer groups, checkpoints of the trainable parts only."""

    model: torch.nn.Module  # never None: __init__ refuses it

    def __init__(self, model=None, *args, **kwargs):
        if model is None or not hasattr(type(model), "parameter_groups"):
            raise ConfigError(
                f"ProPETLTrainer(model={type(model).__name__}): pass the ProPETLModel that "
                f"propetl.get_propetl_model (or ProPETLModel.from_pretrained) returned"
            )
        super().__init__(model, *args, **kwargs)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            groups = self.model.parameter_groups(lr=self.args.learning_rate, weight_decay=self.args.weight_decay)
            chosen = self.optimizer_cls_and_kwargs
            optimizer_cls, optimizer_kwargs = chosen or self.get_optimizer_cls_and_kwargs(self.args, self.model)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)  # each group's lr and decay win
        return self.optimizer

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """model.safetensors (the trainable tensors) and the training arguments; not the frozen backbone, nor the
        tokenizer (the base model's, which training does not change: Trainer's _save would copy it every time)."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        assert output_dir is not None  # TrainingArguments makes a missing output_dir "trainer_output"
        os.makedirs(output_dir, exist_ok=True)
        save_file(trainable_state(self.model), os.path.join(output_dir, SAFE_WEIGHTS_NAME), metadata={"format": "pt"})
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        load_trainable(model or self.model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        assert self.state.best_model_checkpoint is not None  # Trainer calls this only once it has one
        load_trainable(self.model, self.state.best_model_checkpoint)


def load_trainable(model: torch.nn.Module, folder: str) -> None:
    """A ProPETLTrainer checkpoint's model.safetensors into the model's trainable tensors; a mismatch in one line."""
    path = os.path.join(folder, SAFE_WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise ConfigError(f"{folder} has no {SAFE_WEIGHTS_NAME}: not a ProPETLTrainer checkpoint")
    saved, targets = load_file(path), {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(saved) != set(targets) or any(saved[n].shape != targets[n].shape for n in targets):
        missing, extra = sorted(set(targets) - set(saved))[:3], sorted(set(saved) - set(targets))[:3]
        what = f"missing {missing}, unexpected {extra}, or other shapes"
        raise ConfigError(
            f"{path} does not match the model's trainable tensors ({what}): another prototype or settings"
        )
    load_trainable_state(model, saved)
