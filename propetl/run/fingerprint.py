"""What a run computes, as one flat dict: what a finished run must match to be skipped and a checkpoint to be
resumed. The whole resolved config, dotted keys to plain values, less NOT_COMPUTED (W&B, progress, threads, device,
resuming, how tables show its task; mask.seed unless mask.kind=random), with READ_AS_DATA replaced by DATA_KEY, the
sha256 of the data files read: the same files under another path match. Sweep folder names (conf/hydra/default.yaml's
exclude_keys) leave out only NOT_COMPUTED keys (tests/test_fingerprint.py holds them in step)."""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

from omegaconf import OmegaConf

NOT_COMPUTED: tuple[str, ...] = ("logger", "reproduce", "run_dir", "trainer.progress", "trainer.threads")
NOT_COMPUTED += ("trainer.device", "trainer.log_every_steps", "trainer.resume", "trainer.save_steps", "task.report")
READ_AS_DATA = ("data.dir", "data.allow_hub")
DATA_KEY = "data.sha256"
MISSING = "(not recorded)"  # a key the saved run predates


def _flat(node, prefix: str = "") -> dict:
    if not isinstance(node, dict):
        return {prefix[:-1]: node}
    return {k: v for key, value in node.items() for k, v in _flat(value, f"{prefix}{key}.").items()}


def _left_out(key: str) -> bool:
    return any(key == name or key.startswith(f"{name}.") for name in (*NOT_COMPUTED, *READ_AS_DATA))


def config_part(cfg) -> dict:
    """The fingerprint's keys that the config holds (all but DATA_KEY)."""
    plain = _flat(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False))
    if plain.get("mask.kind") != "random":  # mask.seed draws random masks only
        plain.pop("mask.seed", None)
    return {key: value for key, value in plain.items() if not _left_out(key)}


@lru_cache(maxsize=256)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    from propetl.storage.files import sha256_of

    return sha256_of(Path(path))


def data_sha256(cfg) -> str:
    """sha256 over the local files each task of the run reads (names, contents, in order); a hub task: 'hub:<task>'."""
    from propetl.data import generation_tasks, glue
    from propetl.data.multitask import task_configs
    from propetl.data.tasks import is_generation_task
    from propetl.validate import is_text_to_text

    tasks = task_configs(list(cfg.tasks)) if cfg.get("mode") == "multitask" and cfg.get("tasks") else [cfg.task]
    data_dir = glue.resolve_data_dir(cfg.data.dir)
    text_to_text = is_text_to_text(cfg)  # T5 MNLI reads its own selection set too
    digest = hashlib.sha256()
    for task in tasks:
        files = (
            generation_tasks.local_files(task, data_dir)
            if is_generation_task(task)
            else glue.local_files(task, data_dir, cfg.data.protocol, text_to_text)
        )
        if files is None:
            digest.update(f"hub:{task.name}\n".encode())
            continue
        for path in files:
            stat = os.stat(path)
            sha256 = _file_sha256(str(path), stat.st_size, stat.st_mtime_ns)
            digest.update(f"{task.name}/{path.name}:{sha256}\n".encode())
    return digest.hexdigest()


def fingerprint(cfg) -> dict:
    """The config's part and the data's sha256."""
    return {**config_part(cfg), DATA_KEY: data_sha256(cfg)}


def differences(saved: dict, current: dict, ignore_missing: bool = False) -> list[tuple[str, object, object]]:
    """(key, saved value, this run's value) for each key that differs, in sorted order; a key the saved fingerprint
    lacks counts as MISSING (ignore_missing: left out, for records of older runs that predate the key)."""
    return [
        (key, saved.get(key, MISSING), value)
        for key, value in sorted(current.items())
        if saved.get(key, MISSING) != value and not (ignore_missing and key not in saved)
    ]


def describe(differences_: list[tuple[str, object, object]], limit: int = 4) -> str:
    """'key=a there, b here; ...' (the first `limit`, then how many more)."""
    named = "; ".join(f"{key}={before!r} there, {now!r} here" for key, before, now in differences_[:limit])
    more = len(differences_) - limit
    return named + (f"; and {more} more" if more > 0 else "")
