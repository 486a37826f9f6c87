"""What a setting may be, and a prototype's settings as one dataclass. A Rule accepts a value or names what is
allowed; require() turns a refusal into the one-line error (`prototype.r=0 is invalid; allowed: ...`). Each prototype
module's dataclass (LoRAConfig, ...) extends PrototypeConfig: its fields are its yaml's keys, each field's rule is its
metadata (setting()), and the same object is what the module's specs/attach read, what validate.py checks and what
the Python API takes. Here, not in validate.py, so that prototype modules declare them without importing the
validation; validate.py checks every other config value through the same rules."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, TypeGuard

from omegaconf import OmegaConf

from propetl.configs import ConfigError

MAX_LEARNING_RATE = 1e30  # beyond it AdamW's step size, lr / (1 - beta1^t), overflows fp32: a traceback
MAX_SEED = 2**63 - 1  # int64 (mask.seed + 7919 still fits torch's uint64 seeds); datasets wants >= 0


@dataclass(frozen=True)
class Rule:
    accepts: Callable[[object], bool]
    allowed: str  # what the error says is allowed


def require(ok: bool, key: str, value: object, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid; allowed: {allowed}")


def is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def integer() -> Rule:
    return Rule(is_int, "an integer")


def positive_int() -> Rule:
    return Rule(lambda v: is_int(v) and v > 0, "a positive integer")


def positive_number() -> Rule:
    return Rule(lambda v: is_number(v) and v > 0, "a positive number")


def number_in(low: float, high: float, high_open: bool = True) -> Rule:
    return Rule(
        lambda v: is_number(v) and low <= v and (v < high if high_open else v <= high),
        f"a number in [{low}, {high}{')' if high_open else ']'}",
    )


def one_of(choices: Iterable) -> Rule:
    choices = tuple(choices)
    return Rule(lambda v: v in choices, ", ".join(map(str, choices)))


def distinct_list_of(choices: Iterable) -> Rule:
    choices = tuple(choices)
    return Rule(
        lambda v: isinstance(v, (list, tuple)) and bool(v) and set(v) <= set(choices) and len(set(v)) == len(v),
        f"a non-empty list drawn from {', '.join(choices)}",
    )


LEARNING_RATE = Rule(
    lambda v: is_number(v) and 0 < v <= MAX_LEARNING_RATE, f"a positive number up to {MAX_LEARNING_RATE:g}"
)
BOOLEAN = Rule(lambda v: isinstance(v, bool), "true or false")
SEED = Rule(lambda v: is_int(v) and 0 <= v <= MAX_SEED, f"an integer in 0..{MAX_SEED} (2**63-1)")


def setting(rule: Rule | None = None, default: Any = None, shape: bool = False, **unknown: Any) -> Any:
    """A prototype setting: its rule, its default (None: the yaml's, which may scale with the hidden size; a key older
    configs lack has a real one) and whether a multi-task base checkpoint must match it (shape). `unknown` keywords:
    check_definition names them with their field."""
    return field(default=default, metadata={"rule": rule, "shape": shape, "unknown": sorted(unknown)})


@dataclass
class PrototypeConfig:
    """The keys every prototype's yaml holds; a subclass adds its own settings (`name` defaults to its name)."""

    name: str = ""
    lr: float = setting(LEARNING_RATE)  # its weights' learning rate (trainer.lr follows it)
    mask_sparsity: float = setting(number_in(0.0, 1.0))  # the default mask.sparsity
    mask_lr: float = setting(LEARNING_RATE)  # the default mask.lr
    freeze: bool = setting(BOOLEAN, False)  # true: drawn from `seed`, never trained (method=propetl)
    seed: int = setting(SEED, 0)  # freeze: the seed the prototype is drawn from

    @classmethod
    def from_config(cls, prototype) -> PrototypeConfig:
        """From a composed `cfg.prototype` (resolved; keys that are not fields, as `module`, left out)."""
        values = OmegaConf.to_container(prototype, resolve=True) if OmegaConf.is_config(prototype) else prototype
        assert isinstance(values, Mapping)
        return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})

    @classmethod
    def own_settings(cls) -> list[str]:
        """The subclass's own fields, the prototype's hyper-parameters (r, alpha, targets for LoRA)."""
        return [f.name for f in fields(cls) if f.name not in {f.name for f in fields(PrototypeConfig)}]

    @classmethod
    def shape_keys(cls) -> list[str]:
        """The settings a multi-task base checkpoint must match."""
        return [f.name for f in fields(cls) if f.metadata.get("shape")]

    def given(self) -> dict[str, Any]:
        """field -> value of every field set (not None)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def check(self, prefix: str = "", names: Mapping[str, str] | None = None, skip_unset: bool = False) -> None:
        """Each field's value against its rule: a refusal's one-line error names `prefix` + the field (or its name in
        `names`); skip_unset: None (the yaml's default) passes."""
        for f in fields(self):
            rule, value = f.metadata.get("rule"), getattr(self, f.name)
            if rule is not None and not (skip_unset and value is None):
                require(rule.accepts(value), prefix + (names or {}).get(f.name, f.name), value, rule.allowed)

    @staticmethod
    def check_definition(config_class: Any, prototype: str) -> None:
        """A prototype module's CONFIG, or a one-line TypeError naming the prototype and the field at fault."""
        where = f"prototype {prototype}: CONFIG"
        if not (isinstance(config_class, type) and issubclass(config_class, PrototypeConfig)):
            raise TypeError(f"{where} is not a rules.PrototypeConfig dataclass")
        for f in fields(config_class):
            if f.default is f.default_factory:  # both dataclasses.MISSING
                raise TypeError(f"{where}.{f.name} has no default; give it one (rules.setting(rule, default))")
            if f.metadata.get("unknown"):
                unknown = ", ".join(f.metadata["unknown"])
                raise TypeError(f"{where}.{f.name}: rules.setting() takes rule, default, shape, not {unknown}")
