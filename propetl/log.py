"""Run outputs: the W&B run, metrics.json (written atomically) and the end-of-run summary table."""
from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf

from propetl.files import atomic_write_text

STORAGE_ROWS = (
    ("trainable parameters", "trainable_params", "trainable_params_with_head"),
    ("stored fp32 parameters", "stored_params", None),
    ("mask entries (1 bit each)", "mask_entries", None),
    ("storage, bytes", "storage_bytes", "storage_bytes_with_head"),
    ("files on disk, bytes", "file_bytes", "file_bytes_with_head"),
    ("% of backbone", "storage_percent_of_backbone", "storage_percent_of_backbone_with_head"),
    ("ratio to plain PETL", "storage_ratio_to_plain_petl", "storage_ratio_to_plain_petl_with_head"),
)
# As written (accounting.coding_figures / checkpoint.file_figures): dense tensors in storage.dtype, masks in each coding.
CODING_ROWS = (
    ("mask bits/entry, file", "file_mask_bits_per_entry"),
    ("mask bits/entry, bits", "mask_bits_per_entry/bits"),
    ("mask bits/entry, entropy", "mask_bits_per_entry/entropy"),
    ("mask bits/entry, log2 C(n,k)", "mask_bits_per_entry_bound"),
    ("ratio to PETL, files", "file_ratio_to_plain_petl"),
    ("ratio to PETL, bits", "storage_ratio_to_plain_petl/bits"),
    ("ratio to PETL, entropy", "storage_ratio_to_plain_petl/entropy"),
    ("ratio to PETL, log2 C(n,k)", "storage_ratio_to_plain_petl/bound"),
)


NAME_PARTS = {"sparsity": "s{}", "seed": "seed{}"}        # how a fact reads in a run's name (else as is)


def run_identity(cfg) -> dict[str, str]:
    """What a run is: task(s), method, prototype, mask sparsity, mask kind, seed. No prototype for
    fine-tuning; sparsity and mask kind only where there are masks (method=propetl)."""
    multitask = cfg.get("mode") == "multitask"
    facts = {"task": "multitask-" + "-".join(cfg.tasks) if multitask else str(cfg.task.name), "method": str(cfg.method.name)}
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
    tasks = ["multitask", *(f"task:{t}" for t in cfg.tasks)] if cfg.get("mode") == "multitask" else [f"task:{facts['task']}"]
    tags = tasks + [f"{key}:{value}" for key, value in facts.items() if key != "task"]
    return tags + [str(tag) for tag in cfg.logger.tags if str(tag) not in tags]


def start_wandb(cfg, output_dir: Path, run_id: str | None = None, enabled: bool = True):
    """One W&B run per Hydra job, writing under the job's own output directory; a resumed job
    passes its saved run id and continues the same W&B run. enabled=False (the other processes of a
    data-parallel run): a disabled run that logs nothing."""
    import wandb

    return wandb.init(
        id=run_id, resume="allow" if run_id else None, mode=cfg.logger.mode if enabled else "disabled", project=cfg.logger.project, entity=cfg.logger.entity, group=cfg.logger.group,
        tags=run_tags(cfg), dir=str(output_dir), reinit="finish_previous", name=run_name(cfg),
        config=OmegaConf.to_container(cfg, resolve=True),
    )


def finish_wandb() -> None:
    import wandb

    wandb.finish()


def write_metrics(path: Path, metrics: dict) -> None:
    atomic_write_text(Path(path), json.dumps(metrics, indent=2, sort_keys=False) + "\n")


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 100 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def summary_table(metrics: dict) -> str:
    """A one-screen summary of a finished run."""
    lines = [
        f"{metrics['task']} | {metrics['model']} | {metrics['method']}"
        + ("" if metrics["method"] == "finetune" else f" {metrics['prototype']}")
        + (f" | mask sparsity {metrics['mask_sparsity']}" if metrics["method"] == "propetl" else "")
        + f" | seed {metrics['seed']}",
        f"best epoch {metrics['best_epoch']} of {metrics['epochs_run']} ({metrics['steps']} steps, "
        f"{metrics['train_seconds']:.0f} s training)",
        "",
        f"{'metric':<28}{'selection':>14}{'test':>14}",
    ]
    for name, value in metrics["test"].items():
        lines.append(f"{name:<28}{_fmt(metrics['selection'].get(name)):>14}{_fmt(value):>14}")
    lines.append(f"{'GLUE score of the run':<28}{'':>14}{_fmt(metrics['glue_score']):>14}")
    if "trivial" in metrics:
        lines.append(f"{'trivial baseline (' + metrics['trivial']['rule'].split(' (')[0] + ')':<42}"
                     f"{_fmt(metrics['trivial']['glue_score']):>14}")
    return _framed(lines + storage_lines(metrics["storage"]))


def storage_lines(storage: dict) -> list[str]:
    """The summary's storage rows: one task's (accounting.account), or several tasks' (shared once, per task)."""
    if "tasks" not in storage:
        return (_storage_lines(storage, STORAGE_ROWS, ("storage", "without head", "with head"))
                + _coding_lines(storage, CODING_ROWS))
    return (_storage_lines(storage, MULTITASK_STORAGE_ROWS, ("storage, bytes", "without heads", "with heads"))
            + _coding_lines(storage, MULTITASK_CODING_ROWS))


def _coding_lines(storage: dict, rows) -> list[str]:
    """The storage as written: masks coded `mask_coding`, dense tensors in `dtype`; ratios to plain PETL in that dtype."""
    if "mask_coding" not in storage:
        return []
    lines = ["", f"{'as written: masks ' + storage['mask_coding'] + ', dense ' + storage['dtype']:<42}{'without head':>14}"]
    return lines + [f"{label:<42}{_fmt(storage.get(key)):>14}" for label, key in rows if storage.get(key) is not None]


def _storage_lines(storage: dict, rows, heading: tuple[str, str, str]) -> list[str]:
    lines = ["", f"{heading[0]:<28}{heading[1]:>14}{heading[2]:>14}"]
    for label, without, with_head in rows:
        lines.append(f"{label:<28}{_fmt(storage.get(without)):>14}{_fmt(storage.get(with_head)) if with_head else '':>14}")
    return lines


def _framed(lines: list[str]) -> str:
    width = max(len(line) for line in lines)
    return "\n".join(["-" * width, *lines, "-" * width])


MULTITASK_STORAGE_ROWS = (
    ("shared part (once)", "shared_bytes", None),
    ("task mask, per task", "task_mask_bytes_per_task", None),
    ("all tasks", "total_bytes", "total_bytes_with_heads"),
    ("amortised per task", "amortised_bytes_per_task", "amortised_bytes_per_task_with_head"),
    ("one single-task run", "separate_single_task_bytes_per_task", None),
    ("plain PETL, per task", "plain_petl_bytes_per_task", None),
    ("files on disk", "file_bytes", "file_bytes_with_head"),
)
MULTITASK_CODING_ROWS = tuple((label.replace("ratio to PETL", "amortised ratio"), key.replace("storage_ratio", "amortised_ratio")
                               .replace("file_ratio", "file_amortised_ratio")) for label, key in CODING_ROWS)


def multitask_summary_table(metrics: dict) -> str:
    """A one-screen summary of a finished multi-task run: per-task metrics and storage in bytes."""
    lines = [
        f"multitask {','.join(metrics['tasks'])} | {metrics['model']} | {metrics['method']} {metrics['prototype']}"
        f" | mask {metrics['mask_combine']} sparsity {metrics['mask_sparsity']} | seed {metrics['seed']}",
        f"best epoch {metrics['best_epoch']} of {metrics['epochs_run']} ({metrics['steps']} steps, "
        f"{metrics['train_seconds']:.0f} s training)",
        "",
        f"{'task / metric':<28}{'selection':>14}{'test':>14}",
    ]
    for task, result in metrics["per_task"].items():
        for name, value in result["test"].items():
            lines.append(f"{task + ' ' + name:<28}{_fmt(result['selection'].get(name)):>14}{_fmt(value):>14}")
    lines.append(f"{'mean test score':<28}{'':>14}{_fmt(metrics['mean_test_score']):>14}")
    return _framed(lines + storage_lines(metrics["storage"]))
