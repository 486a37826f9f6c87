"""One training run, `train(cfg, output_dir)`, which reads top to bottom like a recipe (propetl-train's
command line and Hydra entry: propetl/cli.py)."""
from __future__ import annotations

import logging
import platform
import random
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

import propetl  # noqa: F401  (registers the config resolvers)
from propetl import data, distributed, log, loop, methods, rundir, storage
from propetl import metrics as glue_metrics
from propetl import model as backbone
from propetl.batches import make_loader
from propetl.cli import main  # noqa: F401  (an install made before propetl/cli.py existed calls propetl.train:main)
from propetl.resume import Checkpointer
from propetl.validate import ConfigError, validate

logger = logging.getLogger("propetl")
USER_ERRORS = (ConfigError, data.DataError, backbone.ModelError, storage.CheckpointError, rundir.RunDirectoryError,
               loop.Diverged)


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


def begin_run(cfg: DictConfig, output_dir: Path):
    """What every run does first: validate, find a finished run or a checkpoint (either must be of this
    config), record the config, seed, pick the device.
    Returns (finished metrics or None, distributed context, checkpointer, device)."""
    methods.import_prototype(cfg.prototype)     # a user's prototype whose yaml names its module
    validate(cfg)
    ctx = distributed.from_environment()        # torchrun / accelerate launch: several processes, one run
    checkpointer = Checkpointer(output_dir, cfg, cfg.trainer.save_steps, writes=ctx.is_main)
    if cfg.trainer.resume is False:
        checkpointer.discard()
        if ctx.is_main:                          # starting over: the old results go with the old record
            (output_dir / rundir.METRICS_FILE).unlink(missing_ok=True)
    elif (finished := rundir.finished_run(output_dir, cfg)) is not None:
        logger.info("%s is finished (metrics.json exists): skipped; trainer.resume=false runs it again", output_dir)
        return finished, ctx, checkpointer, None
    elif checkpointer.exists():
        checkpointer.check_fingerprint()
    elif cfg.trainer.resume is True:
        raise ConfigError(f"trainer.resume=true but {checkpointer.directory} holds no checkpoint; "
                          f"point hydra.run.dir at the run to continue, or use trainer.resume=auto")
    output_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    device = distributed.device_for(ctx, pick_device(cfg.trainer.device))
    distributed.init(ctx, device)
    if cfg.trainer.precision == "fp16" and device.type != "cuda":
        raise ConfigError(f"trainer.precision=fp16 needs a CUDA device (device is {device}); allowed here: fp32, bf16")
    if ctx.is_main:                              # only now: a finished or another config's run is left as it was
        rundir.write_record(output_dir, cfg, rundir.command_overrides())
    return None, ctx, checkpointer, device


def run_facts(cfg, result, started: float, device, ctx) -> dict:
    """The metrics.json fields every run has: progress, timings, machine."""
    return {
        "best_epoch": result.best_epoch, "epochs_run": len(result.history), "steps": result.steps,
        "history": result.history, "train_seconds": result.train_seconds, "wall_seconds": time.perf_counter() - started,
        "train_tokens": result.tokens_seen, "train_examples": result.examples_seen,
        "device": str(device), "torch_threads": torch.get_num_threads(), "host": platform.node(),
        "world_size": ctx.world_size,
    }


def fit_logged(cfg, output_dir: Path, model, train_batches, select, head_names: set[str], device, checkpointer, ctx):
    """Start (or continue) the run's W&B run, fit, and put the best epoch's weights back in the model.
    Returns (W&B run, FitResult, start time)."""
    run = log.start_wandb(cfg, output_dir, run_id=checkpointer.saved_extra().get("wandb_id"), enabled=ctx.is_main)
    checkpointer.extra["wandb_id"] = run.id
    started = time.perf_counter()
    result = loop.fit(model, train_batches, select, cfg, head_names, device,
                      log_fn=lambda record: run.log(record, step=record["step"]), checkpointer=checkpointer, ctx=ctx)
    loop.load_trainable_state(model, result.best_state)
    return run, result, started


def end_run(ctx) -> None:
    """Every process meets here once rank 0 has written its files; then the process group closes."""
    distributed.barrier(ctx)
    distributed.shutdown(ctx)


def train(cfg: DictConfig, output_dir: Path) -> dict:
    """One run: data -> model + method -> fit (best epoch on the selection split) -> test -> save -> report."""
    output_dir = Path(output_dir)
    if cfg.get("mode") == "multitask":
        from propetl.multitask import train_multitask
        return train_multitask(cfg, output_dir)
    finished, ctx, checkpointer, device = begin_run(cfg, output_dir)
    if finished is not None:
        return finished
    task = cfg.task

    # 1. data: GLUE splits (selection / test per data.protocol) and dynamically padded batches
    splits = data.load_glue(task, data.resolve_data_dir(cfg.data.dir), cfg.data.protocol, cfg.data.split_seed,
                            cfg.data.allow_hub)
    splits = data.sample_train(splits, cfg.data.max_train_examples, cfg.data.split_seed)
    tokenizer = backbone.load_tokenizer(cfg.model)
    regression = int(task.num_labels) == 1

    def loader(split: str, batch_size: int, shuffle: bool):
        return make_loader(splits[split], tokenizer, cfg.data.max_length, regression, batch_size, shuffle, cfg.seed,
                           group_by_length=bool(cfg.data.group_by_length))

    train_loader = loader("train", cfg.trainer.batch_size, True)
    select_loader = loader("validation", cfg.trainer.eval_batch_size, False)
    test_loader = loader("test", cfg.trainer.eval_batch_size, False)

    # 2. model: the pre-trained backbone, a fresh head, and the method (finetune / petl / propetl)
    model = backbone.build(cfg, int(task.num_labels)).to(device)
    head_names = backbone.head_parameter_names(model)
    backbone_params = storage.backbone_params(model, head_names)
    logger.info("%s: %d train / %d selection / %d test examples, %d steps per epoch, device %s",
                task.name, len(splits["train"]), len(splits["validation"]), len(splits["test"]), len(train_loader), device)

    # 3. train, choosing the best epoch on the selection split; then score it on the test split
    select = loop.selection_on(select_loader, task, device, cfg.trainer.precision, cfg.trainer.progress)
    run, result, started = fit_logged(cfg, output_dir, model, train_loader, select, head_names, device, checkpointer, ctx)
    test = loop.evaluate(model, test_loader, task, device, cfg.trainer.precision, "test", cfg.trainer.progress)

    # 4. storage: count it, write the checkpoint, and read the real file sizes back (rank 0 writes)
    figures = storage.account(model, cfg, head_names, backbone_params)
    if not ctx.is_main:                          # rank 0 writes the files
        end_run(ctx)
        return {"glue_score": glue_metrics.task_score(task.name, test), "test": test}
    if cfg.trainer.save_weights:
        storage.save_checkpoint(model, cfg, head_names, output_dir / "checkpoint")
        figures.update(storage.file_figures(output_dir / "checkpoint", figures))

    # 5. report: metrics.json (atomic), W&B summary, summary table
    metrics = {
        "task": task.name, "model": cfg.model.name, "method": cfg.method.name, "prototype": cfg.prototype.name,
        "mask_kind": cfg.mask.kind, "mask_sparsity": float(cfg.mask.sparsity), "seed": int(cfg.seed),
        "protocol": cfg.data.protocol, "split_seed": int(cfg.data.split_seed),
        "selection_metric": task.selection_metric,
        "selection": result.best_selection, "test": test,
        "glue_score": glue_metrics.task_score(task.name, test),
        "trivial": glue_metrics.trivial_baseline(task.name, list(task.metrics), splits["train"]["label"],
                                                 splits["test"]["label"], regression),
        "storage": figures, **run_facts(cfg, result, started, device, ctx),
    }
    log.write_metrics(output_dir / "metrics.json", metrics)
    checkpointer.discard()                     # the run is complete: its training state is no longer needed
    run.summary.update({**{f"test/{k}": v for k, v in test.items()}, "glue_score": metrics["glue_score"],
                        **{f"storage/{k}": v for k, v in figures.items()}})
    logger.info("results in %s\n%s", output_dir, log.summary_table(metrics))
    end_run(ctx)
    return metrics


if __name__ == "__main__":         # python -m propetl.train: the same command as propetl-train
    main()
