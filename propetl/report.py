"""Experiment reports: every run's metrics.json -> one CSV, Table-1-shaped markdown, and plots.

Runs are grouped into table rows by (model, method, prototype, mask kind, mask sparsity); each cell
is the mean ± sample std over seeds of the task's test numbers (x100), as in the paper's Table 1.
Used by `scripts/make_tables.py` (`make tables`).
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import statistics
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from propetl import masks as mask_ops
from propetl.metrics import GLUE_NUMBERS, glue_average
from propetl.storage import MASKS_FILE, atomic_write_text, read_safetensors

TASK_TITLES = {"cola": "CoLA", "sst2": "SST-2", "mrpc": "MRPC acc/F1", "qqp": "QQP acc/F1", "stsb": "STS-B P/S",
               "mnli": "MNLI", "qnli": "QNLI", "rte": "RTE"}
PROTOTYPE_TITLES = {"adapter": "Adapter", "lora": "LoRA", "prefix": "Prefix"}

# The paper's ProPETL rows (RoBERTa-base, Table 1 as reproduced by the authors' README; x100).
PAPER_PROPETL_ROWS = {
    "ProPETL-Adapter": {"cola": [65.43], "sst2": [94.15], "mrpc": [88.24, 91.41], "qqp": [89.40, 86.04],
                        "stsb": [91.34, 90.95], "mnli": [86.53], "qnli": [92.58], "rte": [76.50], "avg": 86.6},
    "ProPETL-LoRA": {"cola": [61.81], "sst2": [94.00], "mrpc": [87.42, 91.00], "qqp": [88.85, 85.22],
                     "stsb": [90.48, 90.47], "mnli": [85.73], "qnli": [91.05], "rte": [63.79], "avg": 84.53},
    "ProPETL-Prefix": {"cola": [62.16], "sst2": [93.62], "mrpc": [88.73, 91.80], "qqp": [87.59, 83.71],
                       "stsb": [90.92, 90.83], "mnli": [85.30], "qnli": [91.75], "rte": [72.66], "avg": 85.37},
}

RUN_FIELDS = ("task", "model", "method", "prototype", "mask_kind", "mask_sparsity", "seed", "protocol",
              "best_epoch", "epochs_run", "steps", "glue_score", "train_seconds", "wall_seconds", "world_size")
STORAGE_FIELDS = ("trainable_params", "stored_params", "mask_entries", "storage_bytes", "file_bytes",
                  "storage_percent_of_backbone", "storage_ratio_to_plain_petl", "backbone_params")


# ----------------------------------------------------------------------------- collecting

def find_metrics(roots: Iterable[Path]) -> list[Path]:
    """Every metrics.json under the given folders (or the files themselves), sorted."""
    found: set[Path] = set()
    for root in map(Path, roots):
        if root.is_file():
            found.add(root)
        elif root.is_dir():
            found.update(p for p in root.rglob("metrics.json") if not any(part.startswith(".") for part in p.parts[-3:-1]))
    return sorted(found)


def load_runs(roots: Iterable[Path]) -> list[dict]:
    """One dict per finished run: its identity, test metrics and storage figures."""
    runs = []
    for path in find_metrics(roots):
        try:
            metrics = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"cannot read {path}: {error}") from None
        if metrics.get("mode") == "multitask":
            runs.extend(_multitask_runs(metrics, path))
            continue
        if "test" not in metrics or "task" not in metrics:
            raise ValueError(f"{path} is not a propetl metrics.json (no 'task' or 'test')")
        run = {key: metrics.get(key) for key in RUN_FIELDS}
        run["test"] = dict(metrics["test"])
        run["storage"] = dict(metrics.get("storage", {}))
        run["path"] = str(path)
        runs.append(run)
    return runs


def _multitask_runs(metrics: dict, path: Path) -> list[dict]:
    """A multi-task run as one row per task, its storage the amortised per-task figures."""
    s = metrics.get("storage", {})
    storage = {"storage_bytes": s.get("amortised_bytes_per_task"), "storage_ratio_to_plain_petl": s.get("amortised_ratio_to_plain_petl"),
               "storage_percent_of_backbone": s.get("amortised_percent_of_backbone"), "backbone_params": s.get("backbone_params")}
    out = []
    for task, result in metrics["per_task"].items():
        run = {key: metrics.get(key) for key in RUN_FIELDS}
        run.update(task=task, method=f"{metrics['method']}-multitask", test=dict(result["test"]), storage=dict(storage),
                   glue_score=result.get("glue_score"), path=str(path))
        out.append(run)
    return out


def row_label(run: dict) -> str:
    """The table row a run belongs to, e.g. 'ProPETL-LoRA', 'LoRA', 'Fine-tune', 'ProPETL-LoRA (random, s=0.5)'."""
    method, prototype = run["method"], run.get("prototype")
    if method.endswith("-multitask"):
        label = f"{'ProPETL' if method.startswith('propetl') else 'PETL'}-{PROTOTYPE_TITLES.get(prototype, prototype)} (multi-task)"
    elif method == "finetune":
        label = "Fine-tune"
    elif method == "petl":
        label = PROTOTYPE_TITLES.get(prototype, str(prototype))
    else:
        label = f"ProPETL-{PROTOTYPE_TITLES.get(prototype, prototype)}"
        extras = [] if run.get("mask_kind") in (None, "learned") else [str(run["mask_kind"])]
        if run.get("_sparsity_varies"):
            extras.append(f"s={run['mask_sparsity']:g}")
        if extras:
            label += f" ({', '.join(extras)})"
    if run.get("_model_varies"):
        label = f"{run['model']}: {label}"
    return label


def _row_order(label: str) -> tuple:
    base = label.split(": ")[-1]
    order = ["Fine-tune", "Adapter", "ProPETL-Adapter", "LoRA", "ProPETL-LoRA", "Prefix", "ProPETL-Prefix"]
    head, _, extras = base.partition(" (")
    kind_rank = 2 if "none" in extras else 1 if "random" in extras else 0      # learned masks first
    return (label.split(": ")[0] if ": " in label else "", order.index(head) if head in order else len(order),
            kind_rank, extras)


def summarise(runs: list[dict]) -> list[dict]:
    """Table rows: per task the mean/std/n over seeds of each GLUE number, the average, storage."""
    models = {r["model"] for r in runs}
    sparsities = {(r["prototype"], r["mask_kind"], r["mask_sparsity"]) for r in runs if r["method"] == "propetl"}
    by_prototype = defaultdict(set)
    for prototype, kind, sparsity in sparsities:
        by_prototype[(prototype, kind)].add(sparsity)
    groups: dict[str, list[dict]] = defaultdict(list)
    for run in runs:
        run = dict(run, _model_varies=len(models) > 1,
                   _sparsity_varies=len(by_prototype.get((run["prototype"], run["mask_kind"]), ())) > 1)
        groups[row_label(run)].append(run)
    rows = []
    for label in sorted(groups, key=_row_order):
        members = groups[label]
        tasks: dict[str, dict] = {}
        for task in [t for t in GLUE_NUMBERS if any(r["task"] == t for r in members)]:
            task_runs = [r for r in members if r["task"] == task]
            cells = {}
            for name in GLUE_NUMBERS[task]:
                values = [100.0 * r["test"][name] for r in task_runs if name in r["test"]]
                cells[name] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                               "n": len(values)} if values else None
            tasks[task] = cells
        means = {t: {n: c["mean"] / 100.0 for n, c in cells.items() if c} for t, cells in tasks.items()}
        numbers = sum(len(m) for m in means.values())
        storage = [r["storage"] for r in members if r["storage"]]
        rows.append({
            "label": label,
            "tasks": tasks,
            "average": 100.0 * glue_average(means) if numbers else None,
            "average_numbers": numbers,
            "seeds": sorted({r["seed"] for r in members}),
            "runs": len(members),
            "percent_params": _mean(100.0 * s["trainable_params"] / s["backbone_params"] for s in storage
                                    if s.get("backbone_params") and "trainable_params" in s),
            "percent_storage": _mean(s.get("storage_percent_of_backbone") for s in storage),
            "storage_bytes": _mean(s.get("storage_bytes") for s in storage),
            "file_bytes": _mean(s.get("file_bytes") for s in storage),
            "ratio_to_plain_petl": _mean(s.get("storage_ratio_to_plain_petl") for s in storage),
            "train_seconds": _mean(r.get("train_seconds") for r in members),
            "epochs": _mean(r.get("epochs_run") for r in members),
        })
    return rows


def _mean(values: Iterable) -> float | None:
    values = [float(v) for v in values if v is not None]
    return statistics.fmean(values) if values else None


# ----------------------------------------------------------------------------- tables

def _cell(cells: dict | None) -> str:
    if not cells:
        return "–"
    parts = []
    for cell in cells.values():
        if cell is None:
            parts.append("–")
        elif cell["n"] > 1:
            parts.append(f"{cell['mean']:.2f}±{cell['std']:.2f}")
        else:
            parts.append(f"{cell['mean']:.2f}")
    return "/".join(parts)


def _bytes(value: float | None) -> str:
    if value is None:
        return "–"
    for unit, size in (("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value:.0f} B"


def _number(value: float | None, fmt: str) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def markdown_table(rows: list[dict], with_paper: bool = True) -> str:
    """Table 1 shape: one row per method, one column per task present, the average and storage."""
    tasks = [t for t in GLUE_NUMBERS if any(t in row["tasks"] for row in rows)]
    header = ["Method", "% params", "% storage", "bytes/task", "ratio to PETL"] + [TASK_TITLES[t] for t in tasks] + ["Avg", "runs"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        average = _number(row["average"], ".2f")
        if row["average"] is not None and row["average_numbers"] != 11:
            average += f" ({row['average_numbers']} of 11)"
        size = row["file_bytes"] if row["file_bytes"] is not None else row["storage_bytes"]
        lines.append("| " + " | ".join([
            row["label"], _number(row["percent_params"], ".3f"), _number(row["percent_storage"], ".3f"), _bytes(size),
            _number(row["ratio_to_plain_petl"], ".3f"), *[_cell(row["tasks"].get(t)) for t in tasks], average,
            str(row["runs"])]) + " |")
    if with_paper:
        lines.append("| *paper (RoBERTa-base)* |  |  |  |  | " + " | ".join("" for _ in tasks) + " |  |  |")
        for label, paper in PAPER_PROPETL_ROWS.items():
            cells = ["/".join(f"{v:.2f}" for v in paper[t]) for t in tasks]
            lines.append(f"| *{label} (paper)* | – | ≈0.11 | – | ≈0.11 | " + " | ".join(cells) + f" | {paper['avg']:.2f} (11) | 3 seeds |")
    return "\n".join(lines) + "\n"


def comparison_table(rows: list[dict]) -> str:
    """ProPETL against plain PETL of the same prototype: per task, the difference of the mean test
    numbers in points (ProPETL − PETL), and the storage ratio."""
    by_label = {row["label"]: row for row in rows}
    tasks = [t for t in GLUE_NUMBERS if any(t in row["tasks"] for row in rows)]
    lines = ["| Prototype | " + " | ".join(f"{TASK_TITLES[t]} Δ" for t in tasks) + " | storage ratio |",
             "|" + "---|" * (len(tasks) + 2)]
    for key, title in PROTOTYPE_TITLES.items():
        plain, pro = by_label.get(title), by_label.get(f"ProPETL-{title}")
        if not plain or not pro:
            continue
        deltas = []
        for task in tasks:
            a, b = plain["tasks"].get(task), pro["tasks"].get(task)
            if not a or not b:
                deltas.append("–")
                continue
            deltas.append("/".join(f"{b[n]['mean'] - a[n]['mean']:+.2f}" if a.get(n) and b.get(n) else "–" for n in a))
        lines.append(f"| {title} | " + " | ".join(deltas) + f" | {_number(pro['ratio_to_plain_petl'], '.3f')} |")
    return "\n".join(lines) + "\n"


def runs_csv(runs: list[dict], relative_to: Path | None = None) -> str:
    """Every run on one line: identity, every test metric, the storage figures, where its metrics.json
    lies (relative to `relative_to`, so a committed CSV names no machine's paths)."""
    metric_names = sorted({name for run in runs for name in run["test"]})
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*RUN_FIELDS, *(f"test_{n}" for n in metric_names), *STORAGE_FIELDS, "path"])
    for run in sorted(runs, key=lambda r: (r["task"], r["method"], str(r["prototype"]), str(r["mask_sparsity"]), r["seed"])):
        writer.writerow([run.get(k) for k in RUN_FIELDS] + [run["test"].get(n) for n in metric_names]
                        + [run["storage"].get(k) for k in STORAGE_FIELDS]
                        + [os.path.relpath(run["path"], relative_to) if relative_to else run["path"]])
    return out.getvalue()


# ----------------------------------------------------------------------------- plots

def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_metric_vs_storage(rows: list[dict], path: Path) -> Path | None:
    """Per task: mean test score (x100) against bytes stored per task (log x), one point per row."""
    tasks = [t for t in GLUE_NUMBERS if any(t in row["tasks"] for row in rows)]
    points = [(row, t) for t in tasks for row in rows if row["tasks"].get(t)]
    if not points:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for row in rows:
            cells = row["tasks"].get(task)
            size = row["file_bytes"] if row["file_bytes"] is not None else row["storage_bytes"]
            if not cells or size is None:
                continue
            values = [c for c in cells.values() if c]
            mean = statistics.fmean(c["mean"] for c in values)
            std = statistics.fmean(c["std"] for c in values)
            marker = "o" if row["label"].startswith("ProPETL") else ("s" if row["label"] != "Fine-tune" else "^")
            ax.errorbar(size, mean, yerr=std, fmt=marker, capsize=3, label=row["label"])
        ax.set_xscale("log")
        ax.set_xlabel("bytes stored per task (without head, log)")
        ax.set_ylabel(f"{TASK_TITLES[task]} test score (x100)")
        ax.set_title(TASK_TITLES[task])
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    return _save(fig, path)


def plot_sparsity_sweep(runs: list[dict], path: Path) -> Path | None:
    """ProPETL test score against mask sparsity, one line per (task, prototype); None without a sweep."""
    series = defaultdict(lambda: defaultdict(list))
    for run in runs:
        if run["method"] == "propetl" and run.get("mask_kind") in (None, "learned"):
            names = GLUE_NUMBERS[run["task"]]
            score = statistics.fmean(100.0 * run["test"][n] for n in names if n in run["test"])
            series[(run["task"], run["prototype"])][run["mask_sparsity"]].append(score)
    series = {key: points for key, points in series.items() if len(points) > 1}
    if not series:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for (task, prototype), points in sorted(series.items()):
        xs = sorted(points)
        ax.errorbar(xs, [statistics.fmean(points[x]) for x in xs],
                    yerr=[statistics.stdev(points[x]) if len(points[x]) > 1 else 0 for x in xs],
                    marker="o", capsize=3, label=f"{TASK_TITLES[task]} · ProPETL-{PROTOTYPE_TITLES.get(prototype, prototype)}")
    ax.set_xlabel("mask sparsity (fraction of zeros)")
    ax.set_ylabel("test score (x100)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def layer_mask_hamming(checkpoint_dir: Path):
    """[L, L] fraction of mask entries where two layers differ, over every mask tensor of a checkpoint."""
    import torch

    packed, metadata = read_safetensors(Path(checkpoint_dir) / MASKS_FILE)
    shapes = json.loads(metadata.get("shapes", "{}"))
    flat = [mask_ops.unpack_bits(packed[name], tuple(shapes[name])) for name in sorted(packed)]
    flat = torch.cat([m.reshape(m.shape[0], -1) for m in flat], dim=1)
    return mask_ops.pairwise_hamming(flat)


def plot_mask_hamming(checkpoint_dir: Path, path: Path, title: str = "") -> Path:
    """Heat map of the pairwise Hamming distance between the layers' learned masks of one run."""
    distance = layer_mask_hamming(checkpoint_dir).numpy()
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    image = ax.imshow(distance, cmap="viridis", vmin=0)
    for i in range(distance.shape[0]):
        for j in range(distance.shape[1]):
            ax.text(j, i, f"{distance[i, j]:.2f}", ha="center", va="center", fontsize=7, color="w")
    ax.set_xlabel("layer")
    ax.set_ylabel("layer")
    ax.set_title(title or "Hamming distance between layer masks", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.tight_layout()
    fig.savefig(tmp, dpi=120)
    _pyplot().close(fig)
    tmp.replace(path)
    return path


# ----------------------------------------------------------------------------- everything

PLOT_FILES = ("metric_vs_storage.png", "sparsity_sweep.png", "mask_hamming.png")


def build(roots: Iterable[Path], out_dir: Path, title: str = "") -> dict[str, Path]:
    """Collect the runs under `roots` and write runs.csv, table.md, plots into `out_dir`."""
    roots = list(roots)
    runs = load_runs(roots)
    if not runs:
        raise ValueError(f"no metrics.json under {', '.join(map(str, roots))}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = summarise(runs)
    written = {}
    for stale in PLOT_FILES:                    # a plot not drawn this time must not linger from an older build
        (out_dir / stale).unlink(missing_ok=True)
    atomic_write_text(out_dir / "runs.csv", runs_csv(runs, out_dir))
    written["csv"] = out_dir / "runs.csv"
    text = (f"# {title}\n\n" if title else "") + f"{len(runs)} runs. Test numbers x100, mean ± std over seeds.\n\n"
    text += markdown_table(rows) + "\nProPETL minus plain PETL (points):\n\n" + comparison_table(rows)
    atomic_write_text(out_dir / "table.md", text)
    written["table"] = out_dir / "table.md"
    atomic_write_text(out_dir / "rows.json", json.dumps(rows, indent=1))
    written["rows"] = out_dir / "rows.json"
    if (plot := plot_metric_vs_storage(rows, out_dir / "metric_vs_storage.png")):
        written["metric_vs_storage"] = plot
    if (plot := plot_sparsity_sweep(runs, out_dir / "sparsity_sweep.png")):
        written["sparsity_sweep"] = plot
    learned = [r for r in runs if r["method"] == "propetl" and r.get("mask_kind") in (None, "learned")
               and (Path(r["path"]).parent / "checkpoint" / MASKS_FILE).exists()]
    if learned:
        run = sorted(learned, key=lambda r: (r["task"], str(r["prototype"]), r["seed"]))[0]
        written["mask_hamming"] = plot_mask_hamming(
            Path(run["path"]).parent / "checkpoint", out_dir / "mask_hamming.png",
            f"{TASK_TITLES[run['task']]} · ProPETL-{PROTOTYPE_TITLES.get(run['prototype'])} · seed {run['seed']}: layer masks, Hamming")
    return written
