"""Resumable training: the loop's full state, saved every epoch (and every trainer.save_steps steps) into
<run dir>/resume/ and restored exactly, so a run killed at any point continues to the same result. What is saved: every
trainable tensor (PETL weights, mask scores, head), the best epoch's copy of them, the optimizer's moments, the
scheduler and the grad scaler, the step/epoch counters and history, and every RNG state (python, numpy, torch, and the
data-order generator as it stood when the epoch began; a mid-epoch resume re-draws that epoch's order and skips the
batches already done). Format: `state.safetensors` for tensors and `state.json` for the rest, never pickle, and
`manifest.json` with their sha256 (propetl/files.py), checked before either is read: a changed, missing or unlisted file
is refused in one line naming it. The folder is built beside the old one and renamed into place: a crash leaves the
previous checkpoint intact. SIGINT/SIGTERM: the step in flight finishes, a checkpoint is written, the run exits.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import signal
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from propetl.files import CheckpointError, check_seal, recover_folder_swap, seal, write_folder_atomically
from propetl.configs import plain_value
from propetl.checkpoint import read_safetensors

STATE_JSON, STATE_TENSORS = "state.json", "state.safetensors"
FINGERPRINT_KEYS = ("model.name_or_path", "method.name", "prototype", "mask.kind", "mask.sparsity", "mask.seed",
                    "mask.combine", "task.name", "task.num_labels", "seed", "trainer.batch_size", "trainer.epochs",
                    "trainer.max_steps", "trainer.lr", "mask.lr", "data.protocol", "data.split_seed",
                    "data.max_train_examples", "data.group_by_length", "mode", "tasks", "multitask.temperature",
                    "multitask.base_checkpoint")
FINGERPRINT_DEFAULTS = {"data.group_by_length": False}   # keys added later: their value in older checkpoints


class Interrupted(Exception):
    """Raised after a checkpoint was saved because the process got SIGINT or SIGTERM."""

    def __init__(self, signum: int, directory: Path):
        self.signum, self.directory = signum, directory
        super().__init__(f"interrupted by {signal.Signals(signum).name}; checkpoint saved in {directory}")


def fingerprint(cfg) -> dict:
    """What must not change between a run and its resumption."""
    return {key: plain_value(cfg, key) for key in FINGERPRINT_KEYS}


def fingerprint_differences(saved: dict, current: dict) -> list[tuple[str, object, object]]:
    """(key, saved value, this run's value) for each fingerprint key that differs; a key the saved run predates
    counts as its FINGERPRINT_DEFAULTS value."""
    saved = {**FINGERPRINT_DEFAULTS, **saved}
    return [(key, saved.get(key), value) for key, value in current.items() if saved.get(key) != value]


class StopOnSignal:
    """While active, SIGINT/SIGTERM only set `signum`; the loop saves and stops at the next step."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:          # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def _rng_state() -> tuple[dict, dict]:
    """(json part, tensor part) of the python, numpy and torch RNG states."""
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return ({"python": [py_version, list(py_state), py_gauss],
             "numpy": [np_kind, int(np_pos), int(np_has_gauss), float(np_gauss)]},
            {"rng/torch": torch.get_rng_state(), "rng/numpy": torch.from_numpy(np_keys.astype(np.int64))})


def _set_rng_state(meta: dict, tensors: dict) -> None:
    version, state, gauss = meta["python"]
    random.setstate((version, tuple(state), gauss))
    kind, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, tensors["rng/numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(tensors["rng/torch"])


class Checkpointer:
    """Saves and restores the training state of one run in `<run dir>/resume/`."""

    def __init__(self, run_dir: Path, cfg, save_steps: int | None = None, writes: bool = True):
        self.directory = Path(run_dir) / "resume"
        self.writes = writes                       # False on the other processes of a data-parallel run
        self.fingerprint = fingerprint(cfg)
        self.save_steps = save_steps
        self.extra: dict = {}                      # e.g. the W&B run id, restored on load
        self._checked: dict | None = None          # state.json once check_fingerprint passed (until the next save)
        if writes:
            recover_folder_swap(self.directory)    # a kill inside the last save's folder swap

    def exists(self) -> bool:
        return (self.directory / STATE_JSON).exists()

    def saved_extra(self) -> dict:
        return json.loads((self.directory / STATE_JSON).read_text()).get("extra", {}) if self.exists() else {}

    def save(self, result, model, optimizer, scheduler, scaler, data_order_state: torch.Tensor) -> None:
        self._checked = None                       # what was checked is about to be replaced
        if not self.writes:
            return
        parameters = {n: p for n, p in model.named_parameters() if p.requires_grad}
        tensors = {f"param/{n}": p.detach().cpu().contiguous() for n, p in parameters.items()}
        tensors.update({f"best/{n}": t.contiguous() for n, t in result.best_state.items()})
        optimizer_state = optimizer.state_dict()
        moments = {f"{i}/{k}": torch.as_tensor(v) for i, s in optimizer_state["state"].items() for k, v in s.items()}
        tensors.update({f"opt/{name}": v.detach().cpu().contiguous().reshape(-1) for name, v in moments.items()})
        rng_meta, rng_tensors = _rng_state()
        tensors.update(rng_tensors)
        tensors["rng/data_order"] = data_order_state
        fields = {k: v for k, v in dataclasses.asdict(result).items() if k != "best_state"}
        meta = {"fingerprint": self.fingerprint, "result": fields, "rng": rng_meta, "extra": self.extra,
                "optimizer": {"param_groups": optimizer_state["param_groups"],
                              "state_keys": {str(i): sorted(s) for i, s in optimizer_state["state"].items()},
                              "state_shapes": {name: list(v.shape) for name, v in moments.items()}},
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "parameters": sorted(parameters), "best": sorted(result.best_state)}

        def build(folder: Path) -> None:
            save_file(tensors, str(folder / STATE_TENSORS))
            (folder / STATE_JSON).write_text(json.dumps(meta, default=float))
            seal(folder)
            for path in folder.iterdir():          # on disk before the swap makes it the checkpoint
                with open(path, "rb") as f:
                    os.fsync(f.fileno())

        write_folder_atomically(self.directory, build)

    def check_fingerprint(self) -> dict:
        """The saved state.json, if the folder matches its manifest and this config its fingerprint; else a one-line
        CheckpointError."""
        path = self.directory / STATE_JSON
        check_seal(self.directory, required=True, hint="trainer.resume=false starts the run over")
        try:
            meta = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CheckpointError(f"cannot read {path}: {error}") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("fingerprint", {}), dict):
            raise CheckpointError(f"cannot read {path}: not a resume state")
        for key, saved, value in fingerprint_differences(meta.get("fingerprint", {}), self.fingerprint)[:1]:
            raise CheckpointError(f"{self.directory} was trained with {key}={saved!r}, this run has {key}={value!r}; "
                                  f"use the same config or trainer.resume=false to start over")
        self._checked = meta
        return meta

    def load(self, model, optimizer, scheduler, scaler, result_type):
        """Restore everything; returns (result, data-order state at the start of the current epoch). The folder is
        checked (manifest, fingerprint) once: here, unless the run's start checked it already."""
        meta = self._checked or self.check_fingerprint()
        tensors, _ = read_safetensors(self.directory / STATE_TENSORS)
        parameters = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if sorted(parameters) != meta["parameters"]:
            raise CheckpointError(f"{self.directory}: its trainable tensors do not match this model's (saved by an "
                                  f"older propetl?); trainer.resume=false starts the run over")
        with torch.no_grad():
            for name, parameter in parameters.items():
                parameter.copy_(tensors[f"param/{name}"])
        shapes = meta["optimizer"]["state_shapes"]
        state = {int(i): {k: tensors[f"opt/{i}/{k}"].reshape(shapes[f"{i}/{k}"]) for k in keys}
                 for i, keys in meta["optimizer"]["state_keys"].items()}
        optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
        scheduler.load_state_dict(meta["scheduler"])
        scaler.load_state_dict(meta["scaler"])
        _set_rng_state(meta["rng"], tensors)
        result = result_type(**meta["result"], best_state={n: tensors[f"best/{n}"] for n in meta["best"]})
        self.extra = meta.get("extra", {})
        return result, tensors["rng/data_order"]

    def discard(self) -> None:
        if self.writes:
            shutil.rmtree(self.directory, ignore_errors=True)
