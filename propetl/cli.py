"""propetl-train's command line: the checks before Hydra, Hydra's entry, and what a failed job leaves. Light at
import (Hydra, OmegaConf, the config tree): `--help` and tab completion answer without torch; the training code
(propetl.train) is imported when a run starts.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from propetl import distributed
from propetl.command_line import check_command_line
from propetl.configs import CONF_DIR, PRIMARY_CONFIG, ConfigError


def discard_unfinished(output_dir: Path) -> None:
    """A job that failed before producing results leaves no half-filled run directory behind."""
    if output_dir.exists() and not any((output_dir / name).exists() for name in ("metrics.json", "checkpoint", "resume")):
        shutil.rmtree(output_dir, ignore_errors=True)
        outputs = (Path.cwd() / "outputs").resolve()
        for parent in output_dir.resolve().parents:          # and the empty folders made for it (outputs/runs/rte/…)
            if parent == outputs or outputs not in parent.parents or any(parent.iterdir()):
                break
            parent.rmdir()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=PRIMARY_CONFIG)
def hydra_entry(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig

    from propetl import log, rundir
    from propetl.resume import Interrupted
    from propetl.run import USER_ERRORS
    from propetl.train import train

    output_dir = Path(HydraConfig.get().runtime.output_dir)
    is_main = distributed.from_environment().is_main             # rank 0 owns the run directory
    try:
        with rundir.claim(output_dir, enabled=is_main):
            try:
                metrics = train(cfg, output_dir)
            except USER_ERRORS:
                if is_main:
                    discard_unfinished(output_dir)
                raise
        return metrics.get("glue_score", metrics.get("mean_test_score"))     # multi-task: the mean of the tasks
    except (*USER_ERRORS, rundir.RunDirectoryInUse) as error:
        print(f"propetl-train: error: {error}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as stop:
        print(f"propetl-train: {stop}; resume with: propetl-train <same overrides> hydra.run.dir={output_dir}",
              file=sys.stderr)
        sys.exit(128 + stop.signum)
    finally:
        log.finish_wandb()


DEFAULT_OUTPUTS = "outputs"        # conf/hydra/default.yaml's run and sweep folders are under it, in the working folder


def check_output_folder(argv: list[str]) -> None:
    """A hydra.run.dir (with -m: hydra.sweep.dir) given on the command line that cannot be written, or, with none
    given (nor an experiment=, a --config-dir or a flag such as --help), a working folder where the default
    outputs/ cannot be made: one line before Hydra starts (Hydra would fail with a traceback opening the run's
    log file there)."""
    from propetl.files import unwritable

    key = "hydra.sweep.dir=" if any(a in ("-m", "--multirun") for a in argv) else "hydra.run.dir="
    given = [a.split("=", 1)[1] for a in argv if a.lstrip("+").startswith(key)]
    if given:
        if problem := unwritable(Path(given[-1])):
            raise ConfigError(f"{key}{given[-1]} cannot be written: {problem}; choose another folder")
        return
    if any(a.startswith(("experiment=", "+experiment=")) or a.startswith("-") and a not in ("-m", "--multirun")
           for a in argv):                       # an overlay's folder, --config-dir's, or a flag (--help, --cfg job)
        return
    if problem := unwritable(Path(DEFAULT_OUTPUTS)):
        raise ConfigError(f"the default output folder {Path(DEFAULT_OUTPUTS).absolute()} cannot be written: {problem}; "
                          f"run from a writable folder or give {key}FOLDER")


def main() -> None:
    try:
        check_command_line(sys.argv[1:])
        check_output_folder(sys.argv[1:])
        ctx = distributed.from_environment()
        if ctx.enabled and not any(a.startswith("hydra.run.dir=") for a in sys.argv[1:]):
            raise ConfigError(f"a data-parallel run (WORLD_SIZE={ctx.world_size}) needs hydra.run.dir=<folder>, "
                              f"so that every process writes into the same run directory")
    except ConfigError as error:
        print(f"propetl-train: error: {error}", file=sys.stderr)
        sys.exit(2)
    hydra_entry()


if __name__ == "__main__":
    main()
