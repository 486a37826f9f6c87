"""propetl-train's command line checked against the config tree (with the user's --config-dir, hydra.searchpath) before
Hydra composes: unknown group options (task=nope), keys (+trainer.max_step=3) and a typed group's values of the wrong
type (trainer.batch_size=abc) give one line, not Hydra's page.
Light on purpose (Hydra and OmegaConf only): it runs before anything heavy is imported."""

from __future__ import annotations

import difflib
from collections.abc import Sequence

import yaml
from omegaconf import DictConfig

from propetl.configs import PRIMARY_CONFIG, SCHEMAS, ConfigError, compose, config_dir_entry, require_option

SWEEP_FUNCTIONS = ("glob(", "range(", "choice(", "interval(", "[")  # a group swept by a function: not checked
GROUPS: tuple[str, ...] = ("model", "task", "prototype", "method", "peft", "mask", "mode", "trainer", "logger", "data")
GROUPS += ("experiment", "profile")
HYDRA_ANSWERS = ("help", "hydra_help", "shell_completion", "info")  # flags Hydra answers without a run


def parse(arguments: Sequence[str]):
    """Hydra's own reading of a command line (flags, --config-dir, and the overrides)."""
    from hydra._internal.utils import get_args_parser

    return get_args_parser().parse_args(list(arguments))


def search_path_of(args) -> list[str]:
    """The folders a command line adds to the shipped configs: hydra.searchpath=[...] and --config-dir."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    search_path, given = [], [o for o in args.overrides if o.startswith("hydra.searchpath=")]
    for override in OverridesParser.create().parse_overrides(given):
        if isinstance(value := override.value(), list):  # not a list: Hydra refuses it in one line
            search_path += value
    if args.config_dir is not None:
        search_path.append(config_dir_entry(args.config_dir))
    return search_path


def check_command_line(arguments: Sequence[str]) -> None:
    """Unknown group options and keys of a propetl-train command line, refused in one line; sweeps (task=rte,mrpc) value
    by value; --help, -sc, --info and --config-path are left to Hydra."""
    args = parse(arguments)
    if any(getattr(args, flag) for flag in HYDRA_ANSWERS) or args.config_path is not None:
        return
    search_path = search_path_of(args)
    groups, keys = {}, []
    for argument in args.overrides:
        prefix = argument[: len(argument) - len(argument.lstrip("+~"))]
        key, sep, value = argument[len(prefix) :].partition("=")
        if key in GROUPS:
            if sep and not value.startswith(SWEEP_FUNCTIONS):
                for one in value.split(","):
                    require_option(key, one.strip(), search_path)
                groups[key] = [one.strip() for one in value.split(",")]
        elif (sep or prefix) and not key.startswith("hydra") and not set("/@") & set(key):
            keys.append((argument, key))
    if "peft" in groups and "peft" not in groups.get("method", ()):
        allowed = "method=peft peft=<tuner> (peft chooses method=peft's PEFT tuner)"
        raise ConfigError(f"peft={','.join(groups['peft'])} is invalid without method=peft; allowed: {allowed}")
    if keys or search_path:  # a user's folder: its chosen files compose (a broken YAML file is one line)
        check_keys_known(keys, groups, search_path, args.config_name or PRIMARY_CONFIG)


def config_keys(node, prefix: str = "") -> set[str]:
    """Every dotted key of a config (sections and values), without resolving interpolations."""
    keys = set()
    for name in node:
        key = f"{prefix}{name}"
        keys.add(key)
        child = node._get_node(name)
        if isinstance(child, DictConfig) and not child._is_none() and not child._is_interpolation():
            keys |= config_keys(child, f"{key}.")
    return keys


def known_keys(
    groups: dict[str, list[str]], search_path: Sequence[str] = (), config_name: str = PRIMARY_CONFIG
) -> set[str] | None:
    """The keys of the config each group choice composes; None if they do not compose (Hydra then says why)."""
    first = {group: f"{group}={values[0]}" for group, values in groups.items()}
    choices = [list(first.values())]
    for group, values in groups.items():
        choices += [[*(o for g, o in first.items() if g != group), f"{group}={value}"] for value in values[1:]]
    keys = set()
    for overrides in choices:
        try:
            cfg = compose(overrides, search_path, config_name)
        except yaml.MarkedYAMLError as error:  # a user's file that is not YAML: name it, not Hydra's traceback
            mark = error.problem_mark or error.context_mark
            where = f"{mark.name}, line {mark.line + 1}" if mark else "a config file"
            raise ConfigError(f"{where}: not valid YAML: {error.problem or error.context}; fix the file") from None
        except ConfigError:  # a value or key a typed group's schema refuses (a user's file)
            raise
        except Exception:  # noqa: BLE001  (Hydra's composition errors have no common type)
            return None
        keys |= config_keys(cfg) - {"hydra"}
    return keys


def check_value_types(
    arguments: list[str], groups: dict[str, list[str]], search_path: Sequence[str], config_name: str
) -> None:
    """The values given to the typed groups' keys (configs.SCHEMAS), each swept value once, composed with the first
    group choices: a value of the wrong type is compose's one line (ConfigError), not Hydra's page."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    first = [f"{group}={values[0]}" for group, values in groups.items()]
    single, swept = [], []
    for argument, override in zip(arguments, OverridesParser.create().parse_overrides(arguments)):
        if override.is_delete() or override.key_or_group.split(".")[0] not in SCHEMAS:
            continue
        if not override.is_sweep_override():
            single.append(argument)
        elif not override.is_interval_sweep():
            swept += [[f"{override.get_key_element()}={value}"] for value in override.sweep_string_iterator()]
    for overrides in [single, *swept] if single else swept:
        try:
            compose([*first, *overrides], search_path, config_name)
        except ConfigError:
            raise
        except Exception:  # noqa: BLE001  (another composition error: Hydra says why)
            return


def check_keys_known(
    keys: list[tuple[str, str]],
    groups: dict[str, list[str]],
    search_path: Sequence[str] = (),
    config_name: str = PRIMARY_CONFIG,
) -> None:
    """(argument, dotted key) pairs whose key the composed config lacks: refused, with the nearest known key."""
    known = known_keys(groups, search_path, config_name)
    if known is None:
        return
    for argument, key in keys:
        if key not in known:
            near = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"did you mean {near[0]}?" if near else "`propetl-train --cfg job` lists the keys"
            raise ConfigError(f"{argument}: {key} is not a config key; {hint}")
    check_value_types([argument for argument, _ in keys], groups, search_path, config_name)
