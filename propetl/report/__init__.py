"""Experiment reports: every run's metrics.json -> one CSV, Table-1-shaped markdown, paired statistics, plots.
Rows are (model, method, prototype, mask kind, sparsity); cells mean ± std over seeds (x100). Comparisons are paired by
seed with a 95% t-interval. runs.py collects, stats.py pairs, tables.py, plots.py and frontier.py write; `build` runs
them all. No torch or transformers: masks are read as numpy (mask_coding.read_file)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from propetl.data.tasks import check_report_blocks, task_title
from propetl.report.frontier import frontier_points, frontier_table, plot_frontier
from propetl.report.plots import (
    layer_mask_hamming,
    plot_mask_ablation,
    plot_mask_hamming,
    plot_metric_vs_storage,
    plot_sparsity_sweep,
)
from propetl.report.runs import (
    PROTOTYPE_TITLES,
    TABLE1,
    distinct_runs,
    find_metrics,
    load_runs,
    mask_kind,
    single_task_runs,
    summarise,
    table1_runs,
    table2_runs,
    trained_prototype,
    trivial_runs,
)
from propetl.report.stats import paired_comparisons, paired_interval
from propetl.report.tables import (
    coding_table,
    comparison_table,
    jobs_table,
    markdown_table,
    paired_csv,
    report_markdown,
    runs_csv,
)
from propetl.storage.files import atomic_write_text
from propetl.storage.mask_coding import layer_masks_file

__all__ = [
    "build",
    "coding_table",
    "common_root",
    "comparison_table",
    "distinct_runs",
    "find_metrics",
    "jobs_table",
    "layer_mask_hamming",
    "load_runs",
    "markdown_table",
    "paired_comparisons",
    "paired_interval",
    "plot_mask_hamming",
    "summarise",
]

PLOT_FILES = ("metric_vs_storage.png", "frontier.png", "sparsity_sweep.png", "mask_ablation.png", "mask_hamming.png")


def common_root(roots: list[Path]) -> Path:
    """The folder every root lies in (a file root: its folder)."""
    folders = [Path(r).resolve() if Path(r).is_dir() else Path(r).resolve().parent for r in roots]
    return Path(os.path.commonpath(folders))


def build(roots: Iterable[Path], out_dir: Path, title: str = "") -> dict[str, Path]:
    """Collect the runs under `roots`; write the tables, CSVs, jobs.md and plots into `out_dir`."""
    check_report_blocks()
    roots = list(roots)
    found = load_runs(roots)
    if not found:
        raise ValueError(f"no metrics.json under {', '.join(map(str, roots))}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = distinct_runs(found)
    table_runs, pooled = table1_runs(runs), single_task_runs(runs)
    rows = summarise(table_runs + trivial_runs(table_runs))
    table2 = summarise(table2_runs(runs))
    comparisons = paired_comparisons(table_runs, pooled)
    frontier = frontier_points(table_runs)
    written = {}
    for stale in PLOT_FILES:  # a plot not drawn this time must not linger from an older build
        (out_dir / stale).unlink(missing_ok=True)
    for key, name, text in (
        ("csv", "runs.csv", runs_csv(found, out_dir)),
        ("table", "table.md", report_markdown(found, runs, rows, comparisons, title, frontier_table(frontier), table2)),
        ("paired", "paired.csv", paired_csv(comparisons)),
        ("rows", "rows.json", json.dumps(rows, indent=1)),
        ("jobs", "jobs.md", jobs_table(found, common_root(roots))),
    ):
        atomic_write_text(out_dir / name, text)
        written[key] = out_dir / name
    for key, plot, source in (
        ("metric_vs_storage", plot_metric_vs_storage, rows),
        ("sparsity_sweep", plot_sparsity_sweep, pooled),
        ("mask_ablation", plot_mask_ablation, pooled),
    ):
        if drawn := plot(source, out_dir / f"{key}.png"):
            written[key] = drawn
    if drawn := plot_frontier(frontier, table_runs, out_dir / "frontier.png"):
        written["frontier"] = drawn
    has_masks = lambda r: layer_masks_file(Path(r["path"]).parent / "checkpoint").exists()
    learned = [r for r in pooled if trained_prototype(r) and mask_kind(r) == "learned" and has_masks(r)]
    if learned:
        run = min(learned, key=lambda r: (r.get("experiment") != TABLE1, r["task"], str(r["prototype"]), r["seed"]))
        title = f"{task_title(run['task'])} · ProPETL-{PROTOTYPE_TITLES.get(run['prototype'])} · seed {run['seed']}"
        written["mask_hamming"] = plot_mask_hamming(
            Path(run["path"]).parent / "checkpoint", out_dir / "mask_hamming.png", f"{title}: layer masks, Hamming"
        )
    return written
