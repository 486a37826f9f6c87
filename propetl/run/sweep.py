"""A sweep (`propetl-train -m ...`) finishes every job: a job's one-line error goes to its folder (error.txt) and to the
sweep's `failed_jobs.jsonl` (found by the joblib launcher's processes through the environment). At the end
SweepSummary (a Hydra callback) writes `sweep_summary.json`, prints the failed jobs, and propetl-train exits with
their number."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from hydra.experimental.callback import Callback

FAILURES_ENV = "PROPETL_SWEEP_FAILURES"
FAILURES_FILE, SUMMARY_FILE = "failed_jobs.jsonl", "sweep_summary.json"
_failed_jobs = 0  # this process's sweep: how many jobs failed (set at its end)


def in_sweep() -> bool:
    """Whether this process runs a job of a -m sweep."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def sweep_dir() -> Path | None:
    """The running -m sweep's folder (hydra.sweep.dir), None outside a sweep."""
    from hydra.core.hydra_config import HydraConfig

    return Path(str(HydraConfig.get().sweep.dir)) if in_sweep() else None


def failed(job_dir: Path, message: str) -> None:
    """A job of the running sweep failed with `message` (one line)."""
    path = os.environ.get(FAILURES_ENV)
    if not path:
        return
    line = json.dumps({"job": str(job_dir), "error": message}) + "\n"
    with open(path, "a") as f:  # one short write in append mode: jobs in parallel do not interleave
        f.write(line)


def failures_of_this_process() -> int:
    return _failed_jobs


class SweepSummary(Callback):
    def on_multirun_start(self, config, **kwargs) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / FAILURES_FILE).write_text("")  # this sweep's failures only
        os.environ[FAILURES_ENV] = str((sweep_dir / FAILURES_FILE).resolve())

    def on_multirun_end(self, config, **kwargs) -> None:
        global _failed_jobs
        path = Path(os.environ.pop(FAILURES_ENV, Path(str(config.hydra.sweep.dir)) / FAILURES_FILE))
        failures = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
        summary = {"failed": len(failures), "failures": failures}
        from propetl.storage.files import atomic_write_text

        atomic_write_text(path.with_name(SUMMARY_FILE), json.dumps(summary, indent=1) + "\n")
        _failed_jobs = len(failures)
        if failures:
            lines = "".join(f"\n  {f['job']}: {f['error']}" for f in failures)
            where = f"the others ran; {path.with_name(SUMMARY_FILE)}"
            print(f"propetl-train: {len(failures)} job(s) of the sweep failed ({where}):{lines}", file=sys.stderr)
