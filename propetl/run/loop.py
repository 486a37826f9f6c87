"""The training/evaluation loop: AdamW with parameter groups, linear warm-up/decay, evaluation every
epoch, best epoch chosen on the selection split. Reads top to bottom; knows nothing of methods.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from propetl import methods
from propetl.data import metrics as glue_metrics
from propetl.run import distributed
from propetl.run.resume import Interrupted, StopOnSignal
from propetl.run.step_log import EvalPlan, StepLog, bar_shown

logger = logging.getLogger("propetl")

NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight")


def parameter_groups(model: nn.Module, cfg, head_names: set[str]) -> list[dict]:
    """AdamW groups: PETL weights (or the backbone), mask scores (own lr), head; biases without decay; method=peft:
    the tensors whose name holds a key of peft.lrs at that lr (VB-LoRA's vector bank)."""
    t = cfg.trainer
    own = dict(OmegaConf.select(cfg, "peft.lrs", default=None) or {}) if cfg.method.name == "peft" else {}
    settings = {
        "weights": (t.lr, t.weight_decay),
        "weights_no_decay": (t.lr, 0.0),
        **{f"weights/{key}": (lr, t.weight_decay) for key, lr in own.items()},
        "masks": (cfg.mask.lr, cfg.mask.weight_decay),
        "head": (t.head_lr, t.weight_decay),
        "head_no_decay": (t.head_lr, 0.0),
    }
    weights = methods.petl_weights(model)
    scores = {id(p) for p in weights.score_parameters()} if weights is not None else set()
    groups = {key: [] for key in settings}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        suffix = "_no_decay" if name.endswith(NO_DECAY) or p.ndim == 1 else ""
        if id(p) in scores:
            groups["masks"].append(p)
        elif name in head_names:
            groups["head" + suffix].append(p)
        elif key := next((key for key in own if key in name), None):
            groups[f"weights/{key}"].append(p)
        else:
            groups["weights" + suffix].append(p)
    return [
        {"params": params, "name": key, "lr": float(settings[key][0]), "weight_decay": float(settings[key][1])}
        for key, params in groups.items()
        if params
    ]


def warmup_steps(cfg, total_steps: int) -> int:
    return math.ceil(cfg.trainer.warmup_ratio * total_steps)


def make_optimizer(model: nn.Module, cfg, head_names: set[str], total_steps: int):
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg, head_names), betas=(0.9, 0.999), eps=1e-8)
    return optimizer, get_linear_schedule_with_warmup(optimizer, warmup_steps(cfg, total_steps), total_steps)


def selectable(cfg, steps: int, total_steps: int, epoch: int, epochs: int) -> bool:
    """Whether an epoch ending after `steps` optimizer steps may be the selected one: always, unless
    trainer.selection_skips_warmup, which passes over epochs that end inside the warm-up (a barely trained head
    can win a small selection split by a tie); the last epoch is always selectable."""
    if not cfg.trainer.get("selection_skips_warmup", False) or epoch >= epochs or steps >= total_steps:
        return True
    return steps > warmup_steps(cfg, total_steps)


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


AUTO_EVAL_BATCH = {"cuda": 256, "cpu": 64}  # trainer.eval_batch_size=auto, by device type (others: the cpu's)


def eval_batch_size(setting, device: torch.device) -> int:
    """trainer.eval_batch_size: a number, or auto (AUTO_EVAL_BATCH: a CPU gains no speed from larger batches, only
    memory)."""
    return AUTO_EVAL_BATCH.get(device.type, AUTO_EVAL_BATCH["cpu"]) if setting == "auto" else int(setting)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def predict(
    model: nn.Module, loader, device: torch.device, precision: str = "fp32", desc: str = "eval", progress: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(logits [N, C], labels [N]) over a loader, in eval mode."""
    model.eval()
    logits, labels = [], []
    for batch in tqdm(loader, desc=desc, leave=False, disable=not progress or None):
        batch = to_device(batch, device)
        labels.append(batch.pop("labels").cpu())
        with autocast(device, precision):
            logits.append(model(**batch).logits.float().cpu())
    return torch.cat(logits).numpy(), torch.cat(labels).numpy()


def predict_task(
    model, loader, task_cfg, device, precision="fp32", desc="eval", progress=False
) -> tuple[np.ndarray, np.ndarray]:
    """(predictions [N]: class ids, or the score for regression; labels [N]) over a task's loader, in eval mode."""
    logits, labels = predict(model, loader, device, precision, desc, progress)
    return glue_metrics.predictions_from_logits(logits, int(task_cfg.num_labels)), labels


def evaluate(model, loader, task_cfg, device, precision="fp32", desc="eval", progress=False) -> dict[str, float]:
    return glue_metrics.compute(
        list(task_cfg.metrics), *predict_task(model, loader, task_cfg, device, precision, desc, progress)
    )


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of every trainable tensor (mask scores included): the best epoch's weights."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in state.items():
            parameters[name].copy_(tensor)


@dataclass
class FitResult:
    """The loop's state while it runs (everything resume needs), and its result when done."""

    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # batches done in the current epoch
    steps: int = 0
    epoch_losses: list = field(default_factory=list)
    epoch_correct: dict = field(default_factory=dict)  # task index -> [right, rows] of the epoch's classifications
    epoch_seconds: float = 0.0  # time spent in the current epoch so far
    best_epoch: int = -1
    best_score: float = -math.inf
    best_selection: dict = field(default_factory=dict)
    best_state: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    train_seconds: float = 0.0
    examples_seen: int = 0
    tokens_seen: int = 0


class Diverged(Exception):
    """Training produced a non-finite loss or weight: one line with the step, the value and the likely cause."""

    def __init__(self, step: int, what: str, cfg, directory=None):
        t = cfg.trainer
        kept = f"the last checkpoint stays in {directory}" if directory is not None else "nothing was saved"
        super().__init__(
            f"training stopped at step {step}: {what} is not finite; likely cause: learning rates too "
            f"large for this run (trainer.lr={t.lr}, trainer.head_lr={t.head_lr}, mask.lr={cfg.mask.lr}) "
            f"or overflow in trainer.precision={t.precision}; {kept}"
        )


def fit(
    model,
    train_loader,
    select,
    cfg,
    head_names: set[str],
    device,
    log_fn=lambda record: None,
    checkpointer=None,
    ctx: distributed.Context | None = None,
    task_names=None,
    eval_rows: tuple[int, int] = (0, 0),
) -> FitResult:
    """Train for cfg.trainer.epochs (or until cfg.trainer.max_steps), calling `select(model)` ->
    (selection metrics, score) after every epoch (train.py: the mean of the tasks' scores; one task: its
    score); keeps the best epoch's trainable weights in result.best_state. `log_fn` gets every
    epoch's record and, every trainer.log_every_steps steps, the loss and learning rates (step_log.StepLog).
    An epoch's record has its training accuracy: the share of the epoch's training rows (classification batches; the
    loss's own logits, in train mode, as the weights move) whose argmax is the label, `train/accuracy`, or with
    `task_names` (a multi-task run: the batches' task index -> name) `train/<task>/accuracy` per classification task;
    regression batches count none. Data-parallel: rank 0's rows of each batch (the process that writes metrics.json).
    With a checkpointer: continues from its checkpoint if there is one, saves one after every epoch
    and every checkpointer.save_steps steps, and on SIGINT/SIGTERM saves and raises Interrupted.
    Data-parallel (ctx.world_size > 1): each process trains on its slice of every batch through DDP.
    `eval_rows`: (selection rows, test rows), for the whole run's ETA (step_log.EvalPlan)."""
    ctx = ctx or distributed.Context()  # one process
    t = cfg.trainer
    steps_per_epoch = len(train_loader)
    total_steps = int(t.epochs) * steps_per_epoch
    if t.max_steps is not None:
        total_steps = min(total_steps, int(t.max_steps))
    epochs = math.ceil(total_steps / steps_per_epoch)
    optimizer, scheduler = make_optimizer(model, cfg, head_names, total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=(t.precision == "fp16"))
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    train_model = distributed.wrap(model, ctx, device)  # DDP when data-parallel, else the model itself
    progress = bool(t.progress)
    evaluation = EvalPlan(epochs, int(t.batch_size), *eval_rows)
    step_log = StepLog(
        int(t.log_every_steps),
        total_steps,
        cfg.method.name,
        log_fn,
        lines=not bar_shown(progress),
        evaluation=evaluation,
    )
    data_order = train_loader.generator  # its state when an epoch begins fixes that epoch's batches
    result, epoch_order = FitResult(), data_order.get_state()
    if checkpointer is not None and checkpointer.exists():
        result, epoch_order = checkpointer.load(model, optimizer, scheduler, scaler, FitResult)
        data_order.set_state(epoch_order)
        logger.info("resuming from %s at epoch %d, step %d", checkpointer.directory, result.epoch + 1, result.steps)

    def train_step(batch) -> float:
        batch = to_device(distributed.shard(batch, ctx), device)
        with autocast(device, t.precision):
            output = train_model(**batch)
            loss = output.loss
        count_correct(output.logits.detach(), batch)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(trainable, t.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def count_correct(logits: torch.Tensor, batch: dict) -> None:
        """Add a classification batch's right answers and rows to its task's count for the epoch."""
        if logits.shape[-1] == 1:
            return
        task = str(int(batch["task"][0])) if "task" in batch else "0"
        counts = result.epoch_correct.setdefault(task, [0, 0])
        counts[0] += int((logits.argmax(-1) == batch["labels"]).sum())
        counts[1] += int(batch["labels"].shape[0])

    def train_accuracy() -> dict[str, float]:
        """The epoch's training accuracy per classification task (fit's docstring)."""
        return {
            f"train/{task_names[int(i)]}/accuracy" if task_names else "train/accuracy": right / rows
            for i, (right, rows) in sorted(result.epoch_correct.items(), key=lambda item: int(item[0]))
        }

    def resume_dir():
        return checkpointer.directory if checkpointer is not None and checkpointer.exists() else None

    def save_checkpoint(order_state):
        if checkpointer is None:
            return
        if not all(bool(torch.isfinite(p).all()) for p in trainable):  # never a diverged state on disk
            raise Diverged(result.steps, "a trainable weight", cfg, resume_dir())
        checkpointer.save(result, model, optimizer, scheduler, scaler, order_state)

    def stop_if_diverged(loss: float) -> None:
        if distributed.any_process(ctx, not math.isfinite(loss)):  # every process stops at this step
            where = "" if not math.isfinite(loss) else " here; not finite on at least one process"
            raise Diverged(result.steps + 1, f"the training loss ({loss}{where})", cfg, resume_dir())

    def stop_if_asked(stop) -> None:
        if distributed.any_process(ctx, stop.signum is not None):  # every process stops at the same step
            raise Interrupted(stop.signum or signal.SIGTERM, checkpointer.directory)

    def end_epoch() -> None:
        """Score the epoch on the selection split, log it, keep the best weights, checkpoint."""
        started = time.perf_counter()
        selection, score = select(model)
        evaluation.pass_seconds = time.perf_counter() - started
        record = {
            "epoch": result.epoch + 1,
            "step": result.steps,
            "train_loss": float(np.mean(result.epoch_losses)),
            **train_accuracy(),
            "epoch_seconds": result.epoch_seconds,
            **{f"select/{k}": v for k, v in selection.items()},
        }
        result.history.append(record)
        result.train_seconds += result.epoch_seconds
        log_fn(record)
        logger.info(
            "epoch %d/%d: step %d, train loss %.4f, selection score %.4f, %.0f s",
            result.epoch + 1,
            epochs,
            result.steps,
            record["train_loss"],
            score,
            result.epoch_seconds,
        )
        if score > result.best_score and selectable(cfg, result.steps, total_steps, result.epoch + 1, epochs):
            result.best_epoch, result.best_score, result.best_selection = result.epoch + 1, score, selection
            result.best_state = trainable_state(model)
        result.epoch, result.step_in_epoch, result.epoch_losses, result.epoch_seconds = result.epoch + 1, 0, [], 0.0
        result.epoch_correct = {}
        save_checkpoint(data_order.get_state())

    save_steps = getattr(checkpointer, "save_steps", None)
    with StopOnSignal() as stop:
        while result.epoch < epochs and result.steps < total_steps:
            # the epoch's batches: its data order (a resumed epoch replays its order and skips what was done)
            if result.step_in_epoch == 0:
                epoch_order = data_order.get_state()
            else:
                data_order.set_state(epoch_order)
            model.train()
            batches = iter(train_loader)
            for _ in range(result.step_in_epoch):
                next(batches)
            start = time.perf_counter()
            step_log.restart(result.steps)
            bar = tqdm(
                batches,
                desc=f"epoch {result.epoch + 1}/{epochs}",
                initial=result.step_in_epoch,
                total=steps_per_epoch,
                leave=False,
                disable=not progress or None,
            )

            for batch in bar:
                result.examples_seen += batch["input_ids"].shape[0]
                result.tokens_seen += int(batch["attention_mask"].sum())
                loss = train_step(batch)
                stop_if_diverged(loss)
                result.epoch_losses.append(loss)
                result.steps += 1
                result.step_in_epoch += 1
                step_log.after_step(result.steps, result.epoch_losses, optimizer.param_groups, result.epoch)
                bar.set_postfix(loss=f"{loss:.4f}", run_eta=step_log.eta)
                if result.steps >= total_steps or result.step_in_epoch >= steps_per_epoch:
                    break
                stopping = distributed.any_process(ctx, stop.signum is not None)
                if stopping or (save_steps and result.steps % save_steps == 0):  # a checkpoint mid-epoch
                    result.epoch_seconds += time.perf_counter() - start
                    start = time.perf_counter()
                    save_checkpoint(epoch_order)
                    if stopping:
                        raise Interrupted(stop.signum or signal.SIGTERM, checkpointer.directory)
            result.epoch_seconds += time.perf_counter() - start

            end_epoch()
            stop_if_asked(stop)
    return result
