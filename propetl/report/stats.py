"""Paired statistics by seed (95% t-interval): ProPETL − PETL, PEFT − ours, learned − random/none masks."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from typing import Any

from scipy import stats as scipy_stats

from propetl.data.metrics import task_numbers
from propetl.report.runs import (
    group_runs,
    key_order,
    mask_kind,
    prototype_title,
    run_metric,
    single_task_runs,
    trained_prototype,
)


def sparsity_sweep(runs: list[dict]) -> dict[tuple[str, str, str], dict[float, list[dict]]]:
    """(model, task, prototype) -> {sparsity: its learned-mask ProPETL runs} where several ran (pooled runs)."""
    series: dict[tuple[str, str, str], dict[float, list[dict]]] = {}
    learned = lambda r: trained_prototype(r) and mask_kind(r) == "learned"
    for (*key, sparsity), members in group_runs(runs, learned, ("model", "task", "prototype", "mask_sparsity")).items():
        series.setdefault(tuple(key), {})[sparsity] = members
    return {key: points for key, points in series.items() if len(points) > 1}


def mask_ablation(runs: list[dict]) -> dict[tuple, dict[str, list[dict]]]:
    """(model, task, prototype, sparsity) with random or no masks run -> {learned|random|none: runs} (pooled runs)."""
    cells: dict[tuple, dict] = defaultdict(dict)
    fields = ("model", "task", "prototype", "mask_sparsity", "mask_kind")
    for (*key, kind), members in group_runs(runs, trained_prototype, fields).items():
        cells[tuple(key)][kind or "learned"] = members
    return {key: kinds for key, kinds in cells.items() if "random" in kinds or "none" in kinds}


def paired_interval(differences: list[float], confidence: float = 0.95) -> dict:
    """The mean of paired differences and its t-interval mean ± t_{(1+confidence)/2, n−1}·sd/√n over the n pairs
    (seeds); n < 2: the mean only (sd, t, the interval and `excludes_zero` None)."""
    n = len(differences)
    out: dict[str, Any] = {"n": n, "mean_diff": statistics.fmean(differences) if n else None}
    out |= dict.fromkeys(("sd_diff", "t_crit", "half_width", "ci_low", "ci_high", "excludes_zero"))
    if n >= 2:
        sd = statistics.stdev(differences)
        t = float(scipy_stats.t.ppf((1 + confidence) / 2, n - 1))
        half = t * sd / math.sqrt(n)
        low, high = out["mean_diff"] - half, out["mean_diff"] + half
        out.update(sd_diff=sd, t_crit=t, half_width=half, ci_low=low, ci_high=high, excludes_zero=low > 0 or high < 0)
    return out


def paired_by_seed(a_runs: list[dict], b_runs: list[dict], metric: str = "glue_score") -> dict:
    """A − B (x100) paired by seed over the seeds both sides have: paired_interval, the seeds, both means."""
    a = {r["seed"]: v for r in a_runs if (v := run_metric(r, metric)) is not None}
    b = {r["seed"]: v for r in b_runs if (v := run_metric(r, metric)) is not None}
    seeds = sorted(set(a) & set(b))
    return {
        **paired_interval([a[s] - b[s] for s in seeds]),
        "seeds": seeds,
        "mean_a": statistics.fmean(a[s] for s in seeds) if seeds else None,
        "mean_b": statistics.fmean(b[s] for s in seeds) if seeds else None,
    }


def paired_comparisons(table_runs: list[dict], pooled_runs: list[dict]) -> list[dict]:
    """Every paired comparison, one dict per (comparison, model, task, prototype, sparsity, metric), the
    metric the GLUE score and, for tasks of two numbers, each of them:
      ProPETL − PETL             Table 1's ProPETL runs (learned masks) against plain PETL, same prototype;
      <P> (HF PEFT) − <P>        HF PEFT's implementation (method peft) against ours (method petl);
      learned − random / none    the mask ablation at its sparsity, the learned runs pooled from table1."""
    single = single_task_runs(table_runs)
    plain = group_runs(single, lambda r: r["method"] == "petl", ("model", "task", "prototype"))
    learned = lambda r: trained_prototype(r) and mask_kind(r) == "learned"
    pro = group_runs(single, learned, ("model", "task", "prototype", "mask_sparsity"))
    specs: list[tuple[int, str, tuple, list[dict] | None, list[dict] | None]]
    specs = [(0, "ProPETL − PETL", key, runs, plain.get(key[:3])) for key, runs in pro.items()]
    for key, runs in group_runs(single, lambda r: r["method"] == "peft", ("model", "task", "prototype")).items():
        title = prototype_title(key[2])
        specs.append((1, f"{title} (HF PEFT) − {title}", (*key, None), runs, plain.get(key)))
    for key, kinds in mask_ablation(single_task_runs(pooled_runs)).items():
        for rank, other in enumerate(("random", "none"), start=2):
            specs.append((rank, f"learned − {other}", key, kinds.get("learned"), kinds.get(other)))
    out = []
    for _, name, (model, task, prototype, sparsity), a, b in sorted(specs, key=lambda s: (s[0], key_order(s[2]))):
        if not a or not b:
            continue
        numbers = task_numbers(task, a[0]["test"])
        for metric in ("glue_score", *(numbers if len(numbers) > 1 else ())):
            result = paired_by_seed(a, b, metric)
            if result["n"]:
                compared = {"comparison": name, "model": model, "task": task, "prototype": prototype}
                out.append({**compared, "mask_sparsity": sparsity, "metric": metric, **result})
    return out
