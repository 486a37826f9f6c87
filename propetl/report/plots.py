"""Plots (matplotlib, Agg): metric vs storage, the sparsity sweep, the mask ablation, layer-mask Hamming distances."""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np

from propetl.data.tasks import in_task_order, paper_rows, task_title
from propetl.report.runs import (
    MASK_KINDS,
    PAPER_MODEL,
    PAPER_STORAGE_PERCENT,
    PROTOTYPE_TITLES,
    group_runs,
    prototype_title,
    run_score,
    score_stats,
    trivial_runs,
)
from propetl.report.stats import mask_ablation, sparsity_sweep
from propetl.report.tables import model_prefix, sparsity_text
from propetl.storage import mask_coding

PROTOTYPE_COLOURS = {"adapter": "tab:blue", "lora": "tab:orange", "prefix": "tab:green"}
METHOD_MARKERS = {"finetune": "^", "petl": "s", "peft": "D", "propetl": "o", "petl-multitask": "<"}
METHOD_MARKERS |= {"propetl-multitask": "v"}


def _colour(prototype, method: str = "") -> str:
    return "black" if method == "finetune" else PROTOTYPE_COLOURS.get(prototype, "tab:purple")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _task_axes(tasks: list[str], height: float):
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.4 * len(tasks), height), squeeze=False)
    return fig, dict(zip(tasks, axes[0]))


def _points(ax, cells: dict[float, dict], colour: str, label: str, **style) -> None:
    """Means ± std at x (cells: x -> cell_stats), n in the legend; each point's n beside it when n varies."""
    ns = sorted({c["n"] for c in cells.values()})
    n_text = str(ns[0]) if len(ns) == 1 else f"{ns[0]}–{ns[-1]}"
    means, stds = [c["mean"] for c in cells.values()], [c["std"] for c in cells.values()]
    ax.errorbar(list(cells), means, yerr=stds, capsize=3, color=colour, label=f"{label} (n={n_text})", **style)
    for x, c in cells.items() if len(ns) > 1 else ():
        ax.annotate(f"n={c['n']}", (x, c["mean"]), textcoords="offset points", xytext=(4, 4), fontsize=6, color=colour)


def _trivial_line(ax, score: float, rule: str) -> None:
    """The trivial baseline's score as a grey dashed line, its rule's first words in the legend."""
    ax.axhline(score, ls="--", lw=1, color="grey", label=f"trivial baseline ({rule.split(' (')[0]})")


def _finish(ax, task: str, xlabel: str, trivial: dict | None = None) -> None:
    """Labels, grid and legend; `trivial` (a pseudo-run of trivial_runs) first drawn as a grey dashed line."""
    if trivial and (score := run_score(trivial)) is not None:
        _trivial_line(ax, score, trivial["rule"])
    ax.set(xlabel=xlabel, ylabel=f"{task_title(task)} GLUE score (x100, mean ± std)", title=task_title(task))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6.5, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2)


def plot_metric_vs_storage(rows: list[dict], path: Path) -> Path | None:
    """Per task: the GLUE score x100 (mean ± std over seeds) against the % of the backbone stored (log x); a colour per
    prototype, a marker per method, the trivial baseline dashed, the paper's ProPETL points hollow stars."""
    tasks = in_task_order(t for row in rows if not row.get("computed") for t, score in row["scores"].items() if score)
    if not tasks:
        return None
    fig, axes = _task_axes(tasks, 6.0)
    titles = {title: prototype for prototype, title in PROTOTYPE_TITLES.items()}
    for task, ax in axes.items():
        for row in rows:
            score = row["scores"].get(task)
            if not score or row["percent_storage"] is None or row.get("computed"):
                continue
            method, label = row["method"], f"{row['label']} (n={score['n']})"
            face = "none" if method == "propetl" and " (" in row["label"] else None  # a variant: hollow
            style = {"marker": METHOD_MARKERS.get(method, "x"), "color": _colour(row["prototype"], method), "mfc": face}
            ax.errorbar(row["percent_storage"], score["mean"], score["std"], capsize=3, ls="none", label=label, **style)
        for row in rows:
            if row.get("computed") and row["scores"].get(task):
                _trivial_line(ax, row["scores"][task]["mean"], row["rules"][task])
        for label, paper in paper_rows().items():
            if isinstance(numbers := paper.get(task), list):
                colour = PROTOTYPE_COLOURS.get(titles.get(label.split("-", 1)[1], ""), "grey")
                star = {"ls": "none", "marker": "*", "ms": 12, "mfc": "none", "color": colour}
                label = f"{label} (paper, {PAPER_MODEL})"
                ax.plot(PAPER_STORAGE_PERCENT, statistics.fmean(numbers), label=label, **star)
        ax.set_xscale("log")
        _finish(ax, task, "% of the backbone stored per task (without head, log)")
    return _save(fig, path)


def plot_sparsity_sweep(runs: list[dict], path: Path) -> Path | None:
    """Per task: ProPETL's GLUE score (mean ± std over seeds) against mask sparsity, a line per prototype, plain PETL's
    mean a dashed line of its colour, the trivial baseline grey. Give it the pooled runs; None without a sweep."""
    series = sparsity_sweep(runs)
    if not series:
        return None
    plain = group_runs(runs, lambda r: r["method"] == "petl", ("model", "task", "prototype"))
    trivial = {r["task"]: r for r in trivial_runs(runs)}
    models = {key[0] for key in series}
    fig, axes = _task_axes(in_task_order(key[1] for key in series), 5.2)
    for (model, task, prototype), points in series.items():
        ax, colour, title = axes[task], _colour(prototype), prototype_title(prototype)
        prefix = model_prefix(model, models)
        cells = {x: cell for x, members in points.items() if x is not None and (cell := score_stats(members))}
        _points(ax, cells, colour, f"{prefix}ProPETL-{title}", marker="o")
        if reference := score_stats(plain.get((model, task, prototype))):
            label = f"{prefix}{title}, plain PETL mean (n={reference['n']})"
            ax.axhline(reference["mean"], ls="--", lw=1.2, color=colour, label=label)
    for task, ax in axes.items():
        _finish(ax, task, "mask sparsity (fraction of zeros)", trivial.get(task))
    return _save(fig, path)


def plot_mask_ablation(runs: list[dict], path: Path) -> Path | None:
    """Per task: ProPETL's GLUE score with learned, random and no masks at one sparsity (pooled runs; None without)."""
    cells = mask_ablation(runs)
    if not cells:
        return None
    trivial = {r["task"]: r for r in trivial_runs(runs)}
    models = {key[0] for key in cells}
    fig, axes = _task_axes(in_task_order(key[1] for key in cells), 5.2)
    for task, ax in axes.items():
        keys = [key for key in cells if key[1] == task]
        for i, (model, _, prototype, sparsity) in enumerate(keys):
            kinds = cells[(model, task, prototype, sparsity)]
            points = {
                x + 0.1 * (i - (len(keys) - 1) / 2): cell
                for x, kind in enumerate(MASK_KINDS)
                if (cell := score_stats(kinds.get(kind)))
            }
            label = f"{model_prefix(model, models)}ProPETL-{prototype_title(prototype)}, s={sparsity_text(sparsity)}"
            _points(ax, points, _colour(prototype), label, fmt="o")
        ax.set_xticks(
            range(len(MASK_KINDS)), [f"{kind} masks" if kind != "none" else "no masks" for kind in MASK_KINDS]
        )
        ax.set_xlim(-0.5, len(MASK_KINDS) - 0.5)
        _finish(ax, task, "masks over the prototype", trivial.get(task))
    return _save(fig, path)


def layer_masks(checkpoint_dir: Path) -> np.ndarray:
    """[L, entries] 0/1: every mask tensor of a checkpoint decoded (either mask coding), one row per layer."""
    decoded = mask_coding.read_file(mask_coding.layer_masks_file(checkpoint_dir))
    return np.concatenate([decoded[name].reshape(decoded[name].shape[0], -1) for name in sorted(decoded)], axis=1)


def pairwise_hamming(masks: np.ndarray) -> np.ndarray:
    """[L, *shape] binary masks -> [L, L] fraction of entries where two masks differ."""
    flat = np.asarray(masks, dtype=np.float64).reshape(len(masks), -1)
    ones = flat.sum(axis=1)
    return (ones[:, None] + ones[None, :] - 2 * flat @ flat.T) / flat.shape[1]


def layer_mask_hamming(checkpoint_dir: Path) -> np.ndarray:
    """[L, L] fraction of mask entries where two layers differ, over every mask tensor of a checkpoint."""
    return pairwise_hamming(layer_masks(checkpoint_dir))


def plot_mask_hamming(checkpoint_dir: Path, path: Path, title: str = "") -> Path:
    """Heat map of the Hamming distances between a run's layer masks; red: independent random masks' 2·d·(1−d)."""
    flat = layer_masks(checkpoint_dir)
    distance = pairwise_hamming(flat)
    density = float(flat.mean())
    independent = 2 * density * (1 - density)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 4.8))
    image = ax.imshow(distance, cmap="viridis", vmin=0, vmax=max(float(distance.max()), independent * 1.05) or 1.0)
    for i in range(distance.shape[0]):
        for j in range(distance.shape[1]):
            ax.text(j, i, f"{distance[i, j]:.2f}", ha="center", va="center", fontsize=7, color="w")
    ax.set(xlabel="layer", ylabel="layer")
    note = f"\nred: independent random masks of density d={density:.3f}, 2d(1−d)={independent:.3f}"
    ax.set_title((title or "Hamming distance between layer masks") + note, fontsize=8)
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
