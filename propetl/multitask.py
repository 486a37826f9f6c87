"""Multi-task ProPETL: one prototype and one set of layer masks shared by every task, and per task a
mask (shared by all layers) and a classification/regression head.

    propetl-train mode=multitask tasks=[rte,mrpc,stsb,cola]

Layer l of task t uses  prototype * combine(task mask t, layer mask l)  (mask.combine, default OR;
propetl/masks.py); with one task, layer masks only, as a single-task run (which it then equals, weight for
weight: tests/test_multitask.py). Each step trains on one task's batch, the task drawn with p_i ∝ n_i^(1/T)
(multitask.temperature, 10 as in the reference). After every epoch every task is scored on its own
selection split; the best epoch is the one with the best mean of the tasks' scores, then each task is
scored on its test split. The checkpoint keeps the shared part once and each task's part (its mask
bits and head) in a folder of its own, so one task can be loaded or shipped alone
(checkpoint.save_multitask / load_multitask). With multitask.base_checkpoint a new task is added to a
trained model: only its mask and head train, against the frozen prototype and layer masks.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from propetl import accounting, checkpoint, data, log, loop, methods
from propetl import metrics as glue_metrics
from propetl import model as backbone
from propetl.batches import PadCollator, batch_order, token_lengths, tokenise
from propetl.configs import group_option
from propetl.run import begin_run, end_run, fit_logged, run_facts

logger = logging.getLogger("propetl")


def task_configs(names) -> list[DictConfig]:
    """The task configs of conf/task/<name>.yaml (or a user's, on the run's config search path), in the order given."""
    return [group_option("task", name) for name in names]


# ----------------------------------------------------------------------------- batches

class TaskCollator:
    """A task's collator that also tags every batch with the task's index."""

    def __init__(self, collator: PadCollator, index: int):
        self.collator, self.index = collator, index

    def __call__(self, rows):
        batch = self.collator(rows)
        batch["task"] = torch.full((len(rows),), self.index, dtype=torch.long)
        return batch


class MultiTaskBatches:
    """Single-task batches from several tasks; each step's task drawn with p_i ∝ n_i^(1/T).

    An epoch is as many steps as all tasks have batches. Everything random is drawn from
    `self.generator` as the epoch goes, so the loop's resume (restore the generator state of the
    epoch's start, skip the steps done) replays an epoch exactly. A task whose batches run out
    starts a fresh epoch of its own. With `lengths` (each task's token counts), a task's batches
    group examples of similar length (batches.batch_order). One task's batches come in the order, and from
    the same draws, as a single-task run's DataLoader gives them (batches.make_loader)."""

    def __init__(self, splits, collators, batch_size: int, temperature: float, seed: int, lengths=None):
        self.splits, self.collators, self.batch_size = list(splits), list(collators), batch_size
        self.lengths = list(lengths) if lengths is not None else [None] * len(self.splits)
        sizes = np.array([len(s) for s in self.splits], dtype=np.float64)
        weights = sizes ** (1.0 / temperature)
        self.probabilities = torch.tensor(weights / weights.sum(), dtype=torch.float64)
        self.steps = int(sum(math.ceil(n / batch_size) for n in sizes))
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.steps

    def _task_batches(self, task: int) -> list[list[int]]:
        return batch_order(len(self.splits[task]), self.batch_size, self.generator, self.lengths[task])

    def __iter__(self):
        if len(self.splits) == 1:       # one task: a single-task DataLoader's order (its base-seed draw, then the batches)
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


# ----------------------------------------------------------------------------- the run

def _freeze_for_new_tasks(model: backbone.MultiTaskModel, base_tasks: list[str]) -> None:
    """Adding tasks: the prototype, the layer masks and the old tasks' heads stay as trained. (The old
    tasks' rows of the task-mask scores get no gradient: their batches are not drawn.)"""
    weights = methods.petl_weights(model)
    for parameter in weights.parameters():
        parameter.requires_grad_(False)
    for name, mask in weights.mask_stores().items():
        if name.endswith("@task") and mask.kind == "learned":
            mask.scores.requires_grad_(True)
    for name, parameter in model.named_parameters():
        if any(name.startswith(f"heads.{t}.") for t in base_tasks):
            parameter.requires_grad_(False)


def train_multitask(cfg: DictConfig, output_dir: Path) -> dict:
    """One multi-task run: every task's data -> one model -> fit on the mean selection score -> per-task test."""
    finished, ctx, checkpointer, device = begin_run(cfg, output_dir)
    if finished is not None:
        return finished
    base_dir = cfg.multitask.base_checkpoint
    base_tasks = checkpoint.read_multitask_config(Path(base_dir))["tasks"] if base_dir else []
    new_tasks = [t for t in cfg.tasks if t not in base_tasks]
    if base_dir and not new_tasks:
        raise checkpoint.CheckpointError(f"tasks={list(cfg.tasks)} are all in {base_dir} already; name a new task")
    task_names = [*base_tasks, *new_tasks]
    task_cfgs = task_configs(task_names)
    by_name = dict(zip(task_names, task_cfgs))

    # 1. data: every new task's splits, tokenised once; single-task batches drawn by temperature
    data_dir = data.resolve_data_dir(cfg.data.dir)
    tokenizer = backbone.load_tokenizer(cfg.model)
    splits, collators = {}, {}
    for index, name in enumerate(task_names):
        if name not in new_tasks:
            continue
        text = data.sample_train(
            data.load_glue(by_name[name], data_dir, cfg.data.protocol, cfg.data.split_seed, cfg.data.allow_hub),
            cfg.data.max_train_examples, cfg.data.split_seed)
        splits[name] = {split: tokenise(rows, tokenizer, cfg.data.max_length) for split, rows in text.items()}
        collators[name] = TaskCollator(PadCollator(tokenizer, int(by_name[name].num_labels) == 1), index)
    lengths = [token_lengths(splits[n]["train"]) for n in new_tasks] if cfg.data.group_by_length else None
    train_batches = MultiTaskBatches([splits[n]["train"] for n in new_tasks], [collators[n] for n in new_tasks],
                                     cfg.trainer.batch_size, float(cfg.multitask.temperature), cfg.seed, lengths)

    def eval_loader(name: str, split: str) -> DataLoader:
        return DataLoader(splits[name][split], batch_size=cfg.trainer.eval_batch_size, collate_fn=collators[name])

    # 2. model: one encoder + method for all tasks, a head per task (base tasks loaded and frozen)
    if base_dir:
        model, _ = checkpoint.load_multitask(Path(base_dir), cfg=cfg, extra_tasks=task_configs(new_tasks),
                                          for_training=False)
        _freeze_for_new_tasks(model, base_tasks)
        model.train()
    else:
        model = backbone.MultiTaskModel(cfg, task_names, [int(t.num_labels) for t in task_cfgs],
                                        task_masks=len(task_names) > 1)
    model = model.to(device)
    head_names = model.head_names()
    backbone_params = accounting.backbone_params(model, head_names)
    logger.info("multitask %s: %s train examples, %d steps per epoch, device %s", ",".join(new_tasks),
                "/".join(str(len(splits[n]["train"])) for n in new_tasks), len(train_batches), device)

    def select(m) -> tuple[dict, float]:
        metrics, scores = {}, []
        for name in new_tasks:
            task_metrics = loop.evaluate(m, eval_loader(name, "validation"), by_name[name], device,
                                         cfg.trainer.precision, f"select {name}", cfg.trainer.progress)
            metrics.update({f"{name}/{k}": v for k, v in task_metrics.items()})
            scores.append(glue_metrics.selection_score(task_metrics, by_name[name].selection_metric))
        metrics["mean"] = float(np.mean(scores))
        return metrics, metrics["mean"]

    # 3. train on the mean selection score; then every task on its test split
    run, result, started = fit_logged(cfg, output_dir, model, train_batches, select, head_names, device, checkpointer, ctx)
    if base_dir:        # the old tasks' mask rows saw AdamW's decay (no gradient): put them back bit for bit
        checkpoint.load_task_parts(model, Path(base_dir), base_tasks)
    per_task = {}
    for name in new_tasks:
        test = loop.evaluate(model, eval_loader(name, "test"), by_name[name], device, cfg.trainer.precision,
                             f"test {name}", cfg.trainer.progress)
        selection = {k.split("/", 1)[1]: v for k, v in result.best_selection.items() if k.startswith(f"{name}/")}
        per_task[name] = {"selection": selection, "test": test, "glue_score": glue_metrics.task_score(name, test)}

    # 4. storage: shared part once, each task's part apart; checkpoint written by rank 0
    figures = accounting.account_multitask(model, cfg, task_names, backbone_params)
    if not ctx.is_main:                          # rank 0 writes the files
        end_run(ctx)
        return {"tasks": per_task}
    if cfg.trainer.save_weights:
        checkpoint.save_multitask(model, cfg, output_dir / "checkpoint")
        figures.update(checkpoint.file_figures(output_dir / "checkpoint", figures))

    # 5. report
    metrics = {
        "mode": "multitask", "tasks": new_tasks, "base_tasks": base_tasks, "model": cfg.model.name,
        "method": cfg.method.name, "prototype": cfg.prototype.name, "mask_kind": cfg.mask.kind,
        "mask_sparsity": float(cfg.mask.sparsity), "mask_combine": cfg.mask.combine, "seed": int(cfg.seed),
        "temperature": float(cfg.multitask.temperature), "protocol": cfg.data.protocol, "split_seed": int(cfg.data.split_seed),
        "per_task": per_task, "mean_test_score": float(np.mean([t["glue_score"] for t in per_task.values()])),
        "glue_average": glue_metrics.glue_average({n: t["test"] for n, t in per_task.items()}),
        "selection": result.best_selection, "storage": figures, **run_facts(cfg, result, started, device, ctx),
    }
    log.write_metrics(output_dir / "metrics.json", metrics)
    checkpointer.discard()
    run.summary.update({**{f"test/{n}/{k}": v for n, t in per_task.items() for k, v in t["test"].items()},
                        "mean_test_score": metrics["mean_test_score"], **{f"storage/{k}": v for k, v in figures.items()
                                                                           if not isinstance(v, dict)}})
    logger.info("results in %s\n%s", output_dir, log.multitask_summary_table(metrics))
    end_run(ctx)
    return metrics
