"""A run directory's owner, its record, and what a run may remove there.
`claim` holds an exclusive flock on `<run dir>/.propetl.lock` for the run: a second run is refused naming the pid.
A run writes only RUN_ENTRIES (other files refused unless run_dir.allow_other_files=true) and removes only what it made.
trainer.resume=false sets old results aside in `.previous/` until the new run finishes (`recover` restores them).
The record (`.hydra/config.yaml`, `.hydra/overrides.yaml`) is written once the run owns the directory; a finished run
is skipped only if its record has the command's fingerprint (run/fingerprint.py)."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from propetl.run import fingerprint as computation
from propetl.storage.files import shown, write_folder_atomically

LOCK_FILE, RECORD_DIR, LOG_FILE = ".propetl.lock", ".hydra", "train.log"
METRICS_FILE, ERROR_FILE = "metrics.json", "error.txt"
PREDICTIONS_FILE = "predictions.npz"  # each task's test predictions and labels (log.write_predictions)
PREVIOUS_DIR = ".previous"  # trainer.resume=false: the old results, until the new run has finished
RESULTS = (METRICS_FILE, PREDICTIONS_FILE, "checkpoint", "resume", RECORD_DIR)  # what a finished or resumable run keeps
RUN_ENTRIES = (*RESULTS, LOCK_FILE, LOG_FILE, ERROR_FILE, "wandb", PREVIOUS_DIR)
EXISTING_DIR_ENV = "PROPETL_EXISTING_RUN_DIR"  # cli.main: the hydra.run.dir given existed before Hydra made it


class RunDirectoryInUse(Exception):
    """Another live process owns the run directory (one line, naming its pid)."""


class RunDirectoryError(Exception):
    """A run directory whose contents this command must not touch or cannot read (one line)."""


def run_written(name: str) -> bool:
    """A name a run writes in its folder: RUN_ENTRIES, or the hidden temporary of one (.metrics.json.x1y2.tmp)."""
    return name in RUN_ENTRIES or any(name.startswith(f".{entry}.") for entry in RUN_ENTRIES)


def other_files(run_dir: Path) -> list[str]:
    """The entries of `run_dir` that no run wrote (sorted; folders with a trailing /)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted(p.name + "/" * p.is_dir() for p in run_dir.iterdir() if not run_written(p.name))


def refuse_other_files(run_dir: Path) -> None:
    """A run folder holding what no run wrote: one line naming it (the run would write beside the user's files)."""
    if found := other_files(run_dir):
        what = f"{Path(run_dir)} holds files a run did not write ({shown(found)})"
        raise RunDirectoryError(
            f"{what}; choose another hydra.run.dir, or run_dir.allow_other_files=true to run beside them (never removed)"
        )


@dataclass
class Claim:
    """What the run found at its claim: whether it made the folder, and the entries already there."""

    run_dir: Path
    made: bool
    before: set[str] = field(default_factory=set)
    set_aside: bool = False  # trainer.resume=false moved the old results to .previous/


def _found_new(run_dir: Path) -> tuple[bool, set[str]]:
    """(made by this run, entries already there). Hydra makes the folder and an empty train.log before the job starts:
    a folder holding only that is new, unless cli.main saw it before Hydra, or it is the working folder (or above it)."""
    entries = {p.name for p in run_dir.iterdir()}
    log = run_dir / LOG_FILE
    hydra_log = LOG_FILE in entries and log.is_file() and log.stat().st_size == 0
    before = entries - ({LOG_FILE} if hydra_log else set())
    resolved = run_dir.resolve()
    existed = os.environ.get(EXISTING_DIR_ENV) == str(resolved) or resolved in (Path.cwd(), *Path.cwd().parents)
    return not before and not existed, before


def _holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


@contextmanager
def claim(run_dir: Path, enabled: bool = True, allow_other_files: bool = False):
    """Own `run_dir` (created if missing) during the block, yielding a Claim (enabled=False: None, for ranks > 0);
    files no run wrote are refused unless allow_other_files."""
    if not enabled:
        yield None
        return
    run_dir = Path(run_dir)
    path = run_dir / LOCK_FILE
    while True:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            made, before = _found_new(run_dir)
            handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            why = error.strerror or error
            raise RunDirectoryError(
                f"cannot write in {run_dir}: {why}; choose another hydra.run.dir, or make it writable"
            ) from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(handle)
            holder = f"another run (pid {_holder(path)})"
            raise RunDirectoryInUse(
                f"{run_dir} is in use by {holder}; wait for it to end, or choose another hydra.run.dir"
            ) from None
        try:
            if os.stat(path).st_ino == os.fstat(handle).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(handle)  # its last owner removed the file meanwhile: lock the one there now
    try:
        if not allow_other_files:
            try:
                refuse_other_files(run_dir)
            except RunDirectoryError:
                if LOG_FILE not in before:  # Hydra's empty log: not left in the user's folder
                    (run_dir / LOG_FILE).unlink(missing_ok=True)
                raise
        os.ftruncate(handle, 0)
        os.write(handle, f"{os.getpid()}\n".encode())
        yield Claim(run_dir, made, before - {LOCK_FILE})
    finally:
        try:  # a folder whose permissions went mid-run: the run's own error stays the one told
            if path.exists() and os.stat(path).st_ino == os.fstat(handle).st_ino:
                path.unlink()
        except OSError:
            pass
        os.close(handle)


# ----------------------------------------------------------------------------- after a failure, trainer.resume=false


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def clean_after_failure(claim: Claim | None) -> None:
    """A failed run puts set-aside results back and, if nothing resumable is left, removes what it made: the folder
    (and its empty parents under ./outputs) if it made the folder, else the run entries it added. Never anything else."""
    if claim is None:
        return
    run_dir = claim.run_dir
    if claim.set_aside:
        put_back(run_dir)
    if not run_dir.is_dir() or any((run_dir / name).exists() for name in (METRICS_FILE, "checkpoint", "resume")):
        return
    added = [p for p in run_dir.iterdir() if run_written(p.name) and p.name not in claim.before and p.name != LOCK_FILE]
    for entry in added:
        _remove(entry)
    if not claim.made or any(p.name != LOCK_FILE for p in run_dir.iterdir()):
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    outputs = (Path.cwd() / "outputs").resolve()
    for parent in run_dir.resolve().parents:  # and the empty folders made for it (outputs/runs/rte/…)
        if parent == outputs or outputs not in parent.parents or any(parent.iterdir()):
            break
        parent.rmdir()


def set_aside(claim: Claim) -> None:
    """trainer.resume=false: the old results go to .previous/ (via a .partial name: `recover` undoes a kill midway);
    a partial replacement's state is dropped, a finished one's results kept instead."""
    run_dir, previous = claim.run_dir, claim.run_dir / PREVIOUS_DIR
    if previous.exists() and (run_dir / METRICS_FILE).exists():
        shutil.rmtree(previous)  # the replacement finished: its results are the ones to keep
    if previous.exists():  # an unfinished replacement: its partial state goes
        for name in ("checkpoint", "resume"):
            _remove(run_dir / name)
        claim.set_aside = True
        return
    present = [name for name in RESULTS if (run_dir / name).exists()]
    if not present:
        return
    partial = run_dir / f"{PREVIOUS_DIR}.partial"
    partial.mkdir(exist_ok=True)
    for name in present:
        os.replace(run_dir / name, partial / name)
    os.replace(partial, previous)
    claim.set_aside = True


def put_back(run_dir: Path) -> None:
    """The set-aside results (a finished or partial .previous/) back in place of the replacement's."""
    for previous in (run_dir / f"{PREVIOUS_DIR}.partial", run_dir / PREVIOUS_DIR):
        if not previous.is_dir():
            continue
        if previous.name == PREVIOUS_DIR:  # (a .partial one was cut off mid-move: what is left in place is old)
            for name in ("checkpoint", "resume", PREDICTIONS_FILE):
                _remove(run_dir / name)
        for entry in previous.iterdir():
            _remove(run_dir / entry.name)
            os.replace(entry, run_dir / entry.name)
        previous.rmdir()


def recover(run_dir: Path) -> None:
    """At a run's start: undo a set-aside cut off by a kill, or one whose replacement died before saving."""
    run_dir = Path(run_dir)
    unsaved = (run_dir / PREVIOUS_DIR).is_dir() and not any((run_dir / n).exists() for n in (METRICS_FILE, "resume"))
    if (run_dir / f"{PREVIOUS_DIR}.partial").is_dir() or unsaved:
        put_back(run_dir)


def forget_previous(run_dir: Path) -> None:
    """The replacement has finished: the results it replaced go."""
    shutil.rmtree(Path(run_dir) / PREVIOUS_DIR, ignore_errors=True)


def record_failure(run_dir: Path, message: str) -> None:
    """A sweep job's one-line failure, kept in its folder (error.txt) for the sweep's summary."""
    from propetl.storage.files import atomic_write_text

    try:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(run_dir) / ERROR_FILE, message + "\n")
    except OSError:
        pass


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
    except Exception as error:  # noqa: BLE001  (yaml and OmegaConf errors have no common type)
        raise RunDirectoryError(f"cannot read {path}: {str(error).splitlines()[0]}") from None
    if not OmegaConf.is_dict(config):
        raise RunDirectoryError(f"{path} is not a config")
    return config


def finished_run(run_dir: Path, current: dict) -> dict | None:
    """metrics.json of a finished run of this fingerprint (`current`), None if not finished; one of another config (or
    without a record) is refused in one line naming the differing keys (keys its record predates are not compared)."""
    run_dir = Path(run_dir)
    if not (run_dir / METRICS_FILE).exists():
        return None
    metrics = read_metrics(run_dir)
    recorded = recorded_config(run_dir)
    if recorded is None:
        what = f"{run_dir} is finished but has no {RECORD_DIR}/config.yaml to compare this command's config with"
        raise RunDirectoryError(f"{what}; choose another hydra.run.dir, or trainer.resume=false to run it again")
    saved = computation.config_part(recorded)
    if isinstance(metrics.get("data_sha256"), str):  # runs before the data's sha256 was kept: their config only
        saved[computation.DATA_KEY] = metrics["data_sha256"]
    if differences := computation.differences(saved, current, ignore_missing=True):
        what = f"{run_dir} is a finished run of another config ({computation.describe(differences)})"
        raise RunDirectoryError(f"{what}; choose another hydra.run.dir, or trainer.resume=false to replace it")
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
