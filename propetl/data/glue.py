"""GLUE data: local TSV files first, the hub (nyu-mll/glue) as a fallback, and the evaluation protocols.

Every task comes back as a DatasetDict with "train", "validation" (model selection) and "test" (reported),
with the columns "text_a", optionally "text_b" (pair tasks) and "label" (int64, or float32 for regression).
A text-to-text (T5) run under the split protocol takes a task's own selection set where its yaml gives one
(`text_to_text.validation`, MNLI's mismatched dev set: the reference's T5 split, paper.md §5.3)."""

from __future__ import annotations

import csv
import logging
import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import torch

from propetl.configs import plain_group

logger = logging.getLogger(__name__)

HUB_DATASET = "nyu-mll/glue"
PROTOCOLS = ("split", "full_dev")
LARGE_TASK_VALIDATION_SIZE = 1000  # train examples held out for model selection on large tasks
REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
TEXT_FIELDS = ("text_a", "text_b")
FIX_HINT = "set data.dir=PATH or PROPETL_DATA_DIR to a folder of GLUE task files"
FLOAT32_MAX = 3.4028234663852886e38  # a regression label beyond it is inf in the float32 label column
MIN_ROWS = {"train": 1, "validation": 2, "test": 2}  # selection and test: correlations need two rows


class DataError(Exception):
    """One-line, user-facing error: names the task, the path and how to fix it."""

    def __init__(self, message: str):
        super().__init__(_one_line(message))


@dataclass(frozen=True)
class _TaskSpec:
    """The parts of a task config (conf/task/*.yaml) that loading needs."""

    name: str
    num_labels: int
    label_names: tuple[str, ...] | None
    size: str
    folder: str
    train_files: tuple[str, ...]
    dev_files: tuple[str, ...]
    header: bool
    names: tuple[str, ...] | None
    columns: dict[str, str]  # text_a / text_b / label -> column name in the TSV files
    hub_config: str | None
    hub_dev_split: str
    hub_columns: dict[str, str]  # text_a / text_b / label -> column name in the hub dataset
    label_range: tuple[float, float] | None = None  # regression: the scores a label may take (STS-B: 0..5)
    # the task's own selection set (text_to_text.validation, T5 runs only): local files and hub split, or None
    selection_files: tuple[str, ...] | None = None
    hub_selection_split: str | None = None

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1

    @property
    def text_fields(self) -> tuple[str, ...]:
        return tuple(field for field in TEXT_FIELDS if field in self.columns)

    @property
    def local_parts(self) -> dict[str, tuple[str, ...]]:
        """part -> its local files: train, dev and, where the task gives one, its selection set ("validation")."""
        parts = {"train": self.train_files, "dev": self.dev_files}
        return parts if self.selection_files is None else {**parts, "validation": self.selection_files}

    @property
    def local_file_names(self) -> list[str]:
        """Every local file of local_parts, in reading order."""
        return [name for files in self.local_parts.values() for name in files]

    @property
    def hub_parts(self) -> dict[str, tuple[str, str]]:
        """part -> (the yaml key naming it, its hub split): local_parts' parts, on the hub."""
        parts = {"train": ("hub.config", "train"), "dev": ("hub.dev_split", self.hub_dev_split)}
        if self.hub_selection_split is None:
            return parts
        return {**parts, "validation": ("text_to_text.validation.hub", self.hub_selection_split)}

    @property
    def features(self) -> datasets.Features:
        label = datasets.Value("float32" if self.is_regression else "int64")
        return datasets.Features({**{field: datasets.Value("string") for field in self.text_fields}, "label": label})


def load_glue(
    task_cfg: Mapping[str, Any],
    data_dir: str | os.PathLike | None,
    protocol: str = "split",
    split_seed: int = 42,
    allow_hub: bool = True,
    text_to_text: bool = False,
) -> datasets.DatasetDict:
    """The task's splits and columns as the module says, under data.protocol `protocol` (PROTOCOLS); `text_to_text`:
    for a T5 run (the task's own selection set, where its yaml gives one, under the split protocol)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"data.protocol={protocol!r} is not one of: {', '.join(PROTOCOLS)}")
    spec = _task_spec(task_cfg, protocol, text_to_text)
    parts = _load_parts(spec, None if data_dir is None else pathlib.Path(data_dir), allow_hub)
    if protocol == "full_dev":
        splits = datasets.DatasetDict(train=parts["train"], validation=parts["dev"], test=parts["dev"])
    else:
        splits = _split_protocol(spec, parts, split_seed)
    for split, least in MIN_ROWS.items():  # before any training: a one-row selection split fails only after it
        if len(splits[split]) < least:
            raise DataError(
                f"task '{spec.name}': the {split} split has {len(splits[split])} row(s) under "
                f"data.protocol={protocol}; it needs at least {least}: give the task's files more rows"
            )
    return splits


def sample_train(splits: datasets.DatasetDict, limit: int | None, seed: int) -> datasets.DatasetDict:
    """Keep a seeded sample of `limit` training examples (data.max_train_examples); None keeps all."""
    if limit is not None and limit < len(splits["train"]):
        splits["train"] = splits["train"].shuffle(seed=seed).select(range(limit))
    return splits


def resolve_data_dir(configured: str | None) -> pathlib.Path | None:
    """data.dir if given (even if missing: the loader reports it), else $PROPETL_DATA_DIR, else <repo root>/data/glue
    if it exists (`make install` links it), else None."""
    if configured is not None and str(configured) != "":
        return pathlib.Path(configured).expanduser()
    from_env = os.environ.get("PROPETL_DATA_DIR")
    if from_env:
        return pathlib.Path(from_env).expanduser()
    linked = REPO_ROOT / "data" / "glue"
    return linked if linked.exists() else None


def _task_spec(task_cfg: Mapping[str, Any], protocol: str = "split", text_to_text: bool = False) -> _TaskSpec:
    """Reads a task config (a task group, a DictConfig, or a plain mapping) into a _TaskSpec; its own selection set
    (`text_to_text.validation`) only for a text-to-text run under the split protocol."""
    task = plain_group(task_cfg)
    name = str(task.get("name", "?"))
    try:
        local, hub = task["local"], task.get("hub") or {}
        label_names, names = task.get("label_names"), local.get("names")
        wanted = text_to_text and protocol == "split"
        selection = (task.get("text_to_text") or {}).get("validation") if wanted else None
        return _TaskSpec(
            name=name,
            num_labels=int(task["num_labels"]),
            label_names=None if label_names is None else tuple(str(n) for n in label_names),
            size=str(task["size"]),
            folder=str(local["folder"]),
            train_files=tuple(local["train"]),
            dev_files=tuple(local["dev"]),
            header=bool(local["header"]),
            names=None if names is None else tuple(names),
            columns=dict(local["columns"]),
            hub_config=hub.get("config"),
            hub_dev_split=hub.get("dev_split", "validation"),
            hub_columns=dict(hub.get("columns") or local["columns"]),
            label_range=None if task.get("label_range") is None else tuple(task["label_range"]),
            selection_files=None if selection is None else tuple(selection["local"]),
            hub_selection_split=None if selection is None else str(selection["hub"]),
        )
    except KeyError as missing:
        raise DataError(f"task config '{name}' lacks the key {missing}; see conf/task/*.yaml") from None


def _load_parts(spec: _TaskSpec, data_dir: pathlib.Path | None, allow_hub: bool) -> dict[str, datasets.Dataset]:
    """The spec's parts (train, dev[, validation]) from the local files if they are all there, else from the hub,
    else a DataError."""
    local_problem = _local_files_problem(spec, data_dir)
    if local_problem is None:
        assert data_dir is not None  # a missing data_dir is a local problem
        folder = data_dir / spec.folder
        logger.info("task %s: loading %s", spec.name, folder)
        return {part: _read_tsv_files(spec, folder, files) for part, files in spec.local_parts.items()}
    if not allow_hub:
        raise DataError(
            f"no data for task '{spec.name}': {local_problem} and the hub is disabled "
            f"(data.allow_hub=false); {FIX_HINT}, or set data.allow_hub=true and go online"
        )
    return _load_hub(spec, local_problem)


def local_files(
    task_cfg: Mapping[str, Any], data_dir: pathlib.Path | None, protocol: str = "split", text_to_text: bool = False
) -> list[pathlib.Path] | None:
    """The local files load_glue reads for the task (train, dev[, its selection set]), in reading order, if they are
    all there; None: it would be the hub."""
    spec = _task_spec(task_cfg, protocol, text_to_text)
    if _local_files_problem(spec, data_dir) is not None:
        return None
    assert data_dir is not None  # a missing data_dir is a local problem
    return [data_dir / spec.folder / name for name in spec.local_file_names]


def _local_files_problem(spec: _TaskSpec, data_dir: pathlib.Path | None) -> str | None:
    """Why the local files cannot be used (one phrase), or None when all the spec's files exist."""
    if data_dir is None:
        return "no data.dir configured"
    if not data_dir.exists():
        return f"data.dir '{data_dir}' does not exist"
    if not data_dir.is_dir():
        return f"data.dir '{data_dir}' is not a folder"
    for file_name in spec.local_file_names:
        path = data_dir / spec.folder / file_name
        if not path.is_file():
            return f"expected {path} (not found)"
    return None


def _read_tsv_files(spec: _TaskSpec, folder: pathlib.Path, file_names: Sequence[str]) -> datasets.Dataset:
    """One split read from the task folder; several files are concatenated in order."""
    parts = [_read_tsv(spec, folder / name) for name in file_names]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _read_tsv(spec: _TaskSpec, path: pathlib.Path) -> datasets.Dataset:
    """One GLUE TSV file as a dataset with text_a[, text_b], label."""
    column_names = _tsv_column_names(spec, path)
    for field, column in spec.columns.items():
        if column not in column_names:
            raise DataError(
                f"task '{spec.name}': {path} has no column '{column}' (for {field}); columns found: "
                f"{', '.join(repr(c) for c in column_names)}; "
                f"fix the file or local.columns in conf/task/{spec.name}.yaml"
            )
    raw = _load_tsv_as_strings(spec, path, column_names)
    values = {}
    for field in spec.text_fields:
        column = spec.columns[field]
        values[field] = raw[column][:]
        for row, value in enumerate(values[field], start=1):
            if value is None:
                raise DataError(
                    f"task '{spec.name}': {path} data row {row} has no '{column}' field "
                    "(too few tab-separated fields); fix the file"
                )
    labels = []
    for row, raw_label in enumerate(raw[spec.columns["label"]][:], start=1):
        try:
            labels.append(_parse_label(spec, raw_label))
        except ValueError as reason:
            raise DataError(
                f"task '{spec.name}': {path} data row {row}: {reason}; "
                f"fix the file or label_names in conf/task/{spec.name}.yaml"
            ) from None
    return datasets.Dataset.from_dict({**values, "label": labels}, features=spec.features)


def _tsv_column_names(spec: _TaskSpec, path: pathlib.Path) -> list[str]:
    """The header of the file (without a UTF-8 BOM), or the configured names for header-less files."""
    if not spec.header:
        if spec.names is None:
            raise DataError(
                f"task '{spec.name}': local.header is false but local.names is not set; "
                f"add the column names to conf/task/{spec.name}.yaml"
            )
        return list(spec.names)
    try:
        with open(path, encoding="utf-8-sig") as file:
            return file.readline().rstrip("\r\n").split("\t")
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"task '{spec.name}': cannot read {path}: {error}; fix or replace the file") from None


def _load_tsv_as_strings(spec: _TaskSpec, path: pathlib.Path, column_names: Sequence[str]) -> datasets.Dataset:
    """Every column as text, exactly as in the file: no quote handling (quoting=3), no NA detection."""
    try:
        return datasets.load_dataset(
            "csv",
            data_files={"data": str(path)},
            split="data",
            delimiter="\t",
            quoting=csv.QUOTE_NONE,
            header=0 if spec.header else None,
            column_names=list(column_names),
            features=datasets.Features({name: datasets.Value("string") for name in column_names}),
            keep_default_na=False,
            na_filter=False,
            encoding="utf-8-sig",
        )
    except Exception as error:  # pandas/arrow errors arrive wrapped in DatasetGenerationError
        raise DataError(
            f"task '{spec.name}': cannot read {path}: {_root_cause(error)}; fix or replace the file"
        ) from error


def _parse_label(spec: _TaskSpec, raw_label: str | None) -> int | float:
    """One label as written in a file -> int class id or float score; ValueError says what is wrong."""
    text = (raw_label or "").strip()
    if not text:
        raise ValueError("empty label")
    if spec.label_names is not None:
        if text not in spec.label_names:
            raise ValueError(f"label {text!r} is not one of: {', '.join(spec.label_names)}")
        return spec.label_names.index(text)
    try:
        value = (float if spec.is_regression else int)(text)
    except ValueError:
        raise ValueError(
            f"label {text!r} is not {'a number' if spec.is_regression else 'an integer class id'}"
        ) from None
    return _checked_label(spec, value, text)


def _checked_label(spec: _TaskSpec, value: float, text: str) -> int | float:
    """A label's value if the task can take it (a class id in 0..num_labels-1; a score finite in float32 and in the
    task's label_range); else ValueError saying why."""
    if not spec.is_regression:
        if not 0 <= value < spec.num_labels:
            raise ValueError(f"label {text} is outside 0..{spec.num_labels - 1}")
        return value
    if not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
        raise ValueError(f"label {text!r} is not a finite float32 number")
    if spec.label_range is not None and not spec.label_range[0] <= value <= spec.label_range[1]:
        low, high = spec.label_range
        raise ValueError(f"label {text} is outside the task's label_range [{low}, {high}]")
    return value


def _load_hub(spec: _TaskSpec, local_problem: str) -> dict[str, datasets.Dataset]:
    """The spec's parts (train, dev[, validation]) from the hub; a failed download is a DataError that says why (one
    line)."""
    unreachable = f"no data for task '{spec.name}': {local_problem} and the hub ({HUB_DATASET}) is unreachable"
    if spec.hub_config is None:
        raise DataError(f"{unreachable} (task '{spec.name}' has no hub.config); {FIX_HINT}, or go online")
    try:
        hub_dataset = datasets.load_dataset(HUB_DATASET, spec.hub_config)
    except Exception as error:  # noqa: BLE001 (offline, no network, unknown config, ...: one line)
        reason = f"{type(error).__name__}: {_root_cause(error)}"[:300]
        raise DataError(f"{unreachable} ({reason}); {FIX_HINT}, or go online") from None
    logger.info("task %s: %s; loaded %s/%s", spec.name, local_problem, HUB_DATASET, spec.hub_config)
    where = f"{HUB_DATASET}/{spec.hub_config}"
    for key, split in spec.hub_parts.values():
        if split not in hub_dataset:
            raise DataError(
                f"task '{spec.name}': {where} has no split '{split}' "
                f"(found: {', '.join(hub_dataset)}); fix {key} in conf/task/{spec.name}.yaml"
            )
    return {
        part: _hub_split(spec, hub_dataset[split], f"{where}:{split}") for part, (_, split) in spec.hub_parts.items()
    }


def _hub_split(spec: _TaskSpec, split: datasets.Dataset, where: str) -> datasets.Dataset:
    """Hub columns renamed to text_a[, text_b], label; other columns dropped; label cast."""
    wanted = {field: spec.hub_columns[field] for field in (*spec.text_fields, "label")}
    for field, column in wanted.items():
        if column not in split.column_names:
            raise DataError(
                f"task '{spec.name}': {where} has no column '{column}' (for {field}); columns found: "
                f"{', '.join(split.column_names)}; fix hub.columns in conf/task/{spec.name}.yaml"
            )
    renamed = split.select_columns(list(wanted.values())).rename_columns({c: f for f, c in wanted.items()})
    for row, value in enumerate(renamed["label"], start=1):
        try:
            _checked_label(spec, value, str(value))
        except ValueError as reason:
            raise DataError(
                f"task '{spec.name}': {where} row {row}: {reason}; fix hub.columns or the task's "
                f"label_range in conf/task/{spec.name}.yaml"
            ) from None
    return renamed.cast(spec.features)


def _split_protocol(spec: _TaskSpec, parts: Mapping[str, datasets.Dataset], seed: int) -> datasets.DatasetDict:
    """The reference's split: a task with its own selection set (MNLI on T5) trains on all of train, selects on that
    set and reports dev; small tasks halve dev (validation/test); large tasks hold out train examples."""
    train, dev = parts["train"], parts["dev"]
    if "validation" in parts:
        return datasets.DatasetDict(train=train, validation=parts["validation"], test=dev)
    if spec.size == "small":
        order = _permutation(len(dev), seed)
        half = len(dev) // 2
        return datasets.DatasetDict(train=train, validation=dev.select(order[:half]), test=dev.select(order[half:]))
    if spec.size == "large":
        held_out = LARGE_TASK_VALIDATION_SIZE
        if len(train) <= held_out:
            raise DataError(
                f"task '{spec.name}': train has only {len(train)} rows; the split protocol holds out "
                f"{held_out}; use data.protocol=full_dev or size: small"
            )
        order = _permutation(len(train), seed)
        return datasets.DatasetDict(
            train=train.select(order[held_out:]), validation=train.select(order[:held_out]), test=dev
        )
    raise ValueError(f"task.size={spec.size!r} is not one of: small, large (conf/task/{spec.name}.yaml)")


def _permutation(n: int, seed: int) -> list[int]:
    """The split permutation: torch.randperm with its own generator, independent of the global RNG."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def _root_cause(error: BaseException) -> str:
    """The message of the innermost cause, on one line (datasets wraps parser errors)."""
    while error.__cause__ is not None:
        error = error.__cause__
    return _one_line(str(error)) or type(error).__name__


def _one_line(text: str) -> str:
    """Line breaks replaced by spaces; spacing inside a line (paths!) kept."""
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())
