"""The lifecycle every run shares (train.py's recipe, one task or several): validate; skip a finished
run or resume a checkpoint (either must be of this config); record the config; seed; pick the device; fit with
W&B; meet at the end. USER_ERRORS are the failures the command line turns into one line and exit 2."""

from __future__ import annotations

import logging
import platform
import random
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from propetl import methods
from propetl.data import glue
from propetl.models import backbone
from propetl.run import distributed, log, loop, rundir
from propetl.run.fingerprint import DATA_KEY
from propetl.run.resume import Checkpointer
from propetl.storage import checkpoint
from propetl.storage.files import WriteError
from propetl.validate import ConfigError, validate

logger = logging.getLogger("propetl")
USER_ERRORS = (
    ConfigError,
    glue.DataError,
    backbone.ModelError,
    checkpoint.CheckpointError,
    rundir.RunDirectoryError,
    loop.Diverged,
    WriteError,
)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={name} but no CUDA device is available; allowed here: auto, cpu")
    return torch.device(name)


def begin_run(cfg: DictConfig, output_dir: Path, claim: rundir.Claim | None = None):
    """Validate, find a finished run or a checkpoint (either must be of this config's fingerprint), record the config,
    seed, pick the device. trainer.resume=false sets the old results aside (rundir.set_aside) rather than deleting them.
    Returns (finished metrics or None, distributed context, checkpointer, device)."""
    methods.import_prototype(cfg.prototype)  # a user's prototype whose yaml names its module
    validate(cfg)
    log.wandb_settings(cfg)  # W&B's environment variables (WANDB_MODE) are input too: refused before anything runs
    ctx = distributed.from_environment()  # torchrun / accelerate launch: several processes, one run
    claim = claim or rundir.Claim(output_dir, made=False)
    if ctx.is_main:
        rundir.recover(output_dir)  # a replacement (trainer.resume=false) cut off by a kill
    checkpointer = Checkpointer(output_dir, cfg, cfg.trainer.save_steps, writes=ctx.is_main)
    if cfg.trainer.resume is False:
        if ctx.is_main:  # starting over: the old results wait in .previous/ until it finishes
            rundir.set_aside(claim)
    elif (finished := rundir.finished_run(output_dir, checkpointer.fingerprint)) is not None:
        logger.info("%s is finished (metrics.json exists): skipped; trainer.resume=false runs it again", output_dir)
        return finished, ctx, checkpointer, None
    elif checkpointer.exists():
        checkpointer.check_fingerprint()
    elif cfg.trainer.resume is True:
        what = f"trainer.resume=true but {checkpointer.directory} holds no checkpoint"
        raise ConfigError(f"{what}; point hydra.run.dir at the run to continue, or use trainer.resume=auto")
    elif (output_dir / "checkpoint").exists():
        what = f"{output_dir} holds a checkpoint/ but no metrics.json or resume/ to continue from"
        replace = "trainer.resume=false to replace it (kept until the new run has finished)"
        raise rundir.RunDirectoryError(f"{what}; choose another hydra.run.dir, or {replace}")
    output_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    device = distributed.device_for(ctx, pick_device(cfg.trainer.device))
    distributed.init(ctx, device)
    if cfg.trainer.precision == "fp16" and device.type != "cuda":
        raise ConfigError(f"trainer.precision=fp16 needs a CUDA device (device is {device}); allowed here: fp32, bf16")
    if ctx.is_main:  # only now: a finished or another config's run is left as it was
        rundir.write_record(output_dir, cfg, rundir.command_overrides())
    return None, ctx, checkpointer, device


def run_facts(cfg, result, started: float, device, ctx, checkpointer: Checkpointer) -> dict:
    """The metrics.json fields every run has: progress, timings, machine, the data's sha256 (fingerprint.DATA_KEY)."""
    return {
        "data_sha256": checkpointer.fingerprint[DATA_KEY],
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "steps": result.steps,
        "history": result.history,
        "train_seconds": result.train_seconds,
        "wall_seconds": time.perf_counter() - started,
        "train_tokens": result.tokens_seen,
        "train_examples": result.examples_seen,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "host": platform.node(),
        "world_size": ctx.world_size,
    }


def fit_logged(
    cfg,
    output_dir: Path,
    model,
    train_batches,
    select,
    head_names: set[str],
    device,
    checkpointer,
    ctx,
    eval_rows: tuple[int, int] = (0, 0),
):
    """Start (or continue) the W&B run, fit, put the best epoch's weights back: (W&B run, FitResult, start time).
    eval_rows: (selection rows, test rows), for the whole run's ETA."""
    run = log.start_wandb(cfg, output_dir, run_id=checkpointer.saved_extra().get("wandb_id"), enabled=ctx.is_main)
    checkpointer.extra["wandb_id"] = run.id
    started = time.perf_counter()
    log_fn = lambda record: run.log(record, step=record["step"])
    task_names = model.task_names if cfg.get("mode") == "multitask" else None
    result = loop.fit(
        model, train_batches, select, cfg, head_names, device, log_fn, checkpointer, ctx, task_names, eval_rows
    )
    loop.load_trainable_state(model, result.best_state)
    return run, result, started


def end_run(ctx) -> None:
    """Every process meets here once rank 0 has written its files; then the process group closes."""
    distributed.barrier(ctx)
    distributed.shutdown(ctx)
