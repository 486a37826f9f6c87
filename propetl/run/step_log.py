"""Every `trainer.log_every_steps` training steps: a W&B record (the training loss, each parameter group's learning
rate) and, where no progress bar shows, one line: `step 120/2000 loss 0.5321 4.1 it/s eta 7m38s`, the ETA the whole
run's (EvalPlan)."""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger("propetl")

# loop.parameter_groups' groups -> the name of their learning rate (`lr/<name>`); *_no_decay share it
GROUP_NAMES = {"masks": "mask", "head": "head", "head_no_decay": "head"}
WEIGHTS_NAMES = {"finetune": "backbone", "propetl": "prototype"}  # petl, peft: "petl"


def bar_shown(progress: bool, stream=None) -> bool:
    """Whether the loop's tqdm bar shows: trainer.progress and stderr a terminal (tqdm's disable=None)."""
    stream = sys.stderr if stream is None else stream
    return progress and hasattr(stream, "isatty") and stream.isatty()


def learning_rates(param_groups: list[dict], method: str) -> dict[str, float]:
    """{"lr/prototype", "lr/mask", "lr/head"}: each group's current rate, its weights named by method."""
    rates: dict[str, float] = {}
    for group in param_groups:
        name = GROUP_NAMES.get(group["name"], WEIGHTS_NAMES.get(method, "petl"))
        rates.setdefault(f"lr/{name}", float(group["lr"]))
    return rates


def duration(seconds: float) -> str:
    """7m38s, 2h05m, 12s."""
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


@dataclass
class EvalPlan:
    """The evaluation left after the training steps (a selection pass an epoch, the test pass at the end), for the run's
    ETA: a pass's time as last measured (`pass_seconds`), before that a forward pass, a third of a training step's."""

    epochs: int
    batch_size: int
    selection_rows: int
    test_rows: int
    pass_seconds: float | None = None

    def seconds_left(self, epochs_done: int, steps_per_second: float) -> float:
        per_pass = self.pass_seconds
        if per_pass is None:
            per_pass = self.selection_rows / (3 * steps_per_second * self.batch_size) if steps_per_second > 0 else 0.0
        per_row = per_pass / self.selection_rows if self.selection_rows else 0.0
        return max(self.epochs - epochs_done, 0) * per_pass + self.test_rows * per_row


def progress_line(step: int, total: int, loss: float, steps_per_second: float, eval_seconds: float = 0.0) -> str:
    """The log line; `eta` is the whole run's: the training steps left and `eval_seconds` of evaluation still to come."""
    eta = duration((total - step) / steps_per_second + eval_seconds) if steps_per_second > 0 else "?"
    return f"step {step}/{total} loss {loss:.4f} {steps_per_second:.1f} it/s eta {eta}"


class StepLog:
    """Called after every optimizer step; every `every` steps `record_fn` gets {"step", "train/loss" (the mean over
    those steps), "lr/…"}, and with `lines` the progress line goes to the propetl logger (stderr and train.log)."""

    def __init__(
        self,
        every: int,
        total_steps: int,
        method: str,
        record_fn,
        lines: bool,
        clock=time.perf_counter,
        evaluation: EvalPlan | None = None,
    ):
        self.every, self.total_steps, self.method = every, total_steps, method
        self.record_fn, self.lines, self.clock, self.evaluation = record_fn, lines, clock, evaluation
        self.eta = "?"  # the whole run's, as the last line said (the bar shows it too)
        self.restart(0)

    def restart(self, steps: int) -> None:
        """The rate counts from here (an epoch's start: selection and checkpoints in between are not steps)."""
        self.since_step, self.since_time = steps, self.clock()

    def after_step(self, steps: int, epoch_losses: list[float], param_groups: list[dict], epochs_done: int = 0) -> None:
        if steps % self.every:
            return
        loss = float(np.mean(epoch_losses[-self.every :]))
        self.record_fn({"step": steps, "train/loss": loss, **learning_rates(param_groups, self.method)})
        now = self.clock()
        rate = (steps - self.since_step) / max(now - self.since_time, 1e-9)
        evaluation = self.evaluation.seconds_left(epochs_done, rate) if self.evaluation else 0.0
        line = progress_line(steps, self.total_steps, loss, rate, evaluation)
        self.eta = line.rsplit("eta ", 1)[1]
        if self.lines:
            logger.info(line)
        self.since_step, self.since_time = steps, now
