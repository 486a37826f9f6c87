"""`hydra/launcher=fused`: a -m sweep's runs that differ only in seed, mask seed, mask sparsity or mask kind
(propetl/run/fused.py FUSED_KEYS) train side by side in this process, their steps fused over the shared frozen
backbone; every run writes what it writes alone, in the folder it has alone. Jobs that cannot fuse (run/fused.py `refusal`: fine-tuning, several tasks, T5, ...) or stand
alone run one after another, as Hydra's basic launcher runs them, said in one line.

    propetl-train -m hydra/launcher=fused task=mrpc prototype=lora seed=42,43,44
"""

# no `from __future__ import annotations`: Hydra scans this module outside sys.modules (dataclass needs it)
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)


@dataclass
class FusedLauncherConf:
    _target_: str = "hydra_plugins.propetl_fused_launcher.fused_launcher.FusedLauncher"
    n_jobs: int = 1  # accepted (and unused: groups train one after another) so that profiles sized for joblib compose


ConfigStore.instance().store(group="hydra/launcher", name="fused", node=FusedLauncherConf, provider="propetl")


class ThreadLog(logging.Filter):
    """Passes the records of one thread: each fused run's train.log holds its own lines."""

    def __init__(self, ident: int):
        super().__init__()
        self.ident = ident

    def filter(self, record: logging.LogRecord) -> bool:
        return record.thread == self.ident


class FusedLauncher(Launcher):
    def __init__(self, n_jobs: int = 1) -> None:
        super().__init__()
        self.config: Optional[DictConfig] = None  # noqa: UP045 (no __future__ annotations here)
        self.task_function = None
        self.hydra_context = None

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from propetl.run import fused

        setup_globals()
        assert self.config is not None and self.hydra_context is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        jobs = []
        for index, overrides in enumerate(job_overrides, start=initial_job_idx):
            config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(config):
                config.hydra.job.id = config.hydra.job.num = index
            jobs.append((index, list(overrides), config))
        groups: dict[tuple, list] = {}
        for job in jobs:
            groups.setdefault(fused.fuse_key(job[1]), []).append(job)
        returns: dict[int, JobReturn] = {}
        for group in groups.values():
            why = fused.refusal(group[0][2]) if len(group) > 1 else None
            if why:
                log.info("%d jobs train one after another, not fused: %s", len(group), why)
            if len(group) == 1 or why:
                for index, overrides, config in group:
                    log.info("\t#%d : %s", index, " ".join(filter_overrides(overrides)))
                    returns[index] = self._run(config)
                    configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
            else:
                returns.update(self._run_fused(group))
        return [returns[index] for index, _, _ in jobs]

    def _run(self, config: DictConfig, task_function=None, configure_logging: bool = True) -> JobReturn:
        """Hydra's run_job of one sweep job in its folder (task_function: the launcher's own unless given)."""
        return run_job(
            hydra_context=self.hydra_context,
            task_function=task_function or self.task_function,
            config=config,
            job_dir_key="hydra.sweep.dir",
            job_subdir_key="hydra.sweep.subdir",
            configure_logging=configure_logging,
        )

    def _run_fused(self, group: list) -> dict[int, JobReturn]:
        """The group's runs in threads, started one at a time: each sets itself up (seeds, data, model, W&B) alone
        and hands in its first batch before the next starts; from then on their steps are fused."""
        from propetl.run import fused

        log.info("%d jobs train fused: %s", len(group), ", ".join(f"#{index}" for index, _, _ in group))
        meeting = fused.FusedGroup(len(group))
        returns: dict[int, JobReturn] = {}
        exits: list[Exception | SystemExit] = []
        task_function = self.task_function
        assert task_function is not None

        def job_function(task_cfg: DictConfig, member) -> object:
            handler = None
            fused.join(member)
            try:
                handler = logging.FileHandler(Path(HydraConfig.get().runtime.output_dir) / "train.log")
                handler.addFilter(ThreadLog(threading.get_ident()))
                handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
                logging.getLogger().addHandler(handler)
                return task_function(task_cfg)
            finally:
                fused.join(None)
                if handler is not None:
                    logging.getLogger().removeHandler(handler)
                    handler.close()

        def thread_main(index: int, config: DictConfig, member) -> None:
            try:
                returns[index] = self._run(config, lambda task_cfg: job_function(task_cfg, member), False)
            except (Exception, SystemExit) as error:  # noqa: BLE001 (re-raised in the launcher once every run stops)
                exits.append(error)
            finally:  # however the job ended (or never began), the others stop waiting for its batches
                meeting.leave(member)

        threads = []
        with fused.SignalRelay():  # SIGINT/SIGTERM: every run saves after the same pass, then exits 128+signal
            for index, overrides, config in group:
                log.info("\t#%d : %s", index, " ".join(filter_overrides(overrides)))
                member = meeting.member(place=index)
                thread = threading.Thread(target=thread_main, args=(index, config, member), name=f"propetl-job-{index}")
                with meeting.cond:
                    arrived = meeting.arrivals
                    thread.start()
                    threads.append(thread)
                    while meeting.arrivals == arrived and thread.is_alive():  # set up alone, then the next
                        meeting.cond.wait(timeout=1.0)
            for thread in threads:
                while thread.is_alive():
                    thread.join(timeout=0.5)  # short waits: the main thread runs the signal handler between them
        if exits:
            raise exits[0]
        return returns
