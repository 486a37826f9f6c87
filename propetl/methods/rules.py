"""What a prototype's own settings may be: each prototype module declares SETTINGS, field -> Rule, and
validate.py turns a value a rule refuses into its one-line error (`prototype.r=0 is invalid; allowed: ...`).
Here, not in validate.py, so that prototype modules declare them without importing the validation; validate.py
checks every other config value through the same rules."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeGuard


@dataclass(frozen=True)
class Rule:
    accepts: Callable[[object], bool]
    allowed: str  # what the error says is allowed
    optional: bool = False  # the yaml may leave the key out


def is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def integer(optional: bool = False) -> Rule:
    return Rule(is_int, "an integer", optional)


def positive_int(optional: bool = False) -> Rule:
    return Rule(lambda v: is_int(v) and v > 0, "a positive integer", optional)


def positive_number(optional: bool = False) -> Rule:
    return Rule(lambda v: is_number(v) and v > 0, "a positive number", optional)


def one_of(choices: Iterable, optional: bool = False) -> Rule:
    choices = tuple(choices)
    return Rule(lambda v: v in choices, ", ".join(map(str, choices)), optional)


def distinct_list_of(choices: Iterable) -> Rule:
    choices = tuple(choices)
    return Rule(
        lambda v: isinstance(v, list) and bool(v) and set(v) <= set(choices) and len(set(v)) == len(v),
        f"a non-empty list drawn from {', '.join(choices)}",
    )
