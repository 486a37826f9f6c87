"""Pack a reproduction's small evidence into one .tar.gz, or unpack one (scripts/device_reproduce.sh).

    python scripts/pack_runs.py pack outputs/reproduce/gpu outputs/tables/gpu out.tar.gz
    python scripts/pack_runs.py unpack out.tar.gz outputs

A lent GPU returns at most 8 files from $OUT, none deeper than two folders, so the runs come back as one
archive: of every finished run (metrics.json) the files that collect_results.py keeps (metrics.json,
predictions.npz, train.log, the overrides, the composed config, the checkpoint's JSON and mask bits), under their sweep
folder names, as reproduce/<profile>/<experiment>/<run>/...; the finished-part markers
(reproduce/<profile>/.parts/); and the tables as tables/<profile>/. Unpacked into outputs/, the runs are
where `make results PROFILE=<profile>` and a later reproduction (which skips them) look for them.
"""
from __future__ import annotations

import argparse
import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from collect_results import KEPT, kept_checkpoint_files  # noqa: E402

from propetl import report  # noqa: E402


def evidence(runs: Path) -> list[Path]:
    """The kept files of every finished run under `runs`, and the part markers."""
    files = sorted((runs / ".parts").glob("*.done"))
    for run in sorted(p.parent for p in report.find_metrics([runs])):
        files += [run / name for name in KEPT if (run / name).is_file()] + kept_checkpoint_files(run)
    return files


def pack(runs: Path, tables: Path | None, archive: Path) -> int:
    """Write `archive` (via a temporary name); return the number of finished runs in it."""
    files = evidence(runs)
    partial = archive.with_name(archive.name + ".partial")
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(partial, "w:gz") as tar:
        for file in files:
            tar.add(file, arcname=f"reproduce/{runs.name}/{file.relative_to(runs)}")
        for file in sorted(tables.iterdir()) if tables and tables.is_dir() else []:
            if file.is_file():
                tar.add(file, arcname=f"tables/{runs.name}/{file.name}")
    partial.replace(archive)
    return sum(file.name == "metrics.json" for file in files)


def unpack(archive: Path, into: Path) -> int:
    """Extract `archive` under `into` (plain files only, no path outside it); return its metrics.json count."""
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
        return sum(Path(name).name == "metrics.json" for name in tar.getnames())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    packing = commands.add_parser("pack", help="runs folder (<root>/<profile>), tables folder, archive")
    packing.add_argument("runs", type=Path)
    packing.add_argument("tables", type=Path)
    packing.add_argument("archive", type=Path)
    unpacking = commands.add_parser("unpack", help="archive, folder to extract into (outputs)")
    unpacking.add_argument("archive", type=Path)
    unpacking.add_argument("into", type=Path)
    args = parser.parse_args(argv)
    if args.command == "pack":
        count = pack(args.runs, args.tables, args.archive)
        print(f"pack_runs: {count} finished runs of {args.runs} -> {args.archive} ({args.archive.stat().st_size:,} bytes)")
    else:
        count = unpack(args.archive, args.into)
        print(f"pack_runs: {count} finished runs from {args.archive} -> {args.into}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
