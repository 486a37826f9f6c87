"""The training/evaluation loop: AdamW with parameter groups, linear warm-up/decay, evaluation every
epoch, best epoch chosen on the selection split. Reads top to bottom; knows nothing of methods."""

from __future__ import annotations

import logging
import math
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from propetl import methods
from propetl.data import metrics as glue_metrics
from propetl.run import distributed, fused
from propetl.run.resume import Interrupted, StopOnSignal
from propetl.run.step_log import EvalPlan, StepLog, bar_shown

logger = logging.getLogger("propetl")

NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight")
IGNORE_INDEX = -100  # label positions a text-to-text loss skips (data.seq2seq.LABEL_PAD)


def parameter_groups(model: nn.Module, cfg, head_names: set[str]) -> list[dict]:
    """AdamW groups: PETL weights (or the backbone), mask scores (own lr), head; biases without decay; method=peft:
    the tensors whose name holds a key of peft.lrs at that lr (VB-LoRA's vector bank). trainer.mask_lr_ratio: the
    mask scores' lr is that many times trainer.lr; the schedule scales every group by the same factor, so before every
    step the masks' lr is the ratio x the weights' current lr (the reference's T5 trainer)."""
    t = cfg.trainer
    ratio = t.get("mask_lr_ratio")
    mask_lr = cfg.mask.lr if ratio is None else float(ratio) * float(t.lr)
    own = dict(OmegaConf.select(cfg, "peft.lrs", default=None) or {}) if cfg.method.name == "peft" else {}
    settings = {
        "weights": (t.lr, t.weight_decay),
        "weights_no_decay": (t.lr, 0.0),
        **{f"weights/{key}": (lr, t.weight_decay) for key, lr in own.items()},
        "masks": (mask_lr, cfg.mask.weight_decay),
        "head": (t.head_lr, t.weight_decay),
        "head_no_decay": (t.head_lr, 0.0),
    }
    weights = methods.petl_weights(model)
    scores = {id(p) for p in weights.score_parameters()} if weights is not None else set()
    groups: dict[str, list[nn.Parameter]] = {key: [] for key in settings}
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
    """trainer.warmup_steps when set (the reference's T5: 500), else warmup_ratio of the run's steps."""
    if cfg.trainer.get("warmup_steps") is not None:
        return min(int(cfg.trainer.warmup_steps), total_steps)
    return math.ceil(cfg.trainer.warmup_ratio * total_steps)


def make_optimizer(
    model: nn.Module, cfg, head_names: set[str], total_steps: int
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg, head_names), betas=(0.9, 0.999), eps=1e-8)
    return optimizer, get_linear_schedule_with_warmup(optimizer, warmup_steps(cfg, total_steps), total_steps)


def selectable(cfg, steps: int, total_steps: int, epoch: int, epochs: int) -> bool:
    """Whether an epoch ending after `steps` may be the selected one: with trainer.selection_skips_warmup, not one
    ending in the warm-up (a barely trained head can win a small selection split by a tie) unless it is the last."""
    if not cfg.trainer.get("selection_skips_warmup", False) or epoch >= epochs or steps >= total_steps:
        return True
    return steps > warmup_steps(cfg, total_steps)


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


AUTO_EVAL_BATCH = {"cuda": 256, "cpu": 64}  # trainer.eval_batch_size=auto, by device type (others: the cpu's)


def eval_batch_size(setting, device: torch.device) -> int:
    """trainer.eval_batch_size: a number, or auto (AUTO_EVAL_BATCH: larger batches only cost a CPU memory)."""
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
    predicted = predict_task(model, loader, task_cfg, device, precision, desc, progress)
    return glue_metrics.compute(list(task_cfg.metrics), *predicted)


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

    def add_step(self, loss: float, logits: torch.Tensor, batch: dict) -> None:
        """A step done: its loss, and for a classification batch its right answers and rows in its task's count."""
        self.epoch_losses.append(loss)
        self.steps += 1
        self.step_in_epoch += 1
        if logits.shape[-1] == 1:  # regression
            return
        task = str(int(batch["task"][0])) if "task" in batch else "0"
        counts = self.epoch_correct.setdefault(task, [0, 0])
        labels = batch["labels"]
        if logits.ndim == 3:  # text to text [B, T, V]: teacher-forced token accuracy over the label tokens
            scored = labels != IGNORE_INDEX
            counts[0] += int(((logits.argmax(-1) == labels) & scored).sum())
            counts[1] += int(scored.sum())
            return
        counts[0] += int((logits.argmax(-1) == labels).sum())
        counts[1] += int(labels.shape[0])

    def close_epoch(self, selection: dict, score: float, epochs: int, task_names) -> dict:
        """The epoch's record (fit's docstring), added to the history and logged; the next epoch's counts start."""
        record = {
            "epoch": self.epoch + 1,
            "step": self.steps,
            "train_loss": float(np.mean(self.epoch_losses)),
            **{
                f"train/{task_names[int(i)]}/accuracy" if task_names else "train/accuracy": right / rows
                for i, (right, rows) in sorted(self.epoch_correct.items(), key=lambda item: int(item[0]))
            },
            "epoch_seconds": self.epoch_seconds,
            **{f"select/{k}": v for k, v in selection.items()},
        }
        self.history.append(record)
        self.train_seconds += self.epoch_seconds
        done = (self.epoch + 1, epochs, self.steps, record["train_loss"], score, self.epoch_seconds)
        logger.info("epoch %d/%d: step %d, train loss %.4f, selection score %.4f, %.0f s", *done)
        self.epoch += 1
        self.step_in_epoch, self.epoch_losses, self.epoch_correct, self.epoch_seconds = 0, [], {}, 0.0
        return record


class Diverged(Exception):
    """Training produced a non-finite loss or weight: one line with the step, the value and the likely cause."""

    def __init__(self, step: int, what: str, cfg, checkpointer=None):
        t = cfg.trainer
        saved = checkpointer is not None and checkpointer.exists()
        kept = f"the last checkpoint stays in {checkpointer.directory}" if saved else "nothing was saved"
        rates = f"trainer.lr={t.lr}, trainer.head_lr={t.head_lr}, mask.lr={cfg.mask.lr}"
        cause = f"learning rates too large for this run ({rates}) or overflow in trainer.precision={t.precision}"
        super().__init__(f"training stopped at step {step}: {what} is not finite; likely cause: {cause}; {kept}")


class Optimization(NamedTuple):
    """AdamW, its schedule and the grad scaler (fp16; else a pass-through), as resume.Checkpointer takes them."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler

    def parameters(self) -> list[nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def step(self, loss: torch.Tensor, max_grad_norm: float) -> None:
        """Backward, the gradients clipped to max_grad_norm, one step of the optimizer, scaler and schedule."""
        self.scaler.scale(loss).backward()
        self.apply(max_grad_norm)

    def apply(self, max_grad_norm: float) -> None:
        """The step after backward: the gradients clipped to max_grad_norm, optimizer, scaler, schedule."""
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.parameters(), max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)


def train_step(
    model, batch: dict, optimization: Optimization, device, precision: str, max_grad_norm: float
) -> tuple[float, torch.Tensor]:
    """One optimizer step on a batch (this process's rows, on the device): (its loss, its logits). A fused run's
    forward and backward are its group's (run/fused.py); its optimizer step is its own."""
    if (group := fused.current()) is not None:
        step = optimization.scheduler.last_epoch  # steps taken before this one: its dropout's key
        loss, logits = group.forward_backward(model, batch, lambda: autocast(device, precision), step)
        optimization.apply(max_grad_norm)
        return loss, logits
    with autocast(device, precision):
        output = model(**batch)
    logits = output.logits.detach()
    optimization.step(output.loss, max_grad_norm)
    return output.loss.item(), logits


@contextmanager
def fused_run(seed: int):
    """A fused run draws its dropout from its seed, and leaves its group however its loop ends (the others stop
    waiting for its batches)."""
    fused.seed_dropout(seed)
    try:
        yield
    finally:
        fused.leave()


def start_or_resume(checkpointer, model, optimization: Optimization, data_order) -> tuple[FitResult, torch.Tensor]:
    """A fresh loop state, or the checkpoint's restored; and the data order's state as the current epoch began."""
    if checkpointer is None or not checkpointer.exists():
        return FitResult(), data_order.get_state()
    state, epoch_order = checkpointer.load(model, *optimization, FitResult)
    data_order.set_state(epoch_order)
    logger.info("resuming from %s at epoch %d, step %d", checkpointer.directory, state.epoch + 1, state.steps)
    return state, epoch_order


def epoch_batches(train_loader, step_in_epoch: int, epoch_order: torch.Tensor):
    """(the epoch's batches still to train on, the data order's state as it began): a resumed epoch replays its saved
    order and skips the batches done."""
    if step_in_epoch == 0:
        epoch_order = train_loader.generator.get_state()
    else:
        train_loader.generator.set_state(epoch_order)
    batches = iter(train_loader)
    for _ in range(step_in_epoch):
        next(batches)
    return batches, epoch_order


def save_checkpoint(checkpointer, state: FitResult, model, optimization: Optimization, data_order_state, cfg) -> None:
    """The loop's full state (resume.Checkpointer; without one, nothing); never a diverged state on disk."""
    if checkpointer is None:
        return
    if not all(bool(torch.isfinite(p).all()) for p in optimization.parameters()):
        raise Diverged(state.steps, "a trainable weight", cfg, checkpointer)
    checkpointer.save(state, model, *optimization, data_order_state)


def stop_if_diverged(loss: float, step: int, ctx, cfg, checkpointer) -> None:
    """A non-finite loss on any process: every process raises Diverged at this step."""
    if distributed.any_process(ctx, not math.isfinite(loss)):
        where = "" if not math.isfinite(loss) else " here; not finite on at least one process"
        raise Diverged(step, f"the training loss ({loss}{where})", cfg, checkpointer)


def interruption(stop: StopOnSignal, ctx, checkpointer) -> Interrupted | None:
    """SIGINT/SIGTERM on any process: the Interrupted every process raises at this step, once it has saved. Fused
    runs: the signal their group's last pass saw (all of them stop at the same step)."""
    group = fused.current()
    signum = stop.signum if group is None else group.stop_signum
    if distributed.any_process(ctx, signum is not None):
        return Interrupted(signum or signal.SIGTERM, checkpointer.directory)
    return None


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
    """Train for cfg.trainer.epochs (or until cfg.trainer.max_steps), scoring `select(model)` -> (selection metrics,
    score) after every epoch; the best epoch's trainable weights go to result.best_state. `log_fn` gets every epoch's
    record (with its training accuracy, `train/accuracy` or per task `train/<task>/accuracy` given `task_names`; rank 0's
    rows) and every trainer.log_every_steps steps the loss and learning rates. With a checkpointer: continues from its
    checkpoint, saves after every epoch and checkpointer.save_steps steps, and on SIGINT/SIGTERM saves and raises
    Interrupted. `eval_rows`: (selection rows, test rows), for the run's ETA (step_log.EvalPlan)."""
    ctx = ctx or distributed.Context()  # one process
    t = cfg.trainer
    steps_per_epoch = len(train_loader)
    total_steps = int(t.epochs) * steps_per_epoch
    if t.max_steps is not None:
        total_steps = min(total_steps, int(t.max_steps))
    epochs = math.ceil(total_steps / steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=(t.precision == "fp16"))  # fp16 only
    optimization = Optimization(*make_optimizer(model, cfg, head_names, total_steps), scaler)
    train_model = distributed.wrap(model, ctx, device)  # DDP when data-parallel, else the model itself
    evaluation = EvalPlan(epochs, int(t.batch_size), *eval_rows)
    lines = not bar_shown(bool(t.progress))
    step_log = StepLog(int(t.log_every_steps), total_steps, cfg.method.name, log_fn, lines, evaluation=evaluation)
    state, epoch_order = start_or_resume(checkpointer, model, optimization, train_loader.generator)
    save_steps = getattr(checkpointer, "save_steps", None)

    with StopOnSignal() as stop, fused_run(int(cfg.seed)):
        while state.epoch < epochs and state.steps < total_steps:
            # train on the epoch's batches, a checkpoint every save_steps steps and when asked to stop
            model.train()
            batches, epoch_order = epoch_batches(train_loader, state.step_in_epoch, epoch_order)
            start = time.perf_counter()
            step_log.restart(state.steps)
            desc, hidden = f"epoch {state.epoch + 1}/{epochs}", not t.progress or None
            bar = tqdm(
                batches, desc=desc, initial=state.step_in_epoch, total=steps_per_epoch, leave=False, disable=hidden
            )
            for batch in bar:
                state.examples_seen += batch["input_ids"].shape[0]
                state.tokens_seen += int(batch["attention_mask"].sum())
                batch = to_device(distributed.shard(batch, ctx), device)
                loss, logits = train_step(train_model, batch, optimization, device, t.precision, t.max_grad_norm)
                stop_if_diverged(loss, state.steps + 1, ctx, cfg, checkpointer)
                state.add_step(loss, logits, batch)
                step_log.after_step(state.steps, state.epoch_losses, optimization.optimizer.param_groups, state.epoch)
                bar.set_postfix(loss=f"{loss:.4f}", run_eta=step_log.eta)
                if state.steps >= total_steps or state.step_in_epoch >= steps_per_epoch:
                    break
                interrupted = interruption(stop, ctx, checkpointer)
                if interrupted or (save_steps and state.steps % save_steps == 0):
                    state.epoch_seconds += time.perf_counter() - start
                    start = time.perf_counter()
                    save_checkpoint(checkpointer, state, model, optimization, epoch_order, cfg)
                    if interrupted:
                        raise interrupted
            state.epoch_seconds += time.perf_counter() - start

            # score the epoch on the selection split, log it, keep the best weights, checkpoint
            started = time.perf_counter()
            selection, score = select(model)
            evaluation.pass_seconds = time.perf_counter() - started
            if score > state.best_score and selectable(cfg, state.steps, total_steps, state.epoch + 1, epochs):
                state.best_epoch, state.best_score, state.best_selection = state.epoch + 1, score, selection
                state.best_state = trainable_state(model)
            log_fn(state.close_epoch(selection, score, epochs, task_names))
            save_checkpoint(checkpointer, state, model, optimization, train_loader.generator.get_state(), cfg)
            if interrupted := interruption(stop, ctx, checkpointer):
                raise interrupted
    return state
