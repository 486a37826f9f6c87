"""Tables: Table-1-shaped markdown, the sweep, the ablation, storage by coding, and the CSVs."""

from __future__ import annotations

import csv
import io
import math
import os
import re
import statistics
from collections.abc import Iterable
from pathlib import Path

from propetl.data.tasks import in_task_order, paper_average_size, paper_rows, task_title
from propetl.report.runs import (
    MAJORITY_SHARE,
    MASK_KINDS,
    NOT_KEPT,
    PAPER_MODEL,
    PAPER_STORAGE_PERCENT,
    RUN_FIELDS,
    STD_RATIO,
    group_runs,
    kept_bytes,
    mask_kind,
    mean_or_none,
    prototype_title,
    row_groups,
    run_score,
    score_stats,
    single_task_runs,
    trained_prototype,
)
from propetl.report.stats import mask_ablation, sparsity_sweep
from propetl.storage.figures import AS_WRITTEN, RUNS_CSV, WRITTEN_AS


def _table(header: list[str], rows: Iterable[list[str]]) -> str:
    lines = ["| " + " | ".join(cells) + " |" for cells in (header, *rows)]
    lines.insert(1, "|" + "---|" * len(header))
    return "\n".join(lines) + "\n"


def _cell(cells: dict | None) -> str:
    """A task's numbers, '/'-separated: mean±std over seeds, the mean alone for one seed."""
    if not cells:
        return "–"
    return "/".join(
        "–" if c is None else f"{c['mean']:.2f}±{c['std']:.2f}" if c["n"] > 1 else f"{c['mean']:.2f}"
        for c in cells.values()
    )


def _score_cell(runs: Iterable[dict] | None) -> str:
    """GLUE score x100 of some runs: 'mean±std (n=3)'."""
    cell = score_stats(runs)
    return "–" if cell is None else f"{cell['mean']:.2f}±{cell['std']:.2f} (n={cell['n']})"


def _bytes(value: float | None) -> str:
    if value is None:
        return "–"
    for unit, size in (("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value:.0f} B"


def _number(value: float | None, fmt: str) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def sparsity_text(value) -> str:
    return "–" if value is None else f"{value:g}"


def model_prefix(model, models: set) -> str:
    return f"{model}: " if len(models) > 1 else ""


def _task_and_propetl(model, task: str, prototype, models: set) -> list[str]:
    return [model_prefix(model, models) + task_title(task), f"ProPETL-{prototype_title(prototype)}"]


def markdown_table(rows: list[dict], with_paper: bool = True) -> str:
    """Table 1 shape: one row per method, one column per task present, the average and storage."""
    tasks = in_task_order(t for row in rows for t in row["tasks"])
    header = ["Method", "% params", "% storage", "bytes/task", "ratio to PETL", *map(task_title, tasks), "Avg", "runs"]
    body, whole = [], paper_average_size()
    for row in rows:
        average = _number(row["average"], ".2f")
        if row["average"] is not None and row["average_numbers"] != whole:
            average += f" ({row['average_numbers']} of {whole})"
        size = row["file_bytes"] if row["file_bytes"] is not None else row["storage_bytes"]
        share = (_number(row[key], ".3f") for key in ("percent_params", "percent_storage"))
        cells = [_bytes(size), _number(row["ratio_to_plain_petl"], ".3f"), *(_cell(row["tasks"].get(t)) for t in tasks)]
        body.append([row["label"], *share, *cells, average, "computed" if row.get("computed") else str(row["runs"])])
    if with_paper:
        body.append([f"*paper ({PAPER_MODEL})*", *([""] * (len(header) - 1))])
        for label, paper in paper_rows().items():
            numbers = [v for values in paper.values() for v in values]
            numbers_shown = ("/".join(f"{v:.2f}" for v in paper[t]) if t in paper else "–" for t in tasks)
            storage = ["–", f"≈{PAPER_STORAGE_PERCENT}"] * 2
            average = f"{statistics.fmean(numbers):.2f} ({len(numbers)})"
            body.append([f"*{label} (paper)*", *storage, *numbers_shown, average, "3 seeds"])
    return _table(header, body)


TABLE2_TITLE = "Table 2 (T5 multi-task GLUE)"


def table2_section(rows: list[dict]) -> str:
    """table.md's Table 2: multi-task T5 runs (runs.table2_runs), Table 1's columns, no paper rows; '' without any."""
    if not rows:
        return ""
    return (
        f"\n## {TABLE2_TITLE}\n\nMulti-task T5 runs (experiment=t5_multitask: every task trained at once), one row "
        "per method, a column per task's numbers (mean ± std over seeds) and the average of the numbers present. "
        "% params: the parameters trained for all tasks together, % of the backbone's; % storage, bytes/task and the "
        "ratio to PETL: what the tasks keep together (the shared part counted once) amortised per task, the ratio "
        "against a set of plain adapters per task. No paper rows: the paper's Table 2 numbers were not retrieved "
        "(paper.md §4.2).\n\n" + markdown_table(rows, with_paper=False)
    )


def trivial_note(rows: list[dict]) -> str:
    """The rule of each task's trivial baseline, '' without one."""
    rules = [
        f"{task_title(task)}: {rule}" for row in rows if row.get("computed") for task, rule in row["rules"].items()
    ]
    if not rules:
        return ""
    return (
        "The trivial baseline is computed from the labels, never trained: it answers every test example with the "
        "train split's majority class (classification) or mean score (regression; a constant has no correlation, so "
        "Pearson/Spearman are 0) — " + "; ".join(rules) + ".\n"
    )


def comparison_table(rows: list[dict]) -> str:
    """ProPETL against plain PETL of the same prototype: per task the difference of the means in points, and the storage
    ratio; a row split by sparsity ('ProPETL-LoRA (s=0.5)') is compared under 'LoRA (s=0.5)'."""
    by_label = {row["label"]: row for row in rows}
    tasks = in_task_order(t for row in rows for t in row["tasks"])
    body = []
    for pro in rows:
        model, colon, base = pro["label"].rpartition(": ")
        match = re.fullmatch(r"ProPETL-(\w+)( \(s=[^)]*\))?", base)
        plain = by_label.get(f"{model}{colon}{match[1]}") if match else None
        if not plain:
            continue
        deltas = []
        for task in tasks:
            a, b = plain["tasks"].get(task), pro["tasks"].get(task)
            numbers = (f"{b[n]['mean'] - a[n]['mean']:+.2f}" if a.get(n) and b.get(n) else "–" for n in a or ())
            deltas.append("/".join(numbers) if a and b else "–")
        body.append([pro["label"].replace("ProPETL-", "", 1), *deltas, _number(pro["ratio_to_plain_petl"], ".3f")])
    return _table(["Prototype", *(f"{task_title(t)} Δ" for t in tasks), "storage ratio"], body)


def _excludes_zero(value: bool | None) -> str:
    return "n/a" if value is None else "yes" if value else "no"


def _paired_fields(c: dict) -> dict:
    """A comparison as paired.csv writes it: seeds space-separated, excludes_zero yes/no/n/a."""
    return {**c, "seeds": " ".join(map(str, c["seeds"])), "excludes_zero": _excludes_zero(c["excludes_zero"])}


def paired_table(comparisons: list[dict]) -> str:
    models = {c["model"] for c in comparisons}
    body = []
    for c in map(_paired_fields, comparisons):
        task = model_prefix(c["model"], models) + task_title(c["task"])
        metric = "GLUE score" if c["metric"] == "glue_score" else c["metric"]
        head = [c["comparison"], task, prototype_title(c["prototype"]), sparsity_text(c["mask_sparsity"]), metric]
        means = (f"{c['mean_a']:.2f}", f"{c['mean_b']:.2f}", f"{c['mean_diff']:+.2f}")
        half = "n/a" if c["half_width"] is None else f"{c['half_width']:.2f}"
        interval = "n/a" if c["ci_low"] is None else f"[{c['ci_low']:+.2f}, {c['ci_high']:+.2f}]"
        body.append([*head, str(c["n"]), c["seeds"], *means, half, interval, c["excludes_zero"]])
    header = ["Comparison (A − B)", "Task", "Prototype", "s", "Metric", "n", "seeds", "A", "B", "mean Δ"]
    return _table([*header, "± t·sd/√n", "95% CI", "excludes 0"], body)


def _csv(rows: Iterable[Iterable]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    return out.getvalue()


def paired_csv(comparisons: list[dict]) -> str:
    """paired.csv: the numbers of paired_table (x100), seeds space-separated, excludes_zero yes/no/n/a."""
    fields = ["comparison", "model", "task", "prototype", "mask_sparsity", "metric", "n", "seeds", "mean_a", "mean_b"]
    fields += ["mean_diff", "sd_diff", "t_crit", "half_width", "ci_low", "ci_high", "excludes_zero"]
    return _csv([fields, *([c[k] for k in fields] for c in map(_paired_fields, comparisons))])


def sweep_table(runs: list[dict]) -> str:
    """The sparsity sweep (pooled runs): the GLUE score at each sparsity and plain PETL's; '' without a sweep."""
    series = sparsity_sweep(runs)
    if not series:
        return ""
    plain = group_runs(runs, lambda r: r["method"] == "petl", ("model", "task", "prototype"))
    models = {key[0] for key in series}
    sparsities = sorted({s for points in series.values() for s in points if s is not None})
    header = ["Task", "Prototype", *(f"s={s:g}" for s in sparsities), "plain PETL"]
    scores = lambda key, points: [*(_score_cell(points.get(s)) for s in sparsities), _score_cell(plain.get(key))]
    return _table(header, ([*_task_and_propetl(*key, models), *scores(key, points)] for key, points in series.items()))


def ablation_table(runs: list[dict]) -> str:
    """The mask ablation (pooled runs): learned, random and no masks at the same sparsity; '' without one."""
    cells = mask_ablation(runs)
    if not cells:
        return ""
    models = {key[0] for key in cells}
    body = []
    for (model, task, prototype, sparsity), kinds in cells.items():
        scores = (_score_cell(kinds.get(kind)) for kind in MASK_KINDS)
        body.append([*_task_and_propetl(model, task, prototype, models), sparsity_text(sparsity), *scores])
    return _table(["Task", "Prototype", "s", "learned masks", "random masks", "no masks"], body)


def coding_table(runs: list[dict]) -> str:
    """ProPETL's storage per mask coding, a line per (model, prototype, sparsity, dtype, coding); '' without any."""
    keep = lambda r: trained_prototype(r) and "mask_bits_per_entry_bound" in r["storage"]
    written_as = lambda storage: tuple(storage.get(key) for key in WRITTEN_AS)
    groups = group_runs(runs, keep, ("model", "task", "prototype", "mask_sparsity"))
    if not groups:
        return ""
    models = {key[0] for key in groups}
    body = []
    for (model, task, prototype, sparsity), members in groups.items():
        head = [*_task_and_propetl(model, task, prototype, models), sparsity_text(sparsity)]
        for written in sorted({written_as(r["storage"]) for r in members}, key=str):
            same = [r["storage"] for r in members if written_as(r["storage"]) == written]
            means = (_number(mean_or_none(s.get(f.key) for s in same), ".4f") for f in AS_WRITTEN)
            body.append([*head, *map(str, written), *means, str(len(same))])
    return _table(["Task", "Prototype", "s", "dtype", "written", *(f.column for f in AS_WRITTEN), "runs"], body)


def constant_mark(run: dict) -> str:
    """runs.csv's `constant_predictions`: yes / no, or NOT_KEPT for a run without predictions.npz."""
    check = run.get("predictions")
    return NOT_KEPT if check is None else "yes" if check["constant"] else "no"


def run_name(run: dict) -> str:
    """A run in one line: task, method, prototype, mask kind and sparsity, seed, experiment."""
    masks = f" {mask_kind(run)} s={sparsity_text(run.get('mask_sparsity'))}" if run["method"] == "propetl" else ""
    return (
        f"{task_title(run['task'])} {run['method']} {prototype_title(run.get('prototype'))}"
        f"{masks} seed {run.get('seed')} ({run.get('experiment') or 'no experiment'})"
    )


def constant_note(found: list[dict]) -> str:
    """table.md's check of the kept test predictions: the runs flagged as (nearly) constant predictors."""
    checked = [run for run in found if run.get("predictions") is not None]
    flagged = [run_name(run) for run in checked if run["predictions"]["constant"]]
    text = (
        f"\n## Constant predictors\n\nA run is flagged when its test predictions are (nearly) constant: one "
        f"class in at least {MAJORITY_SHARE:.0%} of them (classification), or their std below {STD_RATIO:.0%} "
        f"of the test labels' (regression); runs.csv has the numbers (majority_prediction_share, "
        f"prediction_std_ratio). {len(checked)} of {len(found)} runs kept their test predictions "
        f"(predictions.npz); the other {len(found) - len(checked)}: {NOT_KEPT}, not checked.\n\n"
    )
    if not checked:
        return text + "Flagged: none; no run here kept its predictions, so none could be checked.\n"
    return text + (
        f"Flagged ({len(flagged)}): " + "; ".join(sorted(flagged)) + ".\n" if flagged else "Flagged: none.\n"
    )


def report_markdown(
    found: list[dict],
    runs: list[dict],
    rows: list[dict],
    comparisons: list[dict],
    title: str = "",
    frontier: str = "",
    table2_rows: list[dict] | None = None,
) -> str:
    """table.md, every section; `found`: every run read; `runs`: one per configuration (distinct_runs); `rows` and
    `table2_rows`: Table 1's and Table 2's (summarise)."""
    pooled = single_task_runs(runs)
    text = (f"# {title}\n\n" if title else "") + f"{len(found)} runs"
    if len(found) > len(runs):
        text += (
            f" ({len(found) - len(runs)} repeating the (task, method, prototype, mask kind, mask sparsity, seed)"
            " of another run, counted once)"
        )
    text += ". Test numbers x100, mean ± std over seeds.\n\n"
    text += (
        "## Table 1\n\nThe table1 experiment's runs (and the encoders' multi-task runs; T5's are Table 2); the "
        "sparsity sweep and the mask ablation have their own sections below.\n\n" + markdown_table(rows)
    )
    text += f"\n{note}" if (note := trivial_note(rows)) else ""
    text += "\nProPETL minus plain PETL, difference of the means (points):\n\n" + comparison_table(rows)
    text += table2_section(table2_rows or [])
    text += (
        "\n## Paired differences over seeds\n\nA − B in points (x100), runs paired by seed (only seeds both "
        "sides have): the mean of the per-seed differences with its 95% paired t-interval over seeds, "
        "mean ± t(0.975, n−1)·sd/√n, sd the sample std of the differences and n the number of paired seeds. "
        "'excludes 0' says whether the interval excludes zero; with n < 2 there is no interval (n/a). "
        "GLUE score: the task's main number (the mean of its numbers in the paper's average, STS-B: of "
        "Pearson and Spearman). ProPETL − PETL and HF PEFT − ours use Table 1's runs; learned − random/none "
        "the mask ablation, its learned runs pooled from table1. The same numbers are in paired.csv.\n\n"
    )
    text += paired_table(comparisons) if comparisons else "No pair of runs with a seed in common.\n"
    if frontier:
        text += (
            "\n## Storage–accuracy frontier\n\nEvery method of Table 1 (the frontier experiment's PEFT tuners "
            "among them) on each task: the bytes a task must keep (ProPETL's and PETL's checkpoint files: "
            "prototype and entropy-coded masks; for a PEFT tuner the adapter_model.safetensors and "
            "adapter_config.json PEFT saves with its least-storing options; "
            "without and with the classification head), the ratio to plain LoRA's, the GLUE score x100 (mean ± "
            "std over seeds), the paired difference to the reference over the seeds both have (95% "
            "t-interval), and ◆ where no other method stores as little or less with as high or a higher mean "
            "score (frontier.png draws it).\n" + frontier
        )
    if sweep := sweep_table(pooled):
        text += (
            "\n## Sparsity sweep\n\nProPETL with learned masks, GLUE score x100, mean ± std over seeds (n): the "
            "sparsity_sweep runs pooled with table1's (the point at each prototype's default sparsity), each "
            "configuration and seed counted once.\n\n" + sweep
        )
    if coding := coding_table(pooled):
        text += (
            "\n## Storage by mask coding\n\nProPETL as written, mean over runs: bits per mask entry of the masks "
            "file (header included), of each coding, and the information bound log2 C(n,k) per entry; the ratio "
            "to plain PETL (same dtype, head excluded) of the files and of each coding.\n\n" + coding
        )
    if ablation := ablation_table(pooled):
        text += (
            "\n## Mask ablation\n\nProPETL with learned, fixed random and no (all-ones) masks at the same "
            "sparsity, GLUE score x100, mean ± std over seeds (n); the learned runs pooled with table1's.\n\n"
            + ablation
        )
    return text + constant_note(found)


def runs_csv(runs: list[dict], relative_to: Path) -> str:
    """Every run on one line: experiment, identity, test metrics, the trivial baseline's GLUE score, storage figures,
    and its metrics.json relative to `relative_to` (a committed CSV names no machine's paths)."""
    metric_names = sorted({name for run in runs for name in run["test"]})
    checks = ("constant_predictions", "majority_prediction_share", "prediction_std_ratio")
    header = ["experiment", *RUN_FIELDS, *(f"test_{n}" for n in metric_names), "trivial_glue_score", *RUNS_CSV]
    order = lambda r: (r["task"], r["method"], str(r["prototype"]), str(r["mask_sparsity"]), r["seed"])
    rows: list[list] = [[*header, *checks, "path"]]
    for run in sorted(runs, key=order):
        check = run.get("predictions") or {}
        named = [run.get("experiment"), *(run.get(k) for k in RUN_FIELDS), *(run["test"].get(n) for n in metric_names)]
        figures = [(run.get("trivial") or {}).get("glue_score"), *(run["storage"].get(k) for k in RUNS_CSV)]
        checked = [constant_mark(run), check.get("majority_share"), check.get("std_ratio")]
        rows.append([*named, *figures, *checked, os.path.relpath(run["path"], relative_to)])
    return _csv(rows)


def jobs_table(runs: list[dict], root: Path) -> str:
    """Markdown, one line a run: its folder under `root` (a sweep's job names its overrides), task, row, GLUE score and
    test metrics (x100), bytes kept without and with its head, best epoch, training time."""
    labels = {(r["path"], r["task"]): label for label, members in row_groups(runs).items() for r in members}
    body = []
    for run in sorted(runs, key=lambda r: os.path.relpath(Path(r["path"]).parent, root)):
        job = os.path.relpath(Path(run["path"]).parent, root)
        tests = ", ".join(f"{name} {100 * value:.2f}" for name, value in run["test"].items())
        stored = [_bytes(kept_bytes(run)), _bytes(kept_bytes(run, with_head=True))]
        best = str(run.get("best_epoch") if run.get("best_epoch") is not None else "–")
        named = [job, task_title(run["task"]), labels[(run["path"], run["task"])], _number(run_score(run), ".2f")]
        body.append([*named, tests, *stored, best, _number(run.get("train_seconds"), ".0f")])
    header = ["Job", "Task", "Method", "GLUE score", "Test", "bytes/task", "with head", "best epoch", "train s"]
    return _table(header, body)
