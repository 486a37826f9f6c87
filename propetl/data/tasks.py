"""The tasks as their yamls describe them: the options of the `task` config group on the search path (shipped and a
user's). `metrics` are the numbers a task reports (metrics.task_numbers), `report` how tables show it (title, order,
the paper's numbers): a new task needs no code. OmegaConf and Hydra only: no torch for the report."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from numbers import Real
from typing import Any

import yaml
from hydra.errors import HydraException
from omegaconf import DictConfig

from propetl.configs import ConfigError, group_choices, group_option, run_search_path


def known_task_configs() -> dict[str, DictConfig]:
    """name -> task yaml of every task on the search path, in table order: `report.order`, then by name."""
    return _known_task_configs(tuple(run_search_path()))


@lru_cache(maxsize=16)
def _known_task_configs(search_path: Sequence[str]) -> dict[str, DictConfig]:
    found: dict[str, DictConfig] = {}
    for option in group_choices("task", search_path):
        try:
            config = group_option("task", option, search_path)
        except (yaml.YAMLError, HydraException):  # a user's broken file: a run refuses it only when it is chosen
            continue
        found.setdefault(str(config.get("name") or option), config)
    return dict(sorted(found.items(), key=lambda item: (_order(item[1]), item[0])))


def _order(config: Mapping[str, Any]) -> float:
    order = _report(config, "order")
    return order if _is_number(order) and order else math.inf  # a bad one: check_report_blocks says so


def _report(config: Mapping[str, Any] | None, key: str):
    report = None if config is None else config.get("report")
    return report.get(key) if isinstance(report, Mapping) else None


def _is_number(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _numbers(value) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str) and all(map(_is_number, value))


REPORT_KEYS = {  # a task yaml's `report` block: key -> (what its value must be, the check)
    "title": ("a string", lambda value: isinstance(value, str)),
    "order": ("a number", _is_number),
    "paper": (
        "a mapping of row label -> [numbers]",
        lambda v: isinstance(v, Mapping) and all(map(_numbers, v.values())),
    ),
}


def check_report_blocks() -> None:
    """A ConfigError naming the task, key and value unless every task's `report` block is as REPORT_KEYS says."""
    for task, config in known_task_configs().items():
        if (report := config.get("report")) is not None and not isinstance(report, Mapping):
            raise ConfigError(f"task {task}: report = {report} is not a mapping of {', '.join(REPORT_KEYS)}")
        for key, (valid, is_valid) in REPORT_KEYS.items():
            if (value := _report(config, key)) is not None and not is_valid(value):
                raise ConfigError(f"task {task}: report.{key} = {value} is not {valid}")


GENERATION_KIND = "generation"  # a task yaml's `kind` for text-to-text-only tasks (XSum, WMT16); GLUE's have none


def is_generation_task(config: Mapping[str, Any] | None) -> bool:
    """Whether a task yaml describes a generation task: text to text only, no classification head can train it."""
    return isinstance(config, Mapping) and config.get("kind") == GENERATION_KIND


def encoder_tasks() -> list[str]:
    """The tasks a classification head can train: every known task but the generation tasks, in table order."""
    return [task for task, config in known_task_configs().items() if not is_generation_task(config)]


def task_rank(task: str) -> tuple[int, str]:
    """Where a task goes in tables: known_task_configs' order, a task no yaml describes after them (by name)."""
    known = list(known_task_configs())
    return (known.index(task) if task in known else len(known), task)


def in_task_order(tasks: Iterable[str]) -> list[str]:
    """The distinct tasks, in table order."""
    return sorted(set(tasks), key=task_rank)


def task_title(task: str) -> str:
    """A task's heading in tables: its yaml's `report.title`, else its name."""
    return str(_report(known_task_configs().get(task), "title") or task)


def in_paper_average(task: str) -> bool:
    """Whether the paper's GLUE average counts the task: its yaml has the paper's numbers (`report.paper`)."""
    return _report(known_task_configs().get(task), "paper") is not None


def paper_average_size() -> int:
    """How many numbers the paper's average takes: the `metrics` of its tasks (11: GLUE's eight)."""
    return sum(len(config.metrics) for task, config in known_task_configs().items() if in_paper_average(task))


def paper_rows() -> dict[str, dict[str, list[float]]]:
    """The paper's rows (x100, the task yamls' `report.paper`): row label -> task -> its numbers, in table order."""
    rows: dict[str, dict[str, list[float]]] = {}
    for task, config in known_task_configs().items():
        for label, numbers in (_report(config, "paper") or {}).items():
            rows.setdefault(str(label), {})[task] = [float(n) for n in numbers]
    return rows
