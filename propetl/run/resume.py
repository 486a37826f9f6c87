"""Resumable training: the loop's full state (trainable tensors, the best epoch's copy, optimizer, scheduler, grad scaler,
counters, history, every RNG state with the data order of the current epoch) saved every epoch (and every
trainer.save_steps steps) into <run dir>/resume/ and restored exactly, so a killed run continues to the same result.
Format: `state.safetensors` and `state.json`, never pickle, sealed (storage/files.py); a changed file, a state of
another structure (check_state) or one that does not fit this run (Checkpointer._check_fits) is refused in one line
naming its file and key. SIGINT/SIGTERM: the step in flight finishes, a checkpoint is written, the run exits."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import reprlib
import shutil
import signal
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
from safetensors.torch import save_file

from propetl.methods import rules
from propetl.run.fingerprint import describe, differences, fingerprint
from propetl.storage.checkpoint import OBJECT, read_safetensors, safetensors_shapes
from propetl.storage.files import CheckpointError, check_seal, recover_folder_swap, seal, write_folder_atomically

STATE_JSON, STATE_TENSORS = "state.json", "state.safetensors"
START_OVER = "trainer.resume=false starts the run over"
LIST = rules.Rule(lambda v: isinstance(v, list), "a list")
SHAPE = rules.Rule(
    lambda v: isinstance(v, list) and all(rules.integer().accepts(d) and d >= 0 for d in v), "a list of sizes"
)
NAMES = rules.Rule(lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v), "a list of tensor names")
TEXTS = rules.Rule(
    lambda v: isinstance(v, dict) and all(isinstance(x, (str, type(None))) for x in v.values()), "an object of texts"
)
STATE_RULES = dict.fromkeys(("fingerprint", "result", "rng", "optimizer", "scheduler", "scaler"), OBJECT)
STATE_RULES |= {"parameters": NAMES, "best": NAMES, "extra": TEXTS, "optimizer.param_groups": LIST}
STATE_RULES |= dict.fromkeys(("optimizer.state_keys", "optimizer.state_shapes"), OBJECT)
RNG_TENSORS = ("rng/torch", "rng/numpy", "rng/data_order")


class Interrupted(Exception):
    """Raised after a checkpoint was saved because the process got SIGINT or SIGTERM."""

    def __init__(self, signum: int, directory: Path):
        self.signum, self.directory = signum, directory
        super().__init__(f"interrupted by {signal.Signals(signum).name}; checkpoint saved in {directory}")


class StopOnSignal:
    """While active, SIGINT/SIGTERM only set `signum`; the loop saves and stops at the next step."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
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
    numpy_state = np.random.get_state()  # the legacy tuple: numpy's global generator is MT19937
    assert isinstance(numpy_state, tuple)
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = numpy_state
    meta = {"python": [py_version, list(py_state), py_gauss]}
    meta["numpy"] = [np_kind, int(np_pos), int(np_has_gauss), float(np_gauss)]
    return meta, {"rng/torch": torch.get_rng_state(), "rng/numpy": torch.from_numpy(np_keys.astype(np.int64))}


def _refuse(path: Path, what: str) -> NoReturn:
    raise CheckpointError(f"{path}: {what}; {START_OVER}")


def _check(path: Path, key: str, value, rule: rules.Rule) -> None:
    if not rule.accepts(value):
        _refuse(path, f"{key}={reprlib.repr(value)} is invalid; allowed: {rule.allowed}")


def _rng_states(meta: dict, tensors: dict, path: Path) -> tuple:
    """The saved python, numpy, torch and data-order RNG states, each tried on a throwaway generator first."""
    try:
        version, state, gauss = meta["python"]
        kind, pos, has_gauss, np_gauss = meta["numpy"]
        states = (
            (version, tuple(state), gauss),
            (kind, tensors["rng/numpy"].numpy().astype(np.uint32), pos, has_gauss, np_gauss),
            tensors["rng/torch"],
            tensors["rng/data_order"],
        )
        random.Random().setstate(states[0])
        np.random.RandomState().set_state(states[1])
        for state in states[2:]:
            torch.Generator().set_state(state)
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        _refuse(path, f"rng={reprlib.repr(meta)} is not a saved random state ({str(error).splitlines()[0]})")
    return states


def check_state(meta, directory: Path) -> None:
    """state.json's structure (STATE_RULES; each optimizer moment named with its shape) and every tensor it names in
    state.safetensors (the moments of their shapes' sizes), read from the header: before any is used; else one line."""
    path = directory / STATE_JSON
    _check(path, "state", meta, OBJECT)
    for key, rule in STATE_RULES.items():
        section, _, name = key.partition(".")
        _check(path, key, meta[section].get(name) if name else meta.get(key), rule)
    optimizer, moments = meta["optimizer"], {}
    for index, keys in optimizer["state_keys"].items():
        if not (index.isdecimal() and NAMES.accepts(keys)):
            allowed = "a parameter's index: its moments' names"
            _refuse(path, f"optimizer.state_keys.{index}={reprlib.repr(keys)} is invalid; allowed: {allowed}")
        for key in keys:
            shape = optimizer["state_shapes"].get(f"{index}/{key}")
            _check(path, f"optimizer.state_shapes.{index}/{key}", shape, SHAPE)
            moments[f"opt/{index}/{key}"] = math.prod(shape)
    shapes = safetensors_shapes(directory / STATE_TENSORS)
    named = [*(f"param/{n}" for n in meta["parameters"]), *(f"best/{n}" for n in meta["best"]), *moments, *RNG_TENSORS]
    for name in named:
        if name not in shapes:
            _refuse(directory / STATE_TENSORS, f"no tensor '{name}' (named in {STATE_JSON})")
    for name, size in moments.items():
        if (found := math.prod(shapes[name])) != size:
            _refuse(path, f"optimizer.state_shapes.{name[4:]} has {size} entries, its tensor '{name}' {found}")


JSON_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "text", type(None): "null"}


def _misfit(saved, fresh, key: str) -> str | None:
    """Where `saved` (read from JSON) has not the structure of `fresh` (this run's state_dict), in words: every key of
    an object, lists of the same length, true/false, integers, numbers, text or null where it has them; else None."""
    if isinstance(fresh, dict):
        if not isinstance(saved, dict):
            return f"{key}={reprlib.repr(saved)} is invalid; allowed: an object"
        if missing := [k for k in fresh if k not in saved]:
            return f"{key}.{missing[0]} is missing"
        return next((m for k in fresh if (m := _misfit(saved[k], fresh[k], f"{key}.{k}"))), None)
    if isinstance(fresh, (list, tuple)):
        if not isinstance(saved, list) or len(saved) != len(fresh):
            return f"{key}={reprlib.repr(saved)} is invalid; allowed: a list of {len(fresh)}"
        return next((m for i, (s, f) in enumerate(zip(saved, fresh)) if (m := _misfit(s, f, f"{key}[{i}]"))), None)
    kind = (int, float) if isinstance(fresh, float) else type(fresh)
    if isinstance(saved, kind) and (isinstance(fresh, bool) or not isinstance(saved, bool)):
        return None
    return f"{key}={reprlib.repr(saved)} is invalid; allowed: {JSON_KINDS.get(type(fresh), type(fresh).__name__)}"


def _check_result(path: Path, saved: dict, result_type) -> None:
    """The saved result's fields: result_type's (best_state aside), each of its default's type, counts not below it."""
    defaults = {
        f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        for f in dataclasses.fields(result_type)
        if f.name != "best_state"
    }
    for name in sorted(set(defaults) ^ set(saved)):
        _refuse(path, f"result.{name} is {'missing' if name in defaults else 'not a field of the loop state'}")
    for name, default in defaults.items():
        value = saved[name]
        if isinstance(default, list):  # of any length
            _check(path, f"result.{name}", value, LIST)
        elif misfit := _misfit(value, default, f"result.{name}"):
            _refuse(path, misfit)
        elif isinstance(default, int) and value < default:
            _refuse(path, f"result.{name}={value!r} is invalid; allowed: an integer from {default}")


class Checkpointer:
    """Saves and restores the training state of one run in `<run dir>/resume/`."""

    def __init__(self, run_dir: Path, cfg, save_steps: int | None = None, writes: bool = True):
        self.directory = Path(run_dir) / "resume"
        self.writes = writes  # False on the other processes of a data-parallel run
        self.fingerprint = fingerprint(cfg)  # the whole computation (propetl/run/fingerprint.py)
        self.save_steps = save_steps
        self.extra: dict = {}  # e.g. the W&B run id, restored on load
        self._checked: dict | None = None  # state.json once check_fingerprint passed (until the next save)
        if writes:
            recover_folder_swap(self.directory)  # a kill inside the last save's folder swap

    def exists(self) -> bool:
        return (self.directory / STATE_JSON).exists()

    def saved_extra(self) -> dict:
        return (self._checked or self.check_fingerprint())["extra"] if self.exists() else {}

    def save(self, result, model, optimizer, scheduler, scaler, data_order_state: torch.Tensor) -> None:
        self._checked = None  # what was checked is about to be replaced
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
        meta = {
            "fingerprint": self.fingerprint,
            "result": fields,
            "rng": rng_meta,
            "extra": self.extra,
            "optimizer": {
                "param_groups": optimizer_state["param_groups"],
                "state_keys": {str(i): sorted(s) for i, s in optimizer_state["state"].items()},
                "state_shapes": {name: list(v.shape) for name, v in moments.items()},
            },
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "parameters": sorted(parameters),
            "best": sorted(result.best_state),
        }

        def build(folder: Path) -> None:
            save_file(tensors, str(folder / STATE_TENSORS))
            (folder / STATE_JSON).write_text(json.dumps(meta, default=float))
            seal(folder)
            for path in folder.iterdir():  # on disk before the swap makes it the checkpoint
                with open(path, "rb") as f:
                    os.fsync(f.fileno())

        write_folder_atomically(self.directory, build)

    def check_fingerprint(self) -> dict:
        """The saved state.json if its seal and this config's fingerprint match; else a one-line CheckpointError."""
        path = self.directory / STATE_JSON
        check_seal(self.directory, required=True, hint="trainer.resume=false starts the run over")
        try:
            meta = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CheckpointError(f"cannot read {path}: {error}") from None
        check_state(meta, self.directory)
        if changed := differences(meta.get("fingerprint", {}), self.fingerprint):
            raise CheckpointError(
                f"{self.directory} was trained with another config ({describe(changed)}); "
                f"use the same config or trainer.resume=false to start over"
            )
        self._checked = meta
        return meta

    def load(self, model, optimizer, scheduler, scaler, result_type):
        """Restore everything: (result, data order's state as the epoch began); checks the folder unless done."""
        meta = self._checked or self.check_fingerprint()
        tensors, _ = read_safetensors(self.directory / STATE_TENSORS)
        parameters = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self._check_fits(meta, tensors, parameters, optimizer, scheduler, scaler, result_type)
        rng = _rng_states(meta["rng"], tensors, self.directory / STATE_JSON)
        with torch.no_grad():  # all checked: nothing below refuses
            for name, parameter in parameters.items():
                parameter.copy_(tensors[f"param/{name}"])
        shapes = meta["optimizer"]["state_shapes"]
        state = {
            int(i): {k: tensors[f"opt/{i}/{k}"].reshape(shapes[f"{i}/{k}"]) for k in keys}
            for i, keys in meta["optimizer"]["state_keys"].items()
        }
        optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
        scheduler.load_state_dict(meta["scheduler"])
        scaler.load_state_dict(meta["scaler"])
        random.setstate(rng[0])
        np.random.set_state(rng[1])
        torch.set_rng_state(rng[2])
        result = result_type(**meta["result"], best_state={n: tensors[f"best/{n}"] for n in meta["best"]})
        self.extra = meta.get("extra", {})
        return result, tensors["rng/data_order"]

    def _check_fits(
        self, meta: dict, tensors: dict, parameters: dict, optimizer, scheduler, scaler, result_type
    ) -> None:
        """What state.json (after check_state) restores fits this run's model, optimizer, scheduler, scaler and result:
        checked before any of them is changed."""
        path = self.directory / STATE_JSON
        if sorted(parameters) != meta["parameters"]:
            _refuse(self.directory, "its trainable tensors do not match this model's (saved by an older propetl?)")
        tensors_file = self.directory / STATE_TENSORS
        for name in [*(f"param/{n}" for n in parameters), *(f"best/{n}" for n in meta["best"])]:
            target = parameters.get(name.partition("/")[2])
            if target is None:
                _refuse(tensors_file, f"'{name}' is none of this model's trainable tensors")
            if tensors[name].shape != target.shape:
                _refuse(
                    tensors_file, f"'{name}' has shape {tuple(tensors[name].shape)}, this model's {tuple(target.shape)}"
                )
        ordered = [p for group in optimizer.param_groups for p in group["params"]]
        for index, keys in meta["optimizer"]["state_keys"].items():
            if int(index) >= len(ordered):
                _refuse(
                    path, f"optimizer.state_keys.{index} is invalid; allowed: a parameter's index below {len(ordered)}"
                )
            for key in keys:
                shape, allowed = meta["optimizer"]["state_shapes"][f"{index}/{key}"], list(ordered[int(index)].shape)
                if shape not in ([], allowed):
                    allowed_text = f"[] or parameter {index}'s shape {allowed}"
                    _refuse(path, f"optimizer.state_shapes.{index}/{key}={shape} is invalid; allowed: {allowed_text}")
        for key, saved, fresh in (
            ("optimizer.param_groups", meta["optimizer"]["param_groups"], optimizer.state_dict()["param_groups"]),
            ("scheduler", meta["scheduler"], scheduler.state_dict()),
            ("scaler", meta["scaler"], scaler.state_dict()),
        ):
            if misfit := _misfit(saved, fresh, key):
                _refuse(path, f"{misfit} (this run's {key.partition('.')[0]} state)")
        _check_result(path, meta["result"], result_type)

    def discard(self) -> None:
        if self.writes:
            shutil.rmtree(self.directory, ignore_errors=True)
