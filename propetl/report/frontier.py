"""The storage–accuracy frontier: per task, every table row's stored bytes per task against its GLUE score.
A point (one row, one task) is Pareto-optimal when no other point stores at most as many bytes with at least as high a
score, better in one. Each point's paired difference to the reference row has its 95% t-interval."""

from __future__ import annotations

from pathlib import Path

from propetl.data.tasks import in_task_order, task_title
from propetl.report.runs import kept_bytes, mean_or_none, row_groups, run_score, score_stats, trivial_runs
from propetl.report.stats import paired_by_seed
from propetl.report.tables import _bytes

REFERENCE = "ProPETL-Adapter"  # the paper's headline prototype: every point's paired difference is to it
LORA = "LoRA"  # the storage every ratio is to: plain LoRA, the best-known PETL method


def frontier_points(runs: list[dict]) -> dict[str, list[dict]]:
    """task -> its points, cheapest first: row, bytes, score, runs, `pareto`, ratio to LoRA, Δ to the reference."""
    out: dict[str, list[dict]] = {}
    groups = row_groups([r for r in runs if not r.get("computed") and not r["method"].endswith("-multitask")])
    for task in in_task_order(r["task"] for members in groups.values() for r in members):
        points = []
        for label, members in groups.items():
            task_runs = [r for r in members if r["task"] == task and run_score(r) is not None]
            stored = mean_or_none(kept_bytes(r) for r in task_runs)
            if not task_runs or stored is None:
                continue
            with_head = mean_or_none(kept_bytes(r, with_head=True) for r in task_runs)
            point = {"label": label, "method": task_runs[0]["method"], "prototype": task_runs[0]["prototype"]}
            point |= {"bytes": stored, "bytes_with_head": with_head, "score": score_stats(task_runs)}
            points.append(point | {"runs": task_runs})
        if not points:
            continue
        points.sort(key=lambda p: (p["bytes"], -p["score"]["mean"]))
        optimal = pareto([(p["bytes"], p["score"]["mean"]) for p in points])
        lora = next((p["bytes"] for p in points if p["label"] == LORA), None)
        propetl = [p for p in points if p["label"].startswith("ProPETL-")]
        reference = next((p for p in propetl if p["label"] == REFERENCE), propetl[0] if propetl else None)
        for i, point in enumerate(points):
            point["pareto"] = i in optimal
            point["ratio_to_lora"] = point["bytes"] / lora if lora else None
            point["reference"] = reference["label"] if reference else None
            point["vs_reference"] = (
                paired_by_seed(point["runs"], reference["runs"]) if reference and point is not reference else None
            )
        out[task] = points
    return out


def pareto(points: list[tuple[float, float]]) -> set[int]:
    """Indices of the (bytes, score) points no other has at most the bytes and at least the score of, better in one."""
    return {
        i
        for i, (b, s) in enumerate(points)
        if not any(b2 <= b and s2 >= s and (b2 < b or s2 > s) for j, (b2, s2) in enumerate(points) if j != i)
    }


def _difference(result: dict | None) -> str:
    """A point's paired difference to the reference (none for the reference, or in a task without one)."""
    if result is None:
        return "(reference)"
    if not result["n"]:
        return "–"
    if result["ci_low"] is None:
        return f"{result['mean_diff']:+.2f} (n={result['n']})"
    return f"{result['mean_diff']:+.2f} [{result['ci_low']:+.2f}, {result['ci_high']:+.2f}] (n={result['n']})"


def frontier_table(points: dict[str, list[dict]]) -> str:
    """Markdown: per task, every point cheapest first; '◆' marks the Pareto-optimal ones."""
    text = ""
    for task, task_points in points.items():
        reference = task_points[0]["reference"]
        text += (
            f"\n### {task_title(task)}\n\n| Method | bytes/task | with head | ratio to LoRA | GLUE score "
            f"| Δ to {reference or 'ProPETL'} [95% CI] | Pareto |\n|---|---|---|---|---|---|---|\n"
        )
        for p in task_points:
            score = p["score"]
            ratio = "–" if p["ratio_to_lora"] is None else f"{p['ratio_to_lora']:.3f}"
            spread = f"±{score['std']:.2f}" if score["n"] > 1 else ""
            text += (
                f"| {p['label']} | {_bytes(p['bytes'])} | {_bytes(p['bytes_with_head'])} | {ratio} | "
                f"{score['mean']:.2f}{spread} (n={score['n']}) | {_difference(p['vs_reference'])} | "
                f"{'◆' if p['pareto'] else ''} |\n"
            )
    return text


def plot_frontier(points: dict[str, list[dict]], runs: list[dict], path: Path) -> Path | None:
    """Per task: GLUE score (mean ± std over seeds) against stored bytes (log x, head excluded), a labelled point per
    method, the Pareto-optimal points joined, the trivial baseline dashed (the y range is the points')."""
    from propetl.report.plots import METHOD_MARKERS, _colour, _finish, _save, _task_axes

    if not points:
        return None
    trivial = {r["task"]: r for r in trivial_runs(runs)}
    fig, axes = _task_axes(list(points), 6.0)
    for task, ax in axes.items():
        for p in points[task]:
            frozen = any(r.get("prototype_frozen") for r in p["runs"])  # a frozen prototype: a star, not a dot
            score, label = p["score"], f"{p['label']} (n={p['score']['n']})"
            marker = "*" if frozen else METHOD_MARKERS.get(p["method"], "x")
            style = {"marker": marker, "markersize": 10 if frozen else 6, "color": _colour(p["prototype"], p["method"])}
            style |= {"capsize": 3, "ls": "none", "label": label}
            ax.errorbar(p["bytes"], score["mean"], score["std"], **style)
            ax.annotate(p["label"], (p["bytes"], score["mean"]), textcoords="offset points", xytext=(4, -9), fontsize=6)
        front = [(p["bytes"], p["score"]["mean"]) for p in points[task] if p["pareto"]]
        ax.plot(*zip(*front), color="black", lw=1, alpha=0.6, label="Pareto front (mean score)")
        ax.set_xscale("log")
        _finish(ax, task, "bytes stored per task (without head, log)", trivial.get(task))
        low = min(p["score"]["mean"] - p["score"]["std"] for p in points[task])
        high = max(p["score"]["mean"] + p["score"]["std"] for p in points[task])
        margin = max(1.0, 0.1 * (high - low))
        ax.set_ylim(low - margin, high + margin)  # the points, not a far trivial baseline (the legend has it)
    return _save(fig, path)
