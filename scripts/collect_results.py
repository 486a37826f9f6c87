"""Copy the small evidence of a reproduction into results/<profile>/ and build its tables there (`make results`).

    python scripts/collect_results.py --profile cpu

From every finished run under outputs/reproduce/<profile>/<experiment>/<run>/ it keeps metrics.json,
predictions.npz (each task's test predictions and labels, where the run kept them), train.log, the
command-line overrides, the composed config and, of the checkpoint, only the JSON descriptions and the
bit-packed masks (kilobytes; the prototype, PETL weights and heads are left out). Run folders are
renamed from Hydra's `key=value,key=value` to `key-value_key-value` (under their experiment's folder, which
with .hydra/config.yaml tells the report table1's runs from the sweep's and the ablation's). Beside runs/ go
runs.csv, table.md, paired.csv, rows.json and the plots (metric_vs_storage, sparsity_sweep, mask_ablation,
mask_hamming: as propetl-report writes them). results/<profile>/ is built whole in a
temporary folder and then swapped in: it is either the old one or the complete new one.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from propetl import report
from propetl.storage.files import write_folder_atomically

REPO = Path(__file__).resolve().parents[1]
KEPT = ("metrics.json", "predictions.npz", "train.log", ".hydra/overrides.yaml", ".hydra/config.yaml")


def kept_checkpoint_files(run: Path) -> list[Path]:
    """The checkpoint's JSON descriptions and mask bits: what the Hamming plot and a reader need."""
    checkpoint = run / "checkpoint"
    if not checkpoint.is_dir():
        return []
    return sorted(p for p in checkpoint.rglob("*")
                  if p.is_file() and (p.suffix == ".json" or (p.suffix == ".safetensors" and "mask" in p.name)))


def folder_name(run: Path) -> str:
    return run.name.replace("=", "-").replace(",", "_")


def collect(source: Path, out: Path, title: str) -> int:
    """Replace `out` with runs/ (the kept files of every finished run under `source`) and its tables."""
    finished = [p.parent for p in report.find_metrics([source])]
    if not finished:
        raise ValueError(f"no finished run (metrics.json) under {source}")
    if source in finished:
        raise ValueError(f"{source} is a run folder; give the folder of a reproduction (outputs/reproduce/<profile>)")

    def build(folder: Path) -> None:
        for run in finished:
            target = folder / "runs" / run.parent.relative_to(source) / folder_name(run)
            files = [run / name for name in KEPT if (run / name).is_file()] + kept_checkpoint_files(run)
            for file in files:
                (target / file.relative_to(run)).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(file, target / file.relative_to(run))
        report.build([folder / "runs"], folder, title)

    write_folder_atomically(out, build)
    return len(finished)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--source", type=Path, help="default: outputs/reproduce/<profile>")
    parser.add_argument("--out", type=Path, help="default: results/<profile>")
    args = parser.parse_args(argv)
    source = args.source or REPO / "outputs" / "reproduce" / args.profile
    out = args.out or REPO / "results" / args.profile
    try:
        count = collect(source.resolve(), out.resolve(), f"profile {args.profile}")
    except ValueError as error:
        print(f"collect_results: {error}", file=sys.stderr)
        return 2
    print(f"{count} runs from {source} -> {out / 'runs'}; tables and plots in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
