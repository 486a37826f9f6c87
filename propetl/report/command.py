"""propetl-report: the tables, paired intervals and plots of any set of runs (`make tables`, and every -m sweep's end).

    propetl-report outputs/multirun/2026-12-04_10-00-00            # -> <that folder>/report/
    propetl-report results/cpu/runs --out results/cpu --title "cpu profile"
    propetl-report outputs/multirun/mine --config-dir my_conf        # my_conf/task/*.yaml: your tasks' titles

Reads every metrics.json under the given folders, one run per (task, method, prototype, mask kind, mask sparsity,
frozen prototype, seed), table1's copy first. Writes
  jobs.md     one line a run: its folder (a sweep's job names its overrides), scores, bytes a task keeps, best epoch;
  runs.csv    one line a run, every figure;
  table.md    Table 1 (mean ± std over seeds, the trivial baseline row, the paper's ProPETL rows), Table 2 (T5
              multi-task GLUE runs: Fine-tune, Adapter, ProPETL-Adapter; no paper rows), paired differences
              over seeds with 95% t-intervals (ProPETL − PETL, HF PEFT − ours, learned − random/none masks), the
              sparsity sweep, the mask ablation and the storage–accuracy frontier;
  paired.csv  the paired differences, machine-readable;  rows.json  Table 1's rows;
  PNG plots   metric against storage, the frontier, the sparsity sweep, the mask ablation, one run's mask distances.
Prints jobs.md, then where each file went. Exit 2 with one line when no run is found or a task's `report` block is bad."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from hydra.experimental.callback import Callback

from propetl.configs import add_config_dir_argument, config_dirs

REPORT_DIR = "report"  # the default --out: <first folder>/report
SWEEP_REPORT_ENV = "PROPETL_SWEEP_REPORT"  # "0": no report at the end of a -m sweep


def report_folder(roots: list[Path]) -> Path:
    first = Path(roots[0])
    return (first if first.is_dir() else first.parent) / REPORT_DIR


class SweepReport(Callback):
    """A Hydra callback (conf/hydra/default.yaml): at the end of a -m sweep, its report in <sweep>/report/."""

    def on_multirun_end(self, config, **kwargs) -> None:
        if os.environ.get(SWEEP_REPORT_ENV, "1") != "0":  # scripts/reproduce.py builds its tables once
            report_sweep(Path(str(config.hydra.sweep.dir)))


def report_sweep(folder: Path) -> None:
    """propetl-report on a finished sweep; a report that cannot be built is one line on stderr, not a failed sweep."""
    from propetl import report

    try:
        written = report.build([folder], report_folder([folder]), f"sweep {folder}")
    except Exception as error:  # noqa: BLE001 (the sweep's results stand without their report)
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"propetl-train: no report of the sweep ({reason})", file=sys.stderr)
        return
    print(f"\nThe sweep's jobs ({written['table'].parent}: table.md, runs.csv, plots):\n{written['jobs'].read_text()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="propetl-report",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[2:]),
    )
    parser.add_argument("roots", nargs="+", type=Path, help="folders (or metrics.json files) searched for runs")
    out_help = f"folder for the tables and plots (default: <first folder>/{REPORT_DIR})"
    parser.add_argument("--out", type=Path, help=out_help)
    parser.add_argument("--title", default="", help="heading of table.md")
    add_config_dir_argument(parser)
    args = parser.parse_args(argv)
    out = args.out or report_folder(args.roots)
    from propetl import report  # after argparse: --help needs no matplotlib or scipy

    try:
        with config_dirs(args.config_dir):  # a user's task yamls: their titles, order and numbers
            written = report.build(args.roots, out, args.title)
    except ValueError as error:
        print(f"propetl-report: {error}", file=sys.stderr)
        return 2
    print(written["jobs"].read_text())
    for name, path in written.items():
        print(f"  {name:18s} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
