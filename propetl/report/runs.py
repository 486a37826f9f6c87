"""Collecting runs: every metrics.json under some folders -> one record per run, grouped into Table-1 rows. The names
and titles the tables and plots share live here too (a task's: its yaml, data/tasks.py)."""

from __future__ import annotations

import json
import statistics
import zipfile
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import yaml

from propetl.data.metrics import glue_average, glue_numbers, task_numbers, task_score
from propetl.data.tasks import in_task_order, task_rank
from propetl.run.log import read_predictions
from propetl.run.rundir import PREDICTIONS_FILE

PROTOTYPE_TITLES = {"adapter": "Adapter", "lora": "LoRA", "prefix": "Prefix"}
# method=peft's other tuners (conf/peft/; metrics.json `prototype` holds the tuner's name), as their papers write them
PEFT_TITLES = {"vera": "VeRA", "vblora": "VB-LoRA", "fourierft": "FourierFT", "unilora": "Uni-LoRA", "ia3": "(IA)³"}
PEFT_TITLES |= {"tinylora": "TinyLoRA", "loha": "LoHa", "lokr": "LoKr"}

PAPER_MODEL = "RoBERTa-base"
PAPER_STORAGE_PERCENT = 0.11  # the paper's ProPETL storage, % of the backbone (and ≈ its ratio to PETL)

IDENTITY = ("model", "task", "method", "prototype", "mask_kind", "mask_sparsity", "prototype_frozen", "seed")
RESULT_FIELDS = ("best_epoch", "epochs_run", "steps", "glue_score", "train_seconds", "wall_seconds", "world_size")
RUN_FIELDS = ("task", "model", *IDENTITY[2:], "protocol", *RESULT_FIELDS)  # runs.csv's order
# The overlays of conf/experiment/. The sweep and the ablation are not Table 1: their points at table1's
# settings (the prototype's default sparsity, learned masks) are table1's runs, pooled in.
TABLE1 = "table1"
POOLED_EXPERIMENTS = ("sparsity_sweep", "ablation_masks")
FRONTIER = "frontier"  # the PEFT tuners beside table1's runs: in Table 1 and the frontier section
TABLE2 = "t5_multitask"  # T5 multi-task GLUE: a table of its own (table2_runs)
EXPERIMENTS = (TABLE1, "multitask", FRONTIER, *POOLED_EXPERIMENTS, TABLE2)
# A (nearly) constant predictor: one class in at least MAJORITY_SHARE of the test predictions (classification), or
# predictions whose std is below STD_RATIO of the test labels' (regression).
MAJORITY_SHARE, STD_RATIO = 0.99, 0.05
NOT_KEPT = "no predictions kept"
TRIVIAL_LABEL = "Trivial baseline (majority / mean)"
ROW_ORDER = (
    [TRIVIAL_LABEL, "Fine-tune"]
    + [label for title in PROTOTYPE_TITLES.values() for label in (title, f"{title} (HF PEFT)", f"ProPETL-{title}")]
    + [f"{title} (HF PEFT)" for title in PEFT_TITLES.values()]
)
MASK_KINDS = ("learned", "random", "none")


def find_metrics(roots: Iterable[Path]) -> list[Path]:
    """Every metrics.json under the given folders (or the files themselves), sorted."""
    found: set[Path] = set()
    for root in map(Path, roots):
        if root.is_file():
            found.add(root)
        elif root.is_dir():
            found.update(
                p for p in root.rglob("metrics.json") if not any(part.startswith(".") for part in p.parts[-3:-1])
            )
    return sorted(found)


def load_runs(roots: Iterable[Path]) -> list[dict]:
    """One dict per finished run: identity, experiment, test metrics, trivial baseline, storage, `predictions`."""
    runs = []
    for path in find_metrics(roots):
        try:
            metrics = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"cannot read {path}: {error}") from None
        experiment = run_experiment(metrics, path)
        predicted = _kept_predictions(path.parent / PREDICTIONS_FILE)
        if metrics.get("mode") == "multitask":
            found = _multitask_runs(metrics, path, experiment)
        elif "test" not in metrics or "task" not in metrics:
            raise ValueError(f"{path} is not a propetl metrics.json (no 'task' or 'test')")
        else:
            storage, trivial = dict(metrics.get("storage", {})), metrics.get("trivial")
            found = [_run(metrics, path, experiment, test=dict(metrics["test"]), storage=storage, trivial=trivial)]
        runs += [
            dict(run, predictions=prediction_check(*predicted[run["task"]]) if run["task"] in predicted else None)
            for run in found
        ]
    return runs


def _kept_predictions(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A run's predictions.npz ({} if it kept none)."""
    if not path.exists():
        return {}
    try:
        return read_predictions(path)
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as error:  # never unpickles
        raise ValueError(f"cannot read {path}: {error}; a run's predictions.npz holds arrays only") from None


def prediction_check(predictions: np.ndarray, labels: np.ndarray) -> dict:
    """Is a task's test predictor (nearly) constant? Classification: `majority_share` (the top predicted class's share)
    ≥ MAJORITY_SHARE; regression: `std_ratio` (the predictions' std over the labels') < STD_RATIO."""
    if np.issubdtype(predictions.dtype, np.integer):
        share = float(np.unique(predictions, return_counts=True)[1].max() / len(predictions))
        return {"majority_share": share, "std_ratio": None, "constant": share >= MAJORITY_SHARE}
    spread = float(np.std(labels))
    ratio = float(np.std(predictions)) / spread if spread > 0 else 0.0
    return {"majority_share": None, "std_ratio": ratio, "constant": ratio < STD_RATIO}


def _run(metrics: dict, path: Path, experiment: str | None, **fields) -> dict:
    return {**{key: metrics.get(key) for key in RUN_FIELDS}, **fields, "experiment": experiment, "path": str(path)}


def run_experiment(metrics: dict, path: Path) -> str | None:
    """The experiment overlay a run belongs to: metrics.json's `experiment`, else .hydra/config.yaml's
    `reproduce.experiment`, else the run folder's parent when it is named like one (EXPERIMENTS)."""
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
    """A multi-task run as one row per task, its storage the amortised per-task figures (one task: its own)."""
    s = metrics.get("storage", {})
    keys = ("storage_bytes", "storage_ratio_to_plain_petl", "storage_percent_of_backbone")
    amortised = ("amortised_bytes_per_task", "amortised_ratio_to_plain_petl", "amortised_percent_of_backbone")
    storage = {key: s.get(theirs if "amortised_bytes_per_task" in s else key) for key, theirs in zip(keys, amortised)}
    storage["backbone_params"] = s.get("backbone_params")
    if "trainable_params" in s:  # every task's together (runs before it have none: no % params)
        storage["trainable_params"] = s["trainable_params"]
    method = f"{metrics['method']}-multitask"
    text_to_text = metrics.get("model_family") == "t5" or experiment == TABLE2
    return [
        _run(metrics, path, experiment, task=task, method=method, test=dict(result["test"]), storage=dict(storage))
        | {"glue_score": result.get("glue_score"), "trivial": result.get("trivial"), "text_to_text": text_to_text}
        for task, result in metrics["per_task"].items()
    ]


def run_identity(run: dict) -> tuple:
    return tuple(run.get(key) for key in IDENTITY)


def distinct_runs(runs: list[dict]) -> list[dict]:
    """One run per IDENTITY: a configuration found twice (a sweep repeating a table1 run, two roots holding one run)
    counts once: table1's copy, else one of no known experiment, else the sweep's or the ablation's (first path)."""

    def preference(run: dict) -> tuple:
        experiment = run.get("experiment")
        return 0 if experiment == TABLE1 else 2 if experiment in POOLED_EXPERIMENTS else 1, run["path"]

    chosen: dict[tuple, dict] = {}
    for run in sorted(runs, key=preference):
        chosen.setdefault(run_identity(run), run)
    return [run for run in runs if chosen[run_identity(run)] is run]


def table1_runs(runs: list[dict]) -> list[dict]:
    """The runs of Table 1: every run but the sparsity sweep's, the mask ablation's and Table 2's."""
    return [run for run in runs if run.get("experiment") not in POOLED_EXPERIMENTS and not run.get("text_to_text")]


def table2_runs(runs: list[dict]) -> list[dict]:
    """The runs of Table 2: multi-task T5 (text to text) runs, under their method's plain name (Fine-tune, Adapter,
    ProPETL-Adapter: every row of that table is multi-task)."""
    return [dict(run, method=run["method"].removesuffix("-multitask")) for run in runs if run.get("text_to_text")]


def single_task_runs(runs: list[dict]) -> list[dict]:
    """The runs the sweep, the ablation and the paired comparisons pool: every single-task run."""
    return [run for run in runs if not run["method"].endswith("-multitask")]


def trivial_runs(runs: list[dict]) -> list[dict]:
    """Per task, the computed trivial baseline (metrics.json `trivial`; metrics.trivial_baseline) as one pseudo-run."""
    found: dict[str, list[dict]] = defaultdict(list)
    for run in runs:
        if (run.get("trivial") or {}).get("test"):
            found[run["task"]].append(run)
    out = []
    for task in in_task_order(found):
        first, versions = found[task][0], {json.dumps(r["trivial"]["test"], sort_keys=True) for r in found[task]}
        rule = str(first["trivial"].get("rule", ""))
        if len(versions) > 1:
            rule += f"; differs between this task's runs ({len(versions)} versions), the first shown"
        trivial = first["trivial"]
        fields = {"task": task, "model": first["model"], "method": "trivial", "test": dict(trivial["test"])}
        fields |= {"glue_score": trivial.get("glue_score"), "storage": {}, "trivial": None, "experiment": None}
        out.append({**dict.fromkeys(RUN_FIELDS), **fields, "computed": True, "rule": rule, "path": first["path"]})
    return out


def run_score(run: dict) -> float | None:
    """A run's GLUE score x100: metrics.json `glue_score`, else the mean of its task's numbers (task_numbers)."""
    if run.get("glue_score") is not None:
        return 100.0 * run["glue_score"]
    names = task_numbers(run["task"], run["test"])
    return 100.0 * task_score(run["task"], run["test"]) if names and all(n in run["test"] for n in names) else None


def run_metric(run: dict, metric: str) -> float | None:
    """x100: `glue_score` (run_score) or one test metric."""
    if metric == "glue_score":
        return run_score(run)
    return 100.0 * run["test"][metric] if metric in run["test"] else None


def cell_stats(values: Iterable) -> dict | None:
    """mean, sample std (0 for one value) and n of the values that are not None."""
    values = [float(v) for v in values if v is not None]
    n = len(values)
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if n > 1 else 0.0, "n": n} if n else None


def score_stats(runs: Iterable[dict] | None) -> dict | None:
    """cell_stats of the runs' GLUE scores (x100)."""
    return cell_stats(run_score(r) for r in runs or ())


def prototype_title(prototype) -> str:
    return PROTOTYPE_TITLES.get(prototype) or PEFT_TITLES.get(prototype) or str(prototype)


def mask_kind(run: dict) -> str:
    return run.get("mask_kind") or "learned"


def trained_prototype(run: dict) -> bool:
    """A ProPETL run whose prototype trained (not prototype.freeze): the sweep, the ablation and ProPETL − PETL."""
    return run["method"] == "propetl" and not run.get("prototype_frozen")


def key_order(key: tuple) -> tuple:
    """Sort key of (model, task, prototype[, sparsity]) tuples: task order (task_rank), then prototype order."""
    model, task, prototype, *rest = key
    prototypes = list(PROTOTYPE_TITLES)
    rank = prototypes.index(prototype) if prototype in prototypes else len(prototypes)
    return (str(model), task_rank(task), rank, str(prototype), *(-1.0 if v is None else v for v in rest))


def group_runs(runs: Iterable[dict], keep: Callable[[dict], bool], fields: tuple) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for run in runs:
        if keep(run):
            groups[tuple(run.get(field) for field in fields)].append(run)
    return dict(sorted(groups.items(), key=lambda item: key_order(item[0])))


def row_label(run: dict) -> str:
    """The table row a run belongs to: 'ProPETL-LoRA', 'LoRA (HF PEFT)', 'ProPETL-LoRA (random, s=0.5)', …."""
    method, title = run["method"], prototype_title(run.get("prototype"))
    if method == "finetune-multitask":
        label = "Fine-tune (multi-task)"
    elif method.endswith("-multitask"):
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
        if run.get("prototype_frozen"):
            extras.insert(0, "frozen prototype")
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
    kind_rank = 2 if "none" in extras else 1 if "random" in extras else 0  # learned masks first
    return model, ROW_ORDER.index(head) if head in ROW_ORDER else len(ROW_ORDER), kind_rank, extras


def row_groups(runs: list[dict]) -> dict[str, list[dict]]:
    """row label -> its runs, in table order; labels name the model or sparsity only where several are present."""
    models = {r["model"] for r in runs}
    by_prototype = defaultdict(set)  # (prototype, mask kind, frozen) -> the sparsities of its ProPETL runs
    arm = lambda r: (r["prototype"], r["mask_kind"], bool(r.get("prototype_frozen")))
    for r in runs:
        if r["method"] == "propetl":
            by_prototype[arm(r)].add(r["mask_sparsity"])
    groups: dict[str, list[dict]] = defaultdict(list)
    for run in runs:
        run = dict(run, _model_varies=len(models) > 1, _sparsity_varies=len(by_prototype.get(arm(run), ())) > 1)
        groups[row_label(run)].append(run)
    return {label: groups[label] for label in sorted(groups, key=_row_order)}


def summarise(runs: list[dict]) -> list[dict]:
    """Table rows: per task the mean/std/n over seeds of each number and the score; the average; storage. `runs`: the
    metrics.json files (a multi-task run counts once); a computed pseudo-run (the trivial baseline) counts in none."""
    groups = row_groups(runs)
    rows = []
    for label, members in groups.items():
        tasks, scores = {}, {}
        for task in in_task_order(r["task"] for r in members):
            task_runs = [r for r in members if r["task"] == task]
            tasks[task] = {
                name: cell_stats(100.0 * r["test"][name] for r in task_runs if name in r["test"])
                for name in task_numbers(task, task_runs[0]["test"])
            }
            scores[task] = cell_stats(run_score(r) for r in task_runs)
        means = {t: {n: c["mean"] / 100.0 for n, c in cells.items() if c} for t, cells in tasks.items()}
        numbers = len(glue_numbers(means))
        storage = [r["storage"] for r in members if r["storage"]]
        computed = all(r.get("computed") for r in members)
        row = {
            "label": label,
            "method": members[0]["method"],
            "prototype": members[0].get("prototype"),
            "tasks": tasks,
            "scores": scores,
            "average": 100.0 * glue_average(means) if numbers else None,
            "average_numbers": numbers,
            "seeds": sorted({r["seed"] for r in members if r["seed"] is not None}),
            "runs": len({r["path"] for r in members if not r.get("computed")}),  # a multi-task run: one, all tasks
            "computed": computed,
            **({"rules": {r["task"]: r.get("rule") for r in members}} if computed else {}),
            "percent_params": mean_or_none(
                100.0 * s["trainable_params"] / s["backbone_params"]
                for s in storage
                if s.get("backbone_params") and "trainable_params" in s
            ),
            "percent_storage": mean_or_none(s.get("storage_percent_of_backbone") for s in storage),
            "storage_bytes": mean_or_none(s.get("storage_bytes") for s in storage),
            "storage_bytes_with_head": mean_or_none(s.get("storage_bytes_with_head") for s in storage),
            "file_bytes": mean_or_none(s.get("file_bytes") for s in storage),
            "ratio_to_plain_petl": mean_or_none(s.get("storage_ratio_to_plain_petl") for s in storage),
            "train_seconds": mean_or_none(r.get("train_seconds") for r in members),
            "epochs": mean_or_none(r.get("epochs_run") for r in members),
        }
        rows.append(row)
    return rows


def kept_bytes(run: dict, with_head: bool = False) -> float | None:
    """The bytes a task keeps, without or with its head: the checkpoint's files (`file_bytes`, else `storage_bytes`),
    for a PEFT tuner the files PEFT saves with its least-storing options; None without storage figures."""
    storage = run.get("storage") or {}
    suffix = "_with_head" if with_head else ""
    key = ("storage_bytes" if run["method"] == "peft" else "file_bytes") + suffix
    return storage.get(key, storage.get(f"storage_bytes{suffix}"))


def mean_or_none(values: Iterable) -> float | None:
    values = [float(v) for v in values if v is not None]
    return statistics.fmean(values) if values else None
