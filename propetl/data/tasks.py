"""The tasks as their yamls describe them: conf/task/<name>.yaml, and a user's task/ folders on the config search path
(configs.run_search_path: a run's hydra.searchpath, a tool's --config-dir). A task is its yaml: `metrics` are the
numbers it reports (metrics.task_numbers), `report` how tables show it (title, order, the paper's numbers). Scores,
averages and the report read them here, so a new task needs no code. OmegaConf only: no torch for the report."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from propetl.configs import CONF_DIR, run_search_path

FILE_PREFIX = "file://"


def task_configs() -> dict[str, DictConfig]:
    """name -> task yaml of every task on the search path (the shipped ones win a clash of names), in table order:
    `report.order`, then the tasks without one by name."""
    return _task_configs(tuple(run_search_path()))


@lru_cache(maxsize=16)
def _task_configs(search_path: Sequence[str]) -> dict[str, DictConfig]:
    folders = [CONF_DIR, *(Path(entry[len(FILE_PREFIX) :]) for entry in search_path if entry.startswith(FILE_PREFIX))]
    found: dict[str, DictConfig] = {}
    for folder in folders:
        for path in sorted((folder / "task").glob("*.yaml")):
            try:
                config = OmegaConf.load(path)
            except (OSError, yaml.YAMLError):  # a user's broken file: a run refuses it only when it is chosen
                continue
            if isinstance(config, DictConfig):
                found.setdefault(str(config.get("name") or path.stem), config)
    return dict(sorted(found.items(), key=lambda item: (_report(item[1], "order") or math.inf, item[0])))


def _report(config: Mapping[str, Any] | None, key: str):
    report = None if config is None else config.get("report")
    return report.get(key) if isinstance(report, Mapping) else None


def task_rank(task: str) -> tuple[int, str]:
    """Where a task goes in tables: task_configs' order, a task no yaml describes after them (by name)."""
    known = list(task_configs())
    return (known.index(task) if task in known else len(known), task)


def in_task_order(tasks: Iterable[str]) -> list[str]:
    """The distinct tasks, in table order."""
    return sorted(set(tasks), key=task_rank)


def task_title(task: str) -> str:
    """A task's heading in tables: its yaml's `report.title`, else its name."""
    return str(_report(task_configs().get(task), "title") or task)


def in_paper_average(task: str) -> bool:
    """Whether the paper's GLUE average counts the task: its yaml has the paper's numbers (`report.paper`)."""
    return _report(task_configs().get(task), "paper") is not None


def paper_average_size() -> int:
    """How many numbers the paper's average takes: the `metrics` of its tasks (11: GLUE's eight)."""
    return sum(len(config.metrics) for task, config in task_configs().items() if in_paper_average(task))


def paper_rows() -> dict[str, dict[str, list[float]]]:
    """The paper's rows (x100, as the task yamls' `report.paper` give them): row label -> task -> its numbers, in
    table order."""
    rows: dict[str, dict[str, list[float]]] = {}
    for task, config in task_configs().items():
        for label, numbers in (_report(config, "paper") or {}).items():
            rows.setdefault(str(label), {})[task] = [float(n) for n in numbers]
    return rows
