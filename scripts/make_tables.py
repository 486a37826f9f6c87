"""Aggregate finished runs into tables and plots (`make tables`).

    python scripts/make_tables.py outputs/reproduce/cpu --out outputs/tables/cpu
    python scripts/make_tables.py results/cpu/runs --out results/cpu --title "cpu profile"

Reads every metrics.json under the given folders (a run's experiment from its folder, e.g.
<experiment>/<run>/, or its .hydra/config.yaml); one run per (task, method, prototype, mask kind,
mask sparsity, seed), table1's copy first. Writes
  runs.csv    one line a run (every run read);
  table.md    Table 1 (table1's runs: mean ± std over seeds, the computed trivial baseline row, HF PEFT's
              LoRA beside ours, the paper's ProPETL rows), ProPETL − PETL differences, paired differences
              over seeds with 95% t-intervals (ProPETL − PETL, HF PEFT − ours, learned − random/none
              masks), the sparsity sweep and the mask ablation (pooled with table1's runs);
  paired.csv  the paired differences, machine-readable;
  rows.json   Table 1's rows;
  PNG plots   metric against storage per task, the sparsity sweep and the mask ablation (when there are
              some), the Hamming distances between one run's layer masks (when a checkpoint is there).
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
