"""Multi-task ProPETL's batches and task-adding (the run is train.py's recipe, as for one task): one prototype and one
set of layer masks shared by every task, and per task a mask and a head. Layer l of task t uses
prototype * combine(task mask t, layer mask l) (mask.combine, default OR); with one task it equals a single-task run
(tests/test_multitask.py). Each step trains on one task's batch, drawn with p_i ∝ n_i^(1/T) (multitask.temperature).
With multitask.base_checkpoint a new task is added to a trained model: only its mask and head train."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from omegaconf import DictConfig

from propetl import methods
from propetl.configs import group_option
from propetl.data.batches import batch_order
from propetl.models import backbone


def task_configs(names) -> list[DictConfig]:
    """The task configs of conf/task/<name>.yaml (or a user's, on the run's config search path), in the order given."""
    return [group_option("task", name) for name in names]


class TaskCollator:
    """A task's collator (PadCollator, or text to text Seq2SeqCollator) that also tags every batch with the task's
    index."""

    def __init__(self, collator: Callable[[list], dict], index: int):
        self.collator, self.index = collator, index

    def __call__(self, rows):
        batch = self.collator(rows)
        batch["task"] = torch.full((len(rows),), self.index, dtype=torch.long)
        return batch


class MultiTaskBatches:
    """Single-task batches from several tasks, each step's task drawn with p_i ∝ n_i^(1/T); an epoch is as many steps as
    all tasks have batches. Every draw comes from `self.generator`, so a resume replays an epoch exactly; one task's
    batches come as torch's shuffling DataLoader gives them (tests/test_multitask.py). `epoch_steps`
    (trainer.eval_every_steps): an epoch is that many drawn batches instead (one task too), every task reshuffled."""

    def __init__(
        self, splits, collators, batch_size: int, temperature: float, seed: int, lengths=None, epoch_steps=None
    ):
        self.splits, self.collators, self.batch_size = list(splits), list(collators), batch_size
        self.lengths = list(lengths) if lengths is not None else [None] * len(self.splits)
        sizes = np.array([len(s) for s in self.splits], dtype=np.float64)
        weights = sizes ** (1.0 / temperature)
        self.probabilities = torch.tensor(weights / weights.sum(), dtype=torch.float64)
        self.steps = int(sum(math.ceil(n / batch_size) for n in sizes))
        self.drawn = epoch_steps is not None  # an "epoch" of epoch_steps drawn batches (one task too)
        if epoch_steps is not None:
            self.steps = int(epoch_steps)
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.steps

    def _task_batches(self, task: int) -> list[list[int]]:
        return batch_order(len(self.splits[task]), self.batch_size, self.generator, self.lengths[task])

    def __iter__(self):
        if len(self.splits) == 1 and not self.drawn:  # one task: a single-task DataLoader's order (its base-seed
            # draw, then the batches)
            torch.empty((), dtype=torch.int64).random_(generator=self.generator)
            for indices in self._task_batches(0):
                yield self.collators[0]([self.splits[0][i] for i in indices])
            return
        order = torch.multinomial(self.probabilities, self.steps, replacement=True, generator=self.generator).tolist()
        pending = [self._task_batches(task) for task in range(len(self.splits))]
        for task in order:
            if not pending[task]:
                pending[task] = self._task_batches(task)
            indices = pending[task].pop(0)
            yield self.collators[task]([self.splits[task][i] for i in indices])


def freeze_for_new_tasks(model: backbone.MultiTaskModel, base_tasks: list[str]) -> None:
    """Adding tasks: the prototype, the layer masks and the old tasks' heads stay as trained (the old tasks' task masks
    get no gradient: their batches are not drawn, and each task's mask is its own parameter)."""
    weights = methods.petl_weights(model)
    assert weights is not None  # mode=multitask: method=propetl or petl (validate.py), both with a store
    for parameter in weights.parameters():
        parameter.requires_grad_(False)
    for name, mask in weights.mask_stores().items():
        if name.endswith("@task") and mask.kind == "learned":
            mask.requires_grad_(True)
    for name, parameter in model.named_parameters():
        if any(name.startswith(f"heads.{t}.") for t in base_tasks):
            parameter.requires_grad_(False)
