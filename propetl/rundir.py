"""A run directory's owner and record. Owner: one process at a time. `claim` takes an exclusive flock on
`<run dir>/.propetl.lock` (holding the owner's pid) for the whole run; a second run into the directory is refused with
one line naming that pid. The kernel drops the lock when its process dies: a SIGKILLed run never blocks its resume.
Record: `.hydra/config.yaml` and `.hydra/overrides.yaml` (Hydra's names and format; Hydra itself writes nothing there,
`hydra.output_subdir: null`) are written by propetl, atomically, only once the run owns the directory and is known to be
new or a continuation of the same config: a finished or running run's record is never rewritten. A finished run
(metrics.json) is skipped only if its recorded config has the same fingerprint as the command's (resume.fingerprint,
what a resume must match too).
"""
from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager
from pathlib import Path

from omegaconf import OmegaConf

from propetl.resume import fingerprint, fingerprint_differences
from propetl.files import write_folder_atomically

LOCK_FILE, RECORD_DIR, METRICS_FILE = ".propetl.lock", ".hydra", "metrics.json"


class RunDirectoryInUse(Exception):
    """Another live process owns the run directory (one line, naming its pid)."""


class RunDirectoryError(Exception):
    """A run directory whose contents this command must not touch or cannot read (one line)."""


def _holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


@contextmanager
def claim(run_dir: Path, enabled: bool = True):
    """Own `run_dir` (created if missing) during the block; enabled=False: a no-op (a data-parallel run's ranks > 0)."""
    if not enabled:
        yield
        return
    run_dir = Path(run_dir)
    path = run_dir / LOCK_FILE
    while True:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise RunDirectoryError(f"cannot write in {run_dir}: {error.strerror or error}; choose another "
                                    f"hydra.run.dir, or make it writable") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(handle)
            raise RunDirectoryInUse(f"{run_dir} is in use by another run (pid {_holder(path)}); wait for it to "
                                    f"end, or choose another hydra.run.dir") from None
        try:
            if os.stat(path).st_ino == os.fstat(handle).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(handle)               # its last owner removed the file meanwhile: lock the one there now
    try:
        os.ftruncate(handle, 0)
        os.write(handle, f"{os.getpid()}\n".encode())
        yield
    finally:
        if path.exists() and os.stat(path).st_ino == os.fstat(handle).st_ino:
            path.unlink()
        os.close(handle)


def read_metrics(run_dir: Path) -> dict:
    path = Path(run_dir) / METRICS_FILE
    try:
        metrics = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RunDirectoryError(f"cannot read {path}: {error}; trainer.resume=false runs it again") from None
    if not isinstance(metrics, dict):
        raise RunDirectoryError(f"{path} is not a metrics object; trainer.resume=false runs it again")
    return metrics


def recorded_config(run_dir: Path):
    """The run's `.hydra/config.yaml` (None if it has none)."""
    path = Path(run_dir) / RECORD_DIR / "config.yaml"
    if not path.exists():
        return None
    try:
        config = OmegaConf.load(path)
    except Exception as error:     # noqa: BLE001  (yaml and OmegaConf errors have no common type)
        raise RunDirectoryError(f"cannot read {path}: {str(error).splitlines()[0]}") from None
    if not OmegaConf.is_dict(config):
        raise RunDirectoryError(f"{path} is not a config")
    return config


def finished_run(run_dir: Path, cfg) -> dict | None:
    """metrics.json of a finished run of this config; None if not finished. A finished run of another config (or one
    without a record to tell) is refused with one line naming the differing keys."""
    run_dir = Path(run_dir)
    if not (run_dir / METRICS_FILE).exists():
        return None
    metrics = read_metrics(run_dir)
    recorded = recorded_config(run_dir)
    if recorded is None:
        raise RunDirectoryError(f"{run_dir} is finished but has no {RECORD_DIR}/config.yaml to compare this command's "
                                f"config with; choose another hydra.run.dir, or trainer.resume=false to run it again")
    present = {key: value for key, value in fingerprint(recorded).items()
               if OmegaConf.select(recorded, key, default=KeyError) is not KeyError}
    differences = fingerprint_differences(present, fingerprint(cfg))
    if differences:
        named = "; ".join(f"{key}={before!r} there, {now!r} here" for key, before, now in differences)
        raise RunDirectoryError(f"{run_dir} is a finished run of another config ({named}); choose another "
                                f"hydra.run.dir, or trainer.resume=false to replace it")
    return metrics


def command_overrides() -> list[str] | None:
    """The command line's overrides when Hydra runs the job (what Hydra would write to overrides.yaml)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else None


def write_record(run_dir: Path, cfg, overrides: list[str] | None) -> None:
    """`.hydra/config.yaml` (and `overrides.yaml` when known) in Hydra's format, the folder swapped in whole."""
    def build(folder: Path) -> None:
        OmegaConf.save(cfg, folder / "config.yaml")
        if overrides is not None:
            OmegaConf.save(OmegaConf.create(list(overrides)), folder / "overrides.yaml")
    write_folder_atomically(Path(run_dir) / RECORD_DIR, build)
