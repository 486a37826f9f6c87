"""The generation tasks (conf/task/xsum.yaml, conf/task/wmt16_ro_en.yaml; yamls with `kind: generation`): train,
validation and test as "source" and "target" strings, from a local folder of jsonl files when it has them all, else
from the hub via `datasets`. Local: <data.dir>/<local.folder>/{train,validation,test}.jsonl, one JSON object a line
with the fields local.source and local.target (XSum: document, summary; WMT16: ro, en). Hub: hub.path/hub.config,
fields hub.source/hub.target ("translation.ro": a field inside a field)."""

from __future__ import annotations

import json
import logging
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import datasets
import torch

from propetl.configs import plain_group
from propetl.data.glue import DataError, _root_cause

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
LOCAL_KEYS = ("folder", *SPLITS, "source", "target")  # what a generation task's yaml names (conf/task/xsum.yaml)
HUB_KEYS = ("path", "source", "target")


def load_generation_task(
    task_cfg: Mapping[str, Any],
    data_dir: str | os.PathLike | None,
    allow_hub: bool = True,
    add_prefix: bool = False,
    split_seed: int = 42,
) -> datasets.DatasetDict:
    """train/validation/test with source and target (module doc). The source is the source field after the yaml's
    `source_prefix` (XSum "summarize:", WMT16 "Translate Romanian to English:"), and with `add_prefix` after its
    `prefix_name` (the reference's task name). With `validation_size` set, validation keeps that many rows, drawn as
    the reference draws n_val: the first of torch.randperm seeded with `split_seed`."""
    task = plain_group(task_cfg)
    name = str(task.get("name", "?"))
    local, hub = task.get("local") or {}, task.get("hub") or {}
    needed = [f"local.{key}" for key in LOCAL_KEYS if key not in local] + [f"hub.{k}" for k in HUB_KEYS if k not in hub]
    if needed:
        raise DataError(f"task config '{name}' lacks the key {needed[0]}; see conf/task/xsum.yaml")
    folder = None if data_dir is None else pathlib.Path(data_dir) / str(local["folder"])
    problem = _local_problem(folder, local)
    if problem is None:
        assert folder is not None
        logger.info("task %s: loading %s", name, folder)
        raw = {split: _read_jsonl(name, folder / str(local[split]), local) for split in SPLITS}
        fields = (str(local["source"]), str(local["target"]))
    else:
        raw = _load_hub(name, hub, local, problem, allow_hub)
        fields = (str(hub["source"]), str(hub["target"]))
    words = ((task.get("prefix_name") or name) if add_prefix else None, task.get("source_prefix"))
    prefix = " ".join(str(word) for word in words if word)
    splits = datasets.DatasetDict({split: _as_text_to_text(raw[split], fields, prefix) for split in SPLITS})
    size = task.get("validation_size")
    if size is not None and size < len(splits["validation"]):
        order = torch.randperm(len(splits["validation"]), generator=torch.Generator().manual_seed(split_seed))
        splits["validation"] = splits["validation"].select(order[: int(size)].tolist())
    for split in SPLITS:
        if len(splits[split]) == 0:
            raise DataError(f"task '{name}': the {split} split has no rows; give it some")
    return splits


def local_files(task_cfg: Mapping[str, Any], data_dir: str | os.PathLike | None) -> list[pathlib.Path] | None:
    """The task's local train, validation and test files, in reading order, if they are all there; None: the hub."""
    local = plain_group(task_cfg).get("local") or {}
    folder = None if data_dir is None else pathlib.Path(data_dir) / str(local.get("folder"))
    if any(split not in local for split in SPLITS) or _local_problem(folder, local) is not None:
        return None
    assert folder is not None  # no folder is a local problem
    return [folder / str(local[split]) for split in SPLITS]


def local_hint(local: Mapping[str, Any]) -> str:
    """How to give a generation task's data locally (the fix named in every DataError)."""
    files = ", ".join(str(local[s]) for s in SPLITS)
    return (
        f"set data.dir=PATH to a folder holding {local['folder']}/ with {files} "
        f"(jsonl, fields {local['source']} and {local['target']})"
    )


def _local_problem(folder: pathlib.Path | None, local: Mapping[str, Any]) -> str | None:
    if folder is None:
        return "no data.dir configured"
    for split in SPLITS:
        path = folder / str(local[split])
        if not path.is_file():
            return f"expected {path} (not found)"
    return None


def _read_jsonl(name: str, path: pathlib.Path, local: Mapping[str, Any]) -> dict[str, list[str]]:
    """A jsonl file's source and target fields as columns."""
    rows: list[dict] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"task '{name}': cannot read {path}: {error}; fix or replace the file") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"task '{name}': {path} line {number} is not JSON ({error}); fix the file") from None
        for field in (local["source"], local["target"]):
            if not isinstance(row, dict) or not isinstance(row.get(field), str):
                raise DataError(f"task '{name}': {path} line {number} has no text field '{field}'; fix the file")
        rows.append(row)
    return {field: [row[field] for row in rows] for field in (local["source"], local["target"])}


def _load_hub(name: str, hub: Mapping[str, Any], local: Mapping[str, Any], problem: str, allow_hub: bool) -> dict:
    where = "/".join(str(p) for p in (hub["path"], hub.get("config")) if p)
    if not allow_hub:
        raise DataError(
            f"no data for task '{name}': {problem} and the hub is disabled (data.allow_hub=false); {local_hint(local)}"
        )
    try:
        loaded = datasets.load_dataset(str(hub["path"]), hub.get("config"))
    except Exception as error:  # noqa: BLE001 (offline, no network, unknown dataset, ...: one line)
        reason = f"{type(error).__name__}: {_root_cause(error)}"[:300]
        raise DataError(
            f"no data for task '{name}': {problem} and the hub ({where}) is unreachable ({reason}); "
            f"{local_hint(local)}, or go online"
        ) from None
    missing = [split for split in SPLITS if split not in loaded]
    if missing:
        raise DataError(f"task '{name}': {where} has no split {missing[0]} (found: {', '.join(loaded)})")
    logger.info("task %s: %s; loaded %s", name, problem, where)
    return {split: loaded[split] for split in SPLITS}


def _column(table, path: str) -> list[str]:
    """A table's (a dataset's, or a dict of lists) column "a", or for "a.b" the field b of every value of column a."""
    first, *rest = path.split(".")
    values = list(table[first])
    for key in rest:
        values = [value[key] for value in values]
    return [str(value) for value in values]


def _as_text_to_text(table, fields: tuple[str, str], prefix: str) -> datasets.Dataset:
    source, target = fields
    return datasets.Dataset.from_dict(
        {
            "source": [f"{prefix} {text}" if prefix else text for text in _column(table, source)],
            "target": _column(table, target),
        },
        features=datasets.Features({"source": datasets.Value("string"), "target": datasets.Value("string")}),
    )
