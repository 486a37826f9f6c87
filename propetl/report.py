"""Experiment reports: every run's metrics.json -> one CSV, Table-1-shaped markdown, paired statistics, plots.

Runs are grouped into table rows by (model, method, prototype, mask kind, mask sparsity); each cell
is the mean ± sample std over seeds of the task's test numbers (x100), as in the paper's Table 1.
Table 1 holds the runs of the `table1` experiment (and multi-task runs); the sparsity sweep and the
mask ablation get their own sections, pooled with table1's ProPETL runs (the sweep point at a
prototype's default sparsity and the ablation's learned point ARE table1's runs): one run per
(model, task, method, prototype, mask kind, mask sparsity, seed), table1's copy preferred.
Comparisons (ProPETL − PETL, HF PEFT LoRA − our LoRA, learned − random/none masks) are paired by
seed, with a 95% t-interval over seeds. Used by `scripts/make_tables.py` (`make tables`).
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

import yaml
from scipy import stats as scipy_stats

from propetl import masks as mask_ops
from propetl.metrics import GLUE_NUMBERS, glue_average, task_score
from propetl.storage import MASKS_FILE, atomic_write_text, read_masks

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

PAPER_MODEL = "RoBERTa-base"
PAPER_STORAGE_PERCENT = 0.11            # the paper's ProPETL storage, % of the backbone (and ≈ its ratio to PETL)

RUN_FIELDS = ("task", "model", "method", "prototype", "mask_kind", "mask_sparsity", "seed", "protocol",
              "best_epoch", "epochs_run", "steps", "glue_score", "train_seconds", "wall_seconds", "world_size")
STORAGE_FIELDS = ("trainable_params", "stored_params", "mask_entries", "storage_bytes", "file_bytes",
                  "storage_percent_of_backbone", "storage_ratio_to_plain_petl", "backbone_params")
# Storage as written (storage.coding_figures, storage.file_figures): masks per coding, dense tensors in storage.dtype.
CODING_FIELDS = ("dtype", "mask_coding", "file_mask_bits_per_entry", "mask_bits_per_entry/bits", "mask_bits_per_entry/entropy",
                 "mask_bits_per_entry_bound", "file_ratio_to_plain_petl", "storage_ratio_to_plain_petl/bits",
                 "storage_ratio_to_plain_petl/entropy", "storage_ratio_to_plain_petl/bound")
STORAGE_FIELDS += CODING_FIELDS

# The overlays of conf/experiment/. The sweep and the ablation are not Table 1: their points at table1's
# settings (the prototype's default sparsity, learned masks) are table1's runs, pooled in.
TABLE1 = "table1"
POOLED_EXPERIMENTS = ("sparsity_sweep", "ablation_masks")
EXPERIMENTS = (TABLE1, "multitask", *POOLED_EXPERIMENTS)
IDENTITY = ("model", "task", "method", "prototype", "mask_kind", "mask_sparsity", "seed")
TRIVIAL_LABEL = "Trivial baseline (majority / mean)"
ROW_ORDER = [TRIVIAL_LABEL, "Fine-tune"] + [label for title in PROTOTYPE_TITLES.values()
                                            for label in (title, f"{title} (HF PEFT)", f"ProPETL-{title}")]
MASK_KINDS = ("learned", "random", "none")


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
    """One dict per finished run: its identity, experiment, test metrics, trivial baseline and storage figures."""
    runs = []
    for path in find_metrics(roots):
        try:
            metrics = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"cannot read {path}: {error}") from None
        experiment = run_experiment(metrics, path)
        if metrics.get("mode") == "multitask":
            runs.extend(_multitask_runs(metrics, path, experiment))
            continue
        if "test" not in metrics or "task" not in metrics:
            raise ValueError(f"{path} is not a propetl metrics.json (no 'task' or 'test')")
        run = {key: metrics.get(key) for key in RUN_FIELDS}
        run.update(test=dict(metrics["test"]), storage=dict(metrics.get("storage", {})), trivial=metrics.get("trivial"),
                   experiment=experiment, path=str(path))
        runs.append(run)
    return runs


def run_experiment(metrics: dict, path: Path) -> str | None:
    """The experiment overlay a run belongs to: metrics.json's `experiment`, else the composed config's
    `reproduce.experiment` (.hydra/config.yaml), else the folder above the run folder when it is named like
    one (outputs/reproduce/<profile>/<experiment>/<run>/, results/<profile>/runs/<experiment>/<run>/)."""
    if metrics.get("experiment"):
        return str(metrics["experiment"])
    config = path.parent / ".hydra" / "config.yaml"
    try:
        composed = yaml.safe_load(config.read_text()) if config.is_file() else None
    except (OSError, yaml.YAMLError):
        composed = None
    reproduce = composed.get("reproduce") if isinstance(composed, dict) else None
    if isinstance(reproduce, dict) and reproduce.get("experiment"):
        return str(reproduce["experiment"])
    folder = path.parent.parent.name
    return folder if folder in EXPERIMENTS else None


def _multitask_runs(metrics: dict, path: Path, experiment: str | None) -> list[dict]:
    """A multi-task run as one row per task, its storage the amortised per-task figures."""
    s = metrics.get("storage", {})
    storage = {"storage_bytes": s.get("amortised_bytes_per_task"), "storage_ratio_to_plain_petl": s.get("amortised_ratio_to_plain_petl"),
               "storage_percent_of_backbone": s.get("amortised_percent_of_backbone"), "backbone_params": s.get("backbone_params")}
    out = []
    for task, result in metrics["per_task"].items():
        run = {key: metrics.get(key) for key in RUN_FIELDS}
        run.update(task=task, method=f"{metrics['method']}-multitask", test=dict(result["test"]), storage=dict(storage),
                   glue_score=result.get("glue_score"), trivial=result.get("trivial"), experiment=experiment, path=str(path))
        out.append(run)
    return out


def run_identity(run: dict) -> tuple:
    return tuple(run.get(key) for key in IDENTITY)


def distinct_runs(runs: list[dict]) -> list[dict]:
    """One run per (model, task, method, prototype, mask kind, mask sparsity, seed): a configuration found
    twice (a sweep repeating a table1 run, two roots holding the same run) counts once: table1's copy,
    else one of no known experiment, else the sweep's or the ablation's (first path)."""
    def preference(run: dict) -> tuple:
        experiment = run.get("experiment")
        return 0 if experiment == TABLE1 else 2 if experiment in POOLED_EXPERIMENTS else 1, run["path"]

    chosen: dict[tuple, dict] = {}
    for run in sorted(runs, key=preference):
        chosen.setdefault(run_identity(run), run)
    return [run for run in runs if chosen[run_identity(run)] is run]


def table1_runs(runs: list[dict]) -> list[dict]:
    """The runs of Table 1: every run but the sparsity sweep's and the mask ablation's."""
    return [run for run in runs if run.get("experiment") not in POOLED_EXPERIMENTS]


def single_task_runs(runs: list[dict]) -> list[dict]:
    """The runs the sweep, the ablation and the paired comparisons pool: every single-task run."""
    return [run for run in runs if not run["method"].endswith("-multitask")]


def trivial_runs(runs: list[dict]) -> list[dict]:
    """Per task, the computed trivial baseline (metrics.json `trivial`: the train split's majority class or
    mean score answered for every example of the same test split) as one pseudo-run: never trained."""
    found: dict[str, list[dict]] = defaultdict(list)
    for run in runs:
        if (run.get("trivial") or {}).get("test"):
            found[run["task"]].append(run)
    out = []
    for task in sorted(found, key=_task_rank):
        first, versions = found[task][0], {json.dumps(r["trivial"]["test"], sort_keys=True) for r in found[task]}
        rule = str(first["trivial"].get("rule", ""))
        if len(versions) > 1:
            rule += f"; differs between this task's runs ({len(versions)} versions), the first shown"
        out.append({**dict.fromkeys(RUN_FIELDS), "task": task, "model": first["model"], "method": "trivial",
                    "test": dict(first["trivial"]["test"]), "glue_score": first["trivial"].get("glue_score"),
                    "storage": {}, "trivial": None, "experiment": None, "computed": True, "rule": rule,
                    "path": first["path"]})
    return out


def run_score(run: dict) -> float | None:
    """A run's GLUE score x100: metrics.json `glue_score` (the mean of the task's numbers in the paper's
    average; STS-B: Pearson and Spearman), else that mean from its test metrics."""
    if run.get("glue_score") is not None:
        return 100.0 * run["glue_score"]
    names = GLUE_NUMBERS.get(run["task"], ())
    return 100.0 * task_score(run["task"], run["test"]) if names and all(n in run["test"] for n in names) else None


def _metric(run: dict, metric: str) -> float | None:
    """x100: `glue_score` (run_score) or one test metric."""
    if metric == "glue_score":
        return run_score(run)
    return 100.0 * run["test"][metric] if metric in run["test"] else None


def _stats(values: Iterable) -> dict | None:
    """mean, sample std (0 for one value) and n of the values that are not None."""
    values = [float(v) for v in values if v is not None]
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def _kind(run: dict) -> str:
    return run.get("mask_kind") or "learned"


def _task_rank(task: str) -> int:
    return list(GLUE_NUMBERS).index(task) if task in GLUE_NUMBERS else len(GLUE_NUMBERS)


def _key_order(key: tuple) -> tuple:
    """Sort key of (model, task, prototype[, sparsity]) tuples: GLUE task order, then prototype order."""
    model, task, prototype, *rest = key
    prototypes = list(PROTOTYPE_TITLES)
    return (str(model), _task_rank(task), prototypes.index(prototype) if prototype in prototypes else len(prototypes),
            str(prototype), *(-1.0 if v is None else v for v in rest))


def _group(runs: Iterable[dict], keep: Callable[[dict], bool], fields: tuple) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for run in runs:
        if keep(run):
            groups[tuple(run.get(field) for field in fields)].append(run)
    return dict(sorted(groups.items(), key=lambda item: _key_order(item[0])))


def row_label(run: dict) -> str:
    """The table row a run belongs to, e.g. 'ProPETL-LoRA', 'LoRA', 'LoRA (HF PEFT)', 'Fine-tune',
    'ProPETL-LoRA (random, s=0.5)', the trivial baseline."""
    method, prototype = run["method"], run.get("prototype")
    title = PROTOTYPE_TITLES.get(prototype, str(prototype))
    if method.endswith("-multitask"):
        label = f"{'ProPETL' if method.startswith('propetl') else 'PETL'}-{title} (multi-task)"
    elif method == "trivial":
        label = TRIVIAL_LABEL
    elif method == "finetune":
        label = "Fine-tune"
    elif method == "petl":
        label = title
    elif method == "peft":
        label = f"{title} (HF PEFT)"
    else:
        label = f"ProPETL-{title}"
        extras = [] if run.get("mask_kind") in (None, "learned") else [str(run["mask_kind"])]
        if run.get("_sparsity_varies"):
            extras.append(f"s={run['mask_sparsity']:g}")
        if extras:
            label += f" ({', '.join(extras)})"
    if run.get("_model_varies"):
        label = f"{run['model']}: {label}"
    return label


def _row_order(label: str) -> tuple:
    model, _, base = label.rpartition(": ")
    head, _, extras = (base, "", "") if base in ROW_ORDER else base.partition(" (")
    kind_rank = 2 if "none" in extras else 1 if "random" in extras else 0      # learned masks first
    return model, ROW_ORDER.index(head) if head in ROW_ORDER else len(ROW_ORDER), kind_rank, extras


def summarise(runs: list[dict]) -> list[dict]:
    """Table rows: per task the mean/std/n over seeds of each GLUE number and of the GLUE score, the
    average, storage. A computed pseudo-run (the trivial baseline) counts in no `runs`."""
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
        scores: dict[str, dict] = {}
        for task in [t for t in GLUE_NUMBERS if any(r["task"] == t for r in members)]:
            task_runs = [r for r in members if r["task"] == task]
            tasks[task] = {name: _stats(100.0 * r["test"][name] for r in task_runs if name in r["test"])
                           for name in GLUE_NUMBERS[task]}
            scores[task] = _stats(run_score(r) for r in task_runs)
        means = {t: {n: c["mean"] / 100.0 for n, c in cells.items() if c} for t, cells in tasks.items()}
        numbers = sum(len(m) for m in means.values())
        storage = [r["storage"] for r in members if r["storage"]]
        computed = all(r.get("computed") for r in members)
        rows.append({
            "label": label,
            "method": members[0]["method"],
            "prototype": members[0].get("prototype"),
            "tasks": tasks,
            "scores": scores,
            "average": 100.0 * glue_average(means) if numbers else None,
            "average_numbers": numbers,
            "seeds": sorted({r["seed"] for r in members if r["seed"] is not None}),
            "runs": sum(not r.get("computed") for r in members),
            "computed": computed,
            **({"rules": {r["task"]: r.get("rule") for r in members}} if computed else {}),
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


# ----------------------------------------------------------------------------- sweep, ablation, paired statistics

def sparsity_sweep(runs: list[dict]) -> dict[tuple, dict[float, list[dict]]]:
    """(model, task, prototype) -> {mask sparsity: its ProPETL runs with learned masks}, where more than one
    sparsity was run. Give it the pooled runs (table1's ProPETL runs are the default-sparsity points)."""
    series: dict[tuple, dict] = {}
    keep = lambda r: r["method"] == "propetl" and _kind(r) == "learned"          # noqa: E731
    for (model, task, prototype, sparsity), members in _group(runs, keep, ("model", "task", "prototype", "mask_sparsity")).items():
        series.setdefault((model, task, prototype), {})[sparsity] = members
    return {key: points for key, points in series.items() if len(points) > 1}


def mask_ablation(runs: list[dict]) -> dict[tuple, dict[str, list[dict]]]:
    """(model, task, prototype, mask sparsity) where random or no masks were run -> {learned|random|none:
    ProPETL runs}. Give it the pooled runs (the learned point is table1's run at that sparsity)."""
    cells: dict[tuple, dict] = defaultdict(dict)
    keep = lambda r: r["method"] == "propetl"                                      # noqa: E731
    for (*key, kind), members in _group(runs, keep, ("model", "task", "prototype", "mask_sparsity", "mask_kind")).items():
        cells[tuple(key)][kind or "learned"] = members
    return {key: kinds for key, kinds in cells.items() if "random" in kinds or "none" in kinds}


def paired_interval(differences: list[float], confidence: float = 0.95) -> dict:
    """The mean of paired differences and its t-interval over the n pairs (seeds):
    mean ± t_{(1+confidence)/2, n−1} · sd / √n, sd the sample standard deviation of the differences.
    n < 2: the mean only; sd, t, the interval and `excludes_zero` are None."""
    n = len(differences)
    out = {"n": n, "mean_diff": statistics.fmean(differences) if n else None, "sd_diff": None, "t_crit": None,
           "half_width": None, "ci_low": None, "ci_high": None, "excludes_zero": None}
    if n >= 2:
        sd = statistics.stdev(differences)
        t = float(scipy_stats.t.ppf((1 + confidence) / 2, n - 1))
        half = t * sd / math.sqrt(n)
        low, high = out["mean_diff"] - half, out["mean_diff"] + half
        out.update(sd_diff=sd, t_crit=t, half_width=half, ci_low=low, ci_high=high, excludes_zero=low > 0 or high < 0)
    return out


def paired_by_seed(a_runs: list[dict], b_runs: list[dict], metric: str = "glue_score") -> dict:
    """A − B (x100) paired by seed over the seeds both sides have: paired_interval, the seeds, both means."""
    a = {r["seed"]: v for r in a_runs if (v := _metric(r, metric)) is not None}
    b = {r["seed"]: v for r in b_runs if (v := _metric(r, metric)) is not None}
    seeds = sorted(set(a) & set(b))
    return {**paired_interval([a[s] - b[s] for s in seeds]), "seeds": seeds,
            "mean_a": statistics.fmean(a[s] for s in seeds) if seeds else None,
            "mean_b": statistics.fmean(b[s] for s in seeds) if seeds else None}


def paired_comparisons(table_runs: list[dict], pooled_runs: list[dict]) -> list[dict]:
    """Every paired comparison, one dict per (comparison, model, task, prototype, sparsity, metric), the
    metric the GLUE score and, for tasks of two numbers, each of them:
      ProPETL − PETL             Table 1's ProPETL runs (learned masks) against plain PETL, same prototype;
      <P> (HF PEFT) − <P>        HF PEFT's implementation (method peft) against ours (method petl);
      learned − random / none    the mask ablation at its sparsity, the learned runs pooled from table1."""
    single = single_task_runs(table_runs)
    plain = _group(single, lambda r: r["method"] == "petl", ("model", "task", "prototype"))
    specs = []
    pro = _group(single, lambda r: r["method"] == "propetl" and _kind(r) == "learned",
                 ("model", "task", "prototype", "mask_sparsity"))
    for (model, task, prototype, sparsity), runs in pro.items():
        specs.append((0, "ProPETL − PETL", (model, task, prototype, sparsity), runs, plain.get((model, task, prototype))))
    for key, runs in _group(single, lambda r: r["method"] == "peft", ("model", "task", "prototype")).items():
        title = PROTOTYPE_TITLES.get(key[2], str(key[2]))
        specs.append((1, f"{title} (HF PEFT) − {title}", (*key, None), runs, plain.get(key)))
    for key, kinds in mask_ablation(single_task_runs(pooled_runs)).items():
        for rank, other in enumerate(("random", "none"), start=2):
            specs.append((rank, f"learned − {other}", key, kinds.get("learned"), kinds.get(other)))
    out = []
    for _, name, (model, task, prototype, sparsity), a, b in sorted(specs, key=lambda s: (s[0], _key_order(s[2]))):
        if not a or not b:
            continue
        numbers = GLUE_NUMBERS.get(task, ())
        for metric in ("glue_score", *(numbers if len(numbers) > 1 else ())):
            result = paired_by_seed(a, b, metric)
            if result["n"]:
                out.append({"comparison": name, "model": model, "task": task, "prototype": prototype,
                            "mask_sparsity": sparsity, "metric": metric, **result})
    return out


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


def _score_cell(runs: Iterable[dict] | None) -> str:
    """GLUE score x100 of some runs: 'mean±std (n=3)'."""
    cell = _stats(run_score(r) for r in runs or ())
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


def _sparsity(value) -> str:
    return "–" if value is None else f"{value:g}"


def _prefix(model, models: set) -> str:
    return f"{model}: " if len(models) > 1 else ""


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
            "computed" if row.get("computed") else str(row["runs"])]) + " |")
    if with_paper:
        lines.append(f"| *paper ({PAPER_MODEL})* |  |  |  |  | " + " | ".join("" for _ in tasks) + " |  |  |")
        for label, paper in PAPER_PROPETL_ROWS.items():
            cells = ["/".join(f"{v:.2f}" for v in paper[t]) for t in tasks]
            lines.append(f"| *{label} (paper)* | – | ≈{PAPER_STORAGE_PERCENT} | – | ≈{PAPER_STORAGE_PERCENT} | "
                         + " | ".join(cells) + f" | {paper['avg']:.2f} (11) | 3 seeds |")
    return "\n".join(lines) + "\n"


def trivial_note(rows: list[dict]) -> str:
    """The rule of each task's trivial baseline, '' without one."""
    rules = [f"{TASK_TITLES.get(task, task)}: {rule}" for row in rows if row.get("computed")
             for task, rule in row["rules"].items()]
    return ("The trivial baseline is computed from the labels, never trained: it answers every test example "
            "with the train split's majority class (classification) or mean score (regression; a constant has "
            "no correlation, so Pearson/Spearman are 0) — " + "; ".join(rules) + ".\n") if rules else ""


def comparison_table(rows: list[dict]) -> str:
    """ProPETL against plain PETL of the same prototype: per task, the difference of the mean test
    numbers in points (ProPETL − PETL), and the storage ratio. A ProPETL row split by sparsity
    ('ProPETL-LoRA (s=0.5)') is compared too, under 'LoRA (s=0.5)'."""
    by_label = {row["label"]: row for row in rows}
    tasks = [t for t in GLUE_NUMBERS if any(t in row["tasks"] for row in rows)]
    lines = ["| Prototype | " + " | ".join(f"{TASK_TITLES[t]} Δ" for t in tasks) + " | storage ratio |",
             "|" + "---|" * (len(tasks) + 2)]
    for pro in rows:
        model, colon, base = pro["label"].rpartition(": ")
        match = re.fullmatch(r"ProPETL-(\w+)( \(s=[^)]*\))?", base)
        plain = by_label.get(f"{model}{colon}{match[1]}") if match else None
        if not plain:
            continue
        deltas = []
        for task in tasks:
            a, b = plain["tasks"].get(task), pro["tasks"].get(task)
            if not a or not b:
                deltas.append("–")
                continue
            deltas.append("/".join(f"{b[n]['mean'] - a[n]['mean']:+.2f}" if a.get(n) and b.get(n) else "–" for n in a))
        lines.append(f"| {pro['label'].replace('ProPETL-', '', 1)} | " + " | ".join(deltas)
                     + f" | {_number(pro['ratio_to_plain_petl'], '.3f')} |")
    return "\n".join(lines) + "\n"


def _excludes_zero(value: bool | None) -> str:
    return "n/a" if value is None else "yes" if value else "no"


def paired_table(comparisons: list[dict]) -> str:
    """The paired comparisons as markdown: mean difference, t half-width, 95% interval, excludes 0."""
    models = {c["model"] for c in comparisons}
    lines = ["| Comparison (A − B) | Task | Prototype | s | Metric | n | seeds | A | B | mean Δ | ± t·sd/√n | 95% CI | excludes 0 |",
             "|" + "---|" * 13]
    for c in comparisons:
        interval = "n/a" if c["ci_low"] is None else f"[{c['ci_low']:+.2f}, {c['ci_high']:+.2f}]"
        lines.append("| " + " | ".join([
            c["comparison"], _prefix(c["model"], models) + TASK_TITLES.get(c["task"], c["task"]),
            PROTOTYPE_TITLES.get(c["prototype"], str(c["prototype"])), _sparsity(c["mask_sparsity"]),
            "GLUE score" if c["metric"] == "glue_score" else c["metric"], str(c["n"]), " ".join(map(str, c["seeds"])),
            f"{c['mean_a']:.2f}", f"{c['mean_b']:.2f}", f"{c['mean_diff']:+.2f}",
            "n/a" if c["half_width"] is None else f"{c['half_width']:.2f}", interval, _excludes_zero(c["excludes_zero"])]) + " |")
    return "\n".join(lines) + "\n"


PAIRED_FIELDS = ("comparison", "model", "task", "prototype", "mask_sparsity", "metric", "n", "seeds", "mean_a",
                 "mean_b", "mean_diff", "sd_diff", "t_crit", "half_width", "ci_low", "ci_high", "excludes_zero")


def paired_csv(comparisons: list[dict]) -> str:
    """paired.csv: the numbers of paired_table (x100), seeds space-separated, excludes_zero yes/no/n/a."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(PAIRED_FIELDS)
    for c in comparisons:
        writer.writerow([" ".join(map(str, c["seeds"])) if k == "seeds" else _excludes_zero(c[k]) if k == "excludes_zero"
                         else c[k] for k in PAIRED_FIELDS])
    return out.getvalue()


def sweep_table(runs: list[dict]) -> str:
    """The sparsity sweep (pooled runs): per task and prototype the GLUE score at each sparsity, and plain
    PETL of the same prototype; '' without a sweep."""
    series = sparsity_sweep(runs)
    if not series:
        return ""
    plain = _group(runs, lambda r: r["method"] == "petl", ("model", "task", "prototype"))
    models = {key[0] for key in series}
    sparsities = sorted({s for points in series.values() for s in points if s is not None})
    lines = ["| Task | Prototype | " + " | ".join(f"s={s:g}" for s in sparsities) + " | plain PETL |",
             "|" + "---|" * (len(sparsities) + 3)]
    for (model, task, prototype), points in series.items():
        lines.append(f"| {_prefix(model, models)}{TASK_TITLES.get(task, task)} | ProPETL-{PROTOTYPE_TITLES.get(prototype, prototype)} | "
                     + " | ".join(_score_cell(points.get(s)) for s in sparsities)
                     + f" | {_score_cell(plain.get((model, task, prototype)))} |")
    return "\n".join(lines) + "\n"


def ablation_table(runs: list[dict]) -> str:
    """The mask ablation (pooled runs): learned, random and no masks at the same sparsity; '' without one."""
    cells = mask_ablation(runs)
    if not cells:
        return ""
    models = {key[0] for key in cells}
    lines = ["| Task | Prototype | s | learned masks | random masks | no masks |", "|" + "---|" * 6]
    for (model, task, prototype, sparsity), kinds in cells.items():
        lines.append(f"| {_prefix(model, models)}{TASK_TITLES.get(task, task)} | ProPETL-{PROTOTYPE_TITLES.get(prototype, prototype)} "
                     f"| {_sparsity(sparsity)} | " + " | ".join(_score_cell(kinds.get(kind)) for kind in MASK_KINDS) + " |")
    return "\n".join(lines) + "\n"


def coding_table(runs: list[dict]) -> str:
    """ProPETL runs that logged storage per mask coding (format 2), one line per (model, prototype, sparsity,
    dtype, written coding); '' without any."""
    keep = lambda r: r["method"] == "propetl" and "mask_bits_per_entry_bound" in r["storage"]     # noqa: E731
    groups = _group(runs, keep, ("model", "task", "prototype", "mask_sparsity"))
    if not groups:
        return ""
    models = {key[0] for key in groups}
    lines = ["| Task | Prototype | s | dtype | written | bits/entry: file | bits | entropy | log2 C(n,k) "
             "| ratio: files | bits | entropy | log2 C(n,k) | runs |", "|" + "---|" * 14]
    for (model, task, prototype, sparsity), members in groups.items():
        for written in sorted({(r["storage"].get("dtype"), r["storage"].get("mask_coding")) for r in members}, key=str):
            same = [r["storage"] for r in members if (r["storage"].get("dtype"), r["storage"].get("mask_coding")) == written]
            lines.append(f"| {_prefix(model, models)}{TASK_TITLES.get(task, task)} | ProPETL-{PROTOTYPE_TITLES.get(prototype, prototype)} "
                         f"| {_sparsity(sparsity)} | {written[0]} | {written[1]} | "
                         + " | ".join(_number(_mean(s.get(k) for s in same), ".4f") for k in CODING_FIELDS[2:])
                         + f" | {len(same)} |")
    return "\n".join(lines) + "\n"


def report_markdown(found: list[dict], runs: list[dict], rows: list[dict], comparisons: list[dict], title: str = "") -> str:
    """table.md: Table 1, ProPETL − PETL, the paired statistics, the sparsity sweep and the mask ablation.
    `found`: every run read; `runs`: one per configuration (distinct_runs)."""
    pooled = single_task_runs(runs)
    text = (f"# {title}\n\n" if title else "") + f"{len(found)} runs"
    if len(found) > len(runs):
        text += (f" ({len(found) - len(runs)} repeating the (task, method, prototype, mask kind, mask sparsity, seed)"
                 " of another run, counted once)")
    text += ". Test numbers x100, mean ± std over seeds.\n\n"
    text += ("## Table 1\n\nThe table1 experiment's runs (and multi-task runs); the sparsity sweep and the mask ablation "
             "have their own sections below.\n\n" + markdown_table(rows))
    text += (f"\n{note}" if (note := trivial_note(rows)) else "")
    text += "\nProPETL minus plain PETL, difference of the means (points):\n\n" + comparison_table(rows)
    text += ("\n## Paired differences over seeds\n\nA − B in points (x100), runs paired by seed (only seeds both sides "
             "have): the mean of the per-seed differences with its 95% paired t-interval over seeds, "
             "mean ± t(0.975, n−1)·sd/√n, sd the sample std of the differences and n the number of paired seeds. "
             "'excludes 0' says whether the interval excludes zero; with n < 2 there is no interval (n/a). "
             "GLUE score: the task's main number (the mean of its numbers in the paper's average, STS-B: of "
             "Pearson and Spearman). ProPETL − PETL and HF PEFT − ours use Table 1's runs; learned − random/none "
             "the mask ablation, its learned runs pooled from table1. The same numbers are in paired.csv.\n\n")
    text += paired_table(comparisons) if comparisons else "No pair of runs with a seed in common.\n"
    if sweep := sweep_table(pooled):
        text += ("\n## Sparsity sweep\n\nProPETL with learned masks, GLUE score x100, mean ± std over seeds (n): the "
                 "sparsity_sweep runs pooled with table1's (the point at each prototype's default sparsity), each "
                 "configuration and seed counted once.\n\n" + sweep)
    if coding := coding_table(pooled):
        text += ("\n## Storage by mask coding\n\nProPETL as written, mean over runs: bits per mask entry of the masks file "
                 "(header included), of each coding, and the information bound log2 C(n,k) per entry; the ratio to plain "
                 "PETL (same dtype, head excluded) of the files and of each coding.\n\n" + coding)
    if ablation := ablation_table(pooled):
        text += ("\n## Mask ablation\n\nProPETL with learned, fixed random and no (all-ones) masks at the same "
                 "sparsity, GLUE score x100, mean ± std over seeds (n); the learned runs pooled with table1's.\n\n" + ablation)
    return text


def runs_csv(runs: list[dict], relative_to: Path | None = None) -> str:
    """Every run on one line: experiment, identity, every test metric, the trivial baseline's GLUE score,
    the storage figures, where its metrics.json lies (relative to `relative_to`, so a committed CSV names
    no machine's paths)."""
    metric_names = sorted({name for run in runs for name in run["test"]})
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["experiment", *RUN_FIELDS, *(f"test_{n}" for n in metric_names), "trivial_glue_score",
                     *STORAGE_FIELDS, "path"])
    for run in sorted(runs, key=lambda r: (r["task"], r["method"], str(r["prototype"]), str(r["mask_sparsity"]), r["seed"])):
        writer.writerow([run.get("experiment")] + [run.get(k) for k in RUN_FIELDS] + [run["test"].get(n) for n in metric_names]
                        + [(run.get("trivial") or {}).get("glue_score")] + [run["storage"].get(k) for k in STORAGE_FIELDS]
                        + [os.path.relpath(run["path"], relative_to) if relative_to else run["path"]])
    return out.getvalue()


# ----------------------------------------------------------------------------- plots

PROTOTYPE_COLOURS = {"adapter": "tab:blue", "lora": "tab:orange", "prefix": "tab:green"}
METHOD_MARKERS = {"finetune": "^", "petl": "s", "peft": "D", "propetl": "o", "petl-multitask": "<", "propetl-multitask": "v"}


def _colour(method: str, prototype) -> str:
    return "black" if method == "finetune" else PROTOTYPE_COLOURS.get(prototype, "tab:purple")


def _n_text(ns: Iterable[int]) -> str:
    ns = sorted(set(ns))
    return str(ns[0]) if len(ns) == 1 else f"{ns[0]}–{ns[-1]}"


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _task_axes(tasks: list[str], height: float):
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.4 * len(tasks), height), squeeze=False)
    return fig, dict(zip(tasks, axes[0]))


def _trivial_line(ax, trivial: dict | None) -> None:
    """The trivial baseline (a pseudo-run of trivial_runs) as a grey dashed line."""
    if trivial and (score := run_score(trivial)) is not None:
        ax.axhline(score, ls="--", lw=1, color="grey", label=f"trivial baseline ({trivial['rule'].split(' (')[0]})")


def _points(ax, cells: dict[float, dict], colour: str, label: str, **style) -> None:
    """Means ± std at x (cells: x -> _stats), n in the legend; each point's n beside it when n varies."""
    ns = [c["n"] for c in cells.values()]
    ax.errorbar(list(cells), [c["mean"] for c in cells.values()], yerr=[c["std"] for c in cells.values()], capsize=3,
                color=colour, label=f"{label} (n={_n_text(ns)})", **style)
    if len(set(ns)) > 1:
        for x, c in cells.items():
            ax.annotate(f"n={c['n']}", (x, c["mean"]), textcoords="offset points", xytext=(4, 4), fontsize=6, color=colour)


def _finish(ax, task: str, xlabel: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{TASK_TITLES.get(task, task)} GLUE score (x100, mean ± std)")
    ax.set_title(TASK_TITLES.get(task, task))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6.5, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2)


def plot_metric_vs_storage(rows: list[dict], path: Path) -> Path | None:
    """Per task: the GLUE score x100 (mean ± std over seeds, n in the legend) against the % of the
    backbone stored per task (log x); a colour per prototype, a marker per method; the trivial baseline
    as a dashed line; the paper's ProPETL points (RoBERTa-base) as hollow stars."""
    tasks = [t for t in GLUE_NUMBERS if any(row["scores"].get(t) and not row.get("computed") for row in rows)]
    if not tasks:
        return None
    fig, axes = _task_axes(tasks, 6.0)
    titles = {title: prototype for prototype, title in PROTOTYPE_TITLES.items()}
    for task, ax in axes.items():
        for row in rows:
            score = row["scores"].get(task)
            if not score or row["percent_storage"] is None or row.get("computed"):
                continue
            ax.errorbar(row["percent_storage"], score["mean"], yerr=score["std"], capsize=3, ls="none",
                        marker=METHOD_MARKERS.get(row["method"], "x"), color=_colour(row["method"], row["prototype"]),
                        mfc="none" if row["method"] == "propetl" and " (" in row["label"] else None,
                        label=f"{row['label']} (n={score['n']})")
        for row in rows:
            if row.get("computed") and row["scores"].get(task):
                ax.axhline(row["scores"][task]["mean"], ls="--", lw=1, color="grey",
                           label=f"trivial baseline ({row['rules'][task].split(' (')[0]})")
        for label, paper in PAPER_PROPETL_ROWS.items():
            if task in paper:
                ax.plot(PAPER_STORAGE_PERCENT, statistics.fmean(paper[task]), ls="none", marker="*", ms=12, mfc="none",
                        color=PROTOTYPE_COLOURS.get(titles.get(label.split("-", 1)[1]), "grey"),
                        label=f"{label} (paper, {PAPER_MODEL})")
        ax.set_xscale("log")
        _finish(ax, task, "% of the backbone stored per task (without head, log)")
    return _save(fig, path)


def plot_sparsity_sweep(runs: list[dict], path: Path) -> Path | None:
    """Per task: ProPETL's GLUE score (mean ± std over seeds) against mask sparsity, one line per prototype,
    plain PETL of that prototype (mean over seeds) a dashed line of the same colour, n in the legend, the
    trivial baseline grey. Give it the pooled runs; None without a sweep."""
    series = sparsity_sweep(runs)
    if not series:
        return None
    plain = _group(runs, lambda r: r["method"] == "petl", ("model", "task", "prototype"))
    trivial = {r["task"]: r for r in trivial_runs(runs)}
    models = {key[0] for key in series}
    fig, axes = _task_axes([t for t in GLUE_NUMBERS if any(key[1] == t for key in series)], 5.2)
    for (model, task, prototype), points in series.items():
        ax, colour, title = axes[task], PROTOTYPE_COLOURS.get(prototype, "tab:purple"), PROTOTYPE_TITLES.get(prototype, prototype)
        cells = {x: cell for x, members in points.items() if x is not None and (cell := _stats(run_score(r) for r in members))}
        _points(ax, cells, colour, f"{_prefix(model, models)}ProPETL-{title}", marker="o")
        if reference := _stats(run_score(r) for r in plain.get((model, task, prototype), ())):
            ax.axhline(reference["mean"], ls="--", lw=1.2, color=colour,
                       label=f"{_prefix(model, models)}{title}, plain PETL mean (n={reference['n']})")
    for task, ax in axes.items():
        _trivial_line(ax, trivial.get(task))
        _finish(ax, task, "mask sparsity (fraction of zeros)")
    return _save(fig, path)


def plot_mask_ablation(runs: list[dict], path: Path) -> Path | None:
    """Per task: ProPETL's GLUE score (mean ± std over seeds) with learned, random and no masks at the same
    sparsity, a colour per prototype, n in the legend. Give it the pooled runs; None without an ablation."""
    cells = mask_ablation(runs)
    if not cells:
        return None
    trivial = {r["task"]: r for r in trivial_runs(runs)}
    models = {key[0] for key in cells}
    fig, axes = _task_axes([t for t in GLUE_NUMBERS if any(key[1] == t for key in cells)], 5.2)
    for task, ax in axes.items():
        keys = [key for key in cells if key[1] == task]
        for i, (model, _, prototype, sparsity) in enumerate(keys):
            kinds = cells[(model, task, prototype, sparsity)]
            points = {x + 0.1 * (i - (len(keys) - 1) / 2): cell for x, kind in enumerate(MASK_KINDS)
                      if (cell := _stats(run_score(r) for r in kinds.get(kind, ())))}
            _points(ax, points, PROTOTYPE_COLOURS.get(prototype, "tab:purple"), f"{_prefix(model, models)}ProPETL-"
                    f"{PROTOTYPE_TITLES.get(prototype, prototype)}, s={_sparsity(sparsity)}", fmt="o")
        ax.set_xticks(range(len(MASK_KINDS)), [f"{kind} masks" if kind != "none" else "no masks" for kind in MASK_KINDS])
        ax.set_xlim(-0.5, len(MASK_KINDS) - 0.5)
        _trivial_line(ax, trivial.get(task))
        _finish(ax, task, "masks over the prototype")
    return _save(fig, path)


def layer_masks(checkpoint_dir: Path):
    """[L, entries] 0/1: every mask tensor of a checkpoint decoded (either mask coding), one row per layer."""
    import torch

    decoded = read_masks(Path(checkpoint_dir) / MASKS_FILE)
    return torch.cat([decoded[name].reshape(decoded[name].shape[0], -1) for name in sorted(decoded)], dim=1)


def layer_mask_hamming(checkpoint_dir: Path):
    """[L, L] fraction of mask entries where two layers differ, over every mask tensor of a checkpoint."""
    return mask_ops.pairwise_hamming(layer_masks(checkpoint_dir))


def plot_mask_hamming(checkpoint_dir: Path, path: Path, title: str = "") -> Path:
    """Heat map of the pairwise Hamming distance between the layers' learned masks of one run, with the
    distance two independent random masks of the same density d would have, 2·d·(1−d), marked in red on
    the colour bar and given in the title."""
    flat = layer_masks(checkpoint_dir)
    distance = mask_ops.pairwise_hamming(flat).numpy()
    density = float(flat.float().mean())
    independent = 2 * density * (1 - density)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 4.8))
    image = ax.imshow(distance, cmap="viridis", vmin=0, vmax=max(float(distance.max()), independent * 1.05) or 1.0)
    for i in range(distance.shape[0]):
        for j in range(distance.shape[1]):
            ax.text(j, i, f"{distance[i, j]:.2f}", ha="center", va="center", fontsize=7, color="w")
    ax.set_xlabel("layer")
    ax.set_ylabel("layer")
    ax.set_title((title or "Hamming distance between layer masks") + f"\nred: independent random masks of density "
                 f"d={density:.3f}, 2d(1−d)={independent:.3f}", fontsize=8)
    bar = fig.colorbar(image, ax=ax, fraction=0.046)
    bar.ax.axhline(independent, color="red", lw=2)
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

PLOT_FILES = ("metric_vs_storage.png", "sparsity_sweep.png", "mask_ablation.png", "mask_hamming.png")


def build(roots: Iterable[Path], out_dir: Path, title: str = "") -> dict[str, Path]:
    """Collect the runs under `roots` and write runs.csv, table.md, paired.csv, rows.json and the plots into `out_dir`."""
    roots = list(roots)
    found = load_runs(roots)
    if not found:
        raise ValueError(f"no metrics.json under {', '.join(map(str, roots))}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = distinct_runs(found)
    table_runs, pooled = table1_runs(runs), single_task_runs(runs)
    rows = summarise(table_runs + trivial_runs(table_runs))
    comparisons = paired_comparisons(table_runs, pooled)
    written = {}
    for stale in PLOT_FILES:                    # a plot not drawn this time must not linger from an older build
        (out_dir / stale).unlink(missing_ok=True)
    for key, name, text in (("csv", "runs.csv", runs_csv(found, out_dir)),
                            ("table", "table.md", report_markdown(found, runs, rows, comparisons, title)),
                            ("paired", "paired.csv", paired_csv(comparisons)),
                            ("rows", "rows.json", json.dumps(rows, indent=1))):
        atomic_write_text(out_dir / name, text)
        written[key] = out_dir / name
    for key, plot in (("metric_vs_storage", plot_metric_vs_storage(rows, out_dir / "metric_vs_storage.png")),
                      ("sparsity_sweep", plot_sparsity_sweep(pooled, out_dir / "sparsity_sweep.png")),
                      ("mask_ablation", plot_mask_ablation(pooled, out_dir / "mask_ablation.png"))):
        if plot:
            written[key] = plot
    learned = [r for r in pooled if r["method"] == "propetl" and _kind(r) == "learned"
               and (Path(r["path"]).parent / "checkpoint" / MASKS_FILE).exists()]
    if learned:
        run = sorted(learned, key=lambda r: (r.get("experiment") != TABLE1, r["task"], str(r["prototype"]), r["seed"]))[0]
        written["mask_hamming"] = plot_mask_hamming(
            Path(run["path"]).parent / "checkpoint", out_dir / "mask_hamming.png",
            f"{TASK_TITLES[run['task']]} · ProPETL-{PROTOTYPE_TITLES.get(run['prototype'])} · seed {run['seed']}: layer masks, Hamming")
    return written
