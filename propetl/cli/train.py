"""propetl-train's command line: the checks before Hydra, Hydra's entry, and what a failed job leaves. Light at
import (Hydra, OmegaConf, the config tree): `--help` and tab completion answer without torch; the training code
(propetl.run.train) is imported when a run starts.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from propetl.cli.command_line import check_command_line
from propetl.configs import CONF_DIR, PRIMARY_CONFIG, ConfigError
from propetl.run import distributed, sweep


def run_owned(cfg: DictConfig, output_dir: Path, is_main: bool = True) -> dict:
    """train(cfg) in `output_dir` owned for the run (rundir.claim): a failure removes only what the run made and puts
    set-aside results back; a success drops the results it replaced (trainer.resume=false) and an old error.txt."""
    from propetl.run import rundir
    from propetl.run.resume import Interrupted
    from propetl.run.train import train

    allow_other_files = bool(OmegaConf.select(cfg, "run_dir.allow_other_files", default=False))
    with rundir.claim(output_dir, enabled=is_main, allow_other_files=allow_other_files) as claim:
        try:
            metrics = train(cfg, output_dir, claim)
        except Interrupted:  # a checkpoint was saved: the run resumes from it
            raise
        except BaseException:
            rundir.clean_after_failure(claim)
            raise
        if is_main:
            rundir.forget_previous(output_dir)
            (output_dir / rundir.ERROR_FILE).unlink(missing_ok=True)
    return metrics


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=PRIMARY_CONFIG)
def hydra_entry(cfg: DictConfig) -> float | None:
    """One run in its folder (run_owned). A user error is one line and exit 2, or, inside a sweep (-m), error.txt in
    the job's folder and the sweep goes on (propetl/run/sweep.py)."""
    from hydra.core.hydra_config import HydraConfig

    from propetl.run import log, rundir
    from propetl.run.lifecycle import USER_ERRORS
    from propetl.run.resume import Interrupted

    output_dir = Path(HydraConfig.get().runtime.output_dir)
    is_main = distributed.from_environment().is_main  # rank 0 owns the run directory
    try:
        metrics = run_owned(cfg, output_dir, is_main)
        return metrics.get("glue_score", metrics.get("mean_test_score"))  # multi-task: the mean of the tasks
    except (*USER_ERRORS, rundir.RunDirectoryInUse) as error:
        print(f"propetl-train: error: {error}", file=sys.stderr)
        if not sweep.in_sweep():
            sys.exit(2)
        if is_main and not isinstance(error, rundir.RunDirectoryInUse):  # the job's folder keeps its error
            rundir.record_failure(output_dir, str(error))
        sweep.failed(output_dir, str(error))
        return None
    except Interrupted as stop:
        print(
            f"propetl-train: {stop}; resume with: propetl-train <same overrides> hydra.run.dir={output_dir}",
            file=sys.stderr,
        )
        sys.exit(128 + stop.signum)
    finally:
        log.finish_wandb()


DEFAULT_OUTPUTS = "outputs"  # conf/hydra/default.yaml's run and sweep folders are under it, in the working folder


def check_existing_run_dir(run_dir: Path, allow_other_files: bool) -> None:
    """A hydra.run.dir that exists before Hydra starts: the run did not make it (so never removes it), and files no
    run wrote there are refused now, before Hydra writes its log into the folder (rundir's ownership rule)."""
    from propetl.run import rundir

    os.environ[rundir.EXISTING_DIR_ENV] = str(run_dir.resolve())
    if not allow_other_files:
        try:
            rundir.refuse_other_files(run_dir)
        except rundir.RunDirectoryError as error:
            raise ConfigError(str(error)) from None


def check_output_folder(argv: list[str]) -> None:
    """A hydra.run.dir (with -m: hydra.sweep.dir) given on the command line that cannot be written, or, with none
    given (nor an experiment=, a --config-dir or a flag such as --help), a working folder where the default
    outputs/ cannot be made: one line before Hydra starts (Hydra would fail with a traceback opening the run's
    log file there)."""
    from propetl.storage.files import unwritable

    key = "hydra.sweep.dir=" if any(a in ("-m", "--multirun") for a in argv) else "hydra.run.dir="
    given = [a.split("=", 1)[1] for a in argv if a.lstrip("+").startswith(key)]
    if given:
        if problem := unwritable(Path(given[-1])):
            raise ConfigError(f"{key}{given[-1]} cannot be written: {problem}; choose another folder")
        if key == "hydra.run.dir=" and Path(given[-1]).is_dir():
            check_existing_run_dir(Path(given[-1]), "run_dir.allow_other_files=true" in argv)
        return
    if any(
        a.startswith(("experiment=", "+experiment=")) or a.startswith("-") and a not in ("-m", "--multirun")
        for a in argv
    ):  # an overlay's folder, --config-dir's, or a flag (--help, --cfg job)
        return
    if problem := unwritable(Path(DEFAULT_OUTPUTS)):
        raise ConfigError(
            f"the default output folder {Path(DEFAULT_OUTPUTS).absolute()} cannot be written: {problem}; "
            f"run from a writable folder or give {key}FOLDER"
        )


def main() -> None:
    try:
        check_command_line(sys.argv[1:])
        check_output_folder(sys.argv[1:])
        ctx = distributed.from_environment()
        if ctx.enabled and not any(a.startswith("hydra.run.dir=") for a in sys.argv[1:]):
            raise ConfigError(
                f"a data-parallel run (WORLD_SIZE={ctx.world_size}) needs hydra.run.dir=<folder>, "
                f"so that every process writes into the same run directory"
            )
    except ConfigError as error:
        print(f"propetl-train: error: {error}", file=sys.stderr)
        sys.exit(2)
    hydra_entry()
    if failures := sweep.failures_of_this_process():
        sys.exit(min(failures, 125))  # a sweep: how many of its jobs failed (each named in its summary)


if __name__ == "__main__":
    main()
