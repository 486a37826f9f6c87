"""Run outputs: the W&B run, metrics.json and predictions.npz (written atomically) and the end-of-run summary table."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
from omegaconf import OmegaConf

from propetl.configs import ConfigError
from propetl.storage import figures
from propetl.storage.files import atomic_write, atomic_write_text

_runs = threading.local()  # .run: this thread's W&B run (start_wandb), finished by finish_wandb

NAME_PARTS = {"sparsity": "s{}", "seed": "seed{}"}  # how a fact reads in a run's name (else as is)


def run_identity(cfg) -> dict[str, str]:
    """What a run is: task(s), method, prototype, mask sparsity, mask kind, seed. No prototype for
    fine-tuning; sparsity and mask kind only where there are masks (method=propetl)."""
    multitask = cfg.get("mode") == "multitask"
    facts = {
        "task": "multitask-" + "-".join(cfg.tasks) if multitask else str(cfg.task.name),
        "method": str(cfg.method.name),
    }
    if cfg.method.name != "finetune":
        facts["prototype"] = str(cfg.prototype.name)
    if cfg.method.name == "propetl":
        facts["sparsity"], facts["mask"] = f"{float(cfg.mask.sparsity):g}", str(cfg.mask.kind)
    facts["seed"] = str(cfg.seed)
    return facts


def run_name(cfg) -> str:
    """The W&B run's name, e.g. rte-propetl-lora-s0.5-learned-seed42, mrpc-petl-adapter-seed1, stsb-finetune-seed42."""
    return "-".join(NAME_PARTS.get(key, "{}").format(value) for key, value in run_identity(cfg).items())


def run_tags(cfg) -> list[str]:
    """The W&B run's tags, the same facts as key:value (task:rte, ..., seed:42; multi-task: multitask and
    a task: tag per task), then logger.tags."""
    facts = run_identity(cfg)
    multitask = cfg.get("mode") == "multitask"
    tasks = ["multitask", *(f"task:{t}" for t in cfg.tasks)] if multitask else [f"task:{facts['task']}"]
    tags = tasks + [f"{key}:{value}" for key, value in facts.items() if key != "task"]
    return tags + [str(tag) for tag in cfg.logger.tags if str(tag) not in tags]


WANDB_MODES = ("online", "offline", "disabled")
# W&B's own environment variables, which win over the logger config where set (W&B users set them, and W&B's docs
# advise them): logger key -> variable. WANDB_MODE=disabled or logger.mode=disabled: disabled whatever the other says.
WANDB_ENVIRONMENT = {
    "mode": "WANDB_MODE",
    "project": "WANDB_PROJECT",
    "entity": "WANDB_ENTITY",
    "group": "WANDB_RUN_GROUP",
}


def sweep_group() -> str | None:
    """A -m sweep's W&B group: its folder's last two parts (multirun/<date>_<time> -> 'multirun/<date>_<time>')."""
    # imported here, not at the top: the report imports log and needs no Hydra callback
    from propetl.run.sweep import sweep_dir

    folder = sweep_dir()
    return None if folder is None else "/".join(folder.parts[-2:])


def wandb_settings(cfg, environ=None) -> dict:
    """mode, project, entity, group of the W&B run: W&B's environment variables (WANDB_ENVIRONMENT) where set, else
    the logger config; the group of a -m sweep's jobs, if neither names one, is the sweep's (sweep_group).
    An unknown WANDB_MODE is a one-line ConfigError."""
    import os

    environ = os.environ if environ is None else environ
    chosen = {key: environ.get(variable) or cfg.logger.get(key) for key, variable in WANDB_ENVIRONMENT.items()}
    if (mode := environ.get("WANDB_MODE")) and mode not in WANDB_MODES:
        raise ConfigError(f"WANDB_MODE={mode!r} (environment) is invalid; allowed: {', '.join(WANDB_MODES)}")
    if "disabled" in (environ.get("WANDB_MODE"), cfg.logger.mode):
        chosen["mode"] = "disabled"
    chosen["group"] = chosen["group"] or sweep_group()
    return chosen


def start_wandb(cfg, output_dir: Path, run_id: str | None = None, enabled: bool = True):
    """One W&B run per Hydra job, writing under the job's own output directory (nothing when disabled); a resumed job
    passes its saved run id and continues the same W&B run. enabled=False (the other processes of a
    data-parallel run): a disabled run that logs nothing. Settings: wandb_settings."""
    import wandb

    from propetl.run import fused

    settings = wandb_settings(cfg)
    mode: Literal["online", "offline", "disabled"] = settings["mode"] if enabled else "disabled"
    together = fused.current() is not None  # fused runs: one W&B run each, side by side in this process
    _runs.run = wandb.init(
        id=run_id,
        resume="allow" if run_id else None,
        mode=mode,
        project=settings["project"],
        entity=settings["entity"],
        group=settings["group"],
        tags=run_tags(cfg),
        dir=None if mode == "disabled" else str(output_dir),
        reinit="create_new" if together else "finish_previous",
        name=run_name(cfg),
        config=cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True)),
    )
    return _runs.run


def best_epoch_summary(result) -> dict:
    """The W&B summary's selection figures: the best epoch's (not the last logged), and which epoch that was."""
    return {"best_epoch": result.best_epoch, **{f"select/{k}": v for k, v in result.best_selection.items()}}


def finish_wandb() -> None:
    """Finish this thread's W&B run (a fused run's own; else the process's)."""
    import wandb

    run, _runs.run = getattr(_runs, "run", None), None
    if run is not None:
        run.finish()
    else:
        wandb.finish()


def write_metrics(path: Path, metrics: dict) -> None:
    atomic_write_text(Path(path), json.dumps(metrics, indent=2) + "\n")


def write_predictions(
    path: Path, predicted: dict[str, tuple[np.ndarray, np.ndarray]], num_labels: dict[str, int]
) -> None:
    """predictions.npz (compressed): per task `<task>.predictions` and `<task>.labels` of its test split, class ids as
    int8 (int16 past 127 classes) for classification, float32 scores for regression; written atomically."""
    arrays: dict[str, np.ndarray] = {}
    for task, (predictions, labels) in predicted.items():
        dtype = np.float32 if num_labels[task] == 1 else np.int8 if num_labels[task] <= 127 else np.int16
        arrays[f"{task}.predictions"], arrays[f"{task}.labels"] = predictions.astype(dtype), labels.astype(dtype)
    atomic_write(Path(path), lambda f: np.savez_compressed(f, **arrays))  # type: ignore[arg-type]  # numpy's stub: **kwds typed bool


def read_predictions(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """predictions.npz -> {task: (test predictions, test labels)} (write_predictions)."""
    with np.load(Path(path)) as arrays:
        return {
            key.removesuffix(".predictions"): (arrays[key], arrays[key.replace(".predictions", ".labels")])
            for key in arrays.files
            if key.endswith(".predictions")
        }


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 100 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _row(label: str, first, second) -> str:
    return f"{label:<28}{_fmt(first):>14}{_fmt(second):>14}"


def _wide_row(label: str, value) -> str:
    return f"{label:<42}{_fmt(value):>14}"


def _summary(title: str, first_column: str, rows: list[str], metrics: dict) -> str:
    """The title, the best epoch, the metric rows (selection, test) and the storage rows, framed by two rules."""
    best = (
        f"best epoch {metrics['best_epoch']} of {metrics['epochs_run']} ({metrics['steps']} steps, "
        f"{metrics['train_seconds']:.0f} s training)"
    )
    lines = [title, best, "", _row(first_column, "selection", "test"), *rows, *storage_lines(metrics["storage"])]
    width = max(len(line) for line in lines)
    return "\n".join(["-" * width, *lines, "-" * width])


def summary_table(metrics: dict) -> str:
    """A one-screen summary of a finished run."""
    title = (
        f"{metrics['task']} | {metrics['model']} | {metrics['method']}"
        + ("" if metrics["method"] == "finetune" else f" {metrics['prototype']}")
        + (f" | mask sparsity {metrics['mask_sparsity']}" if metrics["method"] == "propetl" else "")
        + (" | frozen prototype" if metrics.get("prototype_frozen") else "")
        + f" | seed {metrics['seed']}"
    )
    rows = [_row(name, metrics["selection"].get(name), value) for name, value in metrics["test"].items()]
    rows.append(_row("GLUE score of the run", "", metrics["glue_score"]))
    if "trivial" in metrics:
        rule = metrics["trivial"]["rule"].split(" (")[0]
        rows.append(_wide_row(f"trivial baseline ({rule})", metrics["trivial"]["glue_score"]))
    return _summary(title, "metric", rows, metrics)


def multitask_summary_table(metrics: dict) -> str:
    """A one-screen summary of a finished multi-task run: per-task metrics and storage in bytes."""
    title = (
        f"multitask {','.join(metrics['tasks'])} | {metrics['model']} | {metrics['method']} {metrics['prototype']}"
        f" | mask {metrics['mask_combine']} sparsity {metrics['mask_sparsity']}"
        f"{' | frozen prototype' if metrics.get('prototype_frozen') else ''} | seed {metrics['seed']}"
    )
    rows = [
        _row(f"{task} {name}", result["selection"].get(name), value)
        for task, result in metrics["per_task"].items()
        for name, value in result["test"].items()
    ]
    rows.append(_row("mean test score", "", metrics["mean_test_score"]))
    return _summary(title, "task / metric", rows, metrics)


def storage_lines(storage: dict) -> list[str]:
    """The summary's storage rows (figures.py): one task's (accounting.account), or several tasks' (shared once, per
    task); then, with a mask coding, the storage as written: masks coded `mask_coding`, dense tensors in `dtype`,
    ratios to plain PETL in that dtype."""
    several = "tasks" in storage
    heading = ("storage, bytes", "without heads", "with heads") if several else ("storage", "without head", "with head")
    rows = figures.SEVERAL_TASKS if several else figures.ONE_TASK
    as_written = figures.SEVERAL_AS_WRITTEN if several else figures.AS_WRITTEN
    lines = ["", _row(*heading)]
    lines += [_row(f.label, storage.get(f.key), storage.get(f.with_head) if f.with_head else "") for f in rows]
    if "mask_coding" in storage:
        written = f"as written: masks {storage['mask_coding']}, dense {storage['dtype']}"
        lines += ["", _wide_row(written, "without head")]
        lines += [_wide_row(f.label, storage[f.key]) for f in as_written if storage.get(f.key) is not None]
    return lines


def wandb_storage(storage: dict) -> dict:
    """The W&B summary's storage figures: storage/<key> of every figure (figures.py's and the rest), not the per-task
    dicts of several tasks (head_params)."""
    return {f"storage/{k}": v for k, v in storage.items() if not isinstance(v, dict)}
