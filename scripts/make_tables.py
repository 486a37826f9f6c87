"""Aggregate finished runs into tables and plots (`make tables`).

    python scripts/make_tables.py outputs/reproduce/cpu --out outputs/tables/cpu
    python scripts/make_tables.py results/cpu/runs --out results/cpu --title "cpu profile"

Reads every metrics.json under the given folders; writes runs.csv (one line a run), table.md (the
paper's Table 1 shape, mean ± std over seeds, the paper's ProPETL rows beside ours, ProPETL − PETL
differences), rows.json, and PNG plots: metric against storage per task, the sparsity sweep (when
there is one), and the Hamming distances between one run's layer masks (when a checkpoint is there).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from propetl import report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("roots", nargs="+", type=Path, help="folders searched for metrics.json")
    parser.add_argument("--out", type=Path, required=True, help="folder for runs.csv, table.md and the plots")
    parser.add_argument("--title", default="", help="heading of table.md")
    args = parser.parse_args(argv)
    try:
        written = report.build(args.roots, args.out, args.title)
    except ValueError as error:
        print(f"make_tables: {error}", file=sys.stderr)
        return 2
    print((args.out / "table.md").read_text())
    for name, path in written.items():
        print(f"  {name:18s} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
