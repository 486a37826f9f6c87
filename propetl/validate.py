"""Every config value checked before any work starts; each failure is ONE line naming the key, the
bad value and what is allowed (raised as ConfigError, printed by the entry point, exit code 2)."""
from __future__ import annotations

import difflib
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from propetl.mask_coding import CODINGS
from propetl.masks import COMBINES, MASK_KINDS
from propetl.methods import METHODS, PROTOTYPES, peft_missing
from propetl.storage import STORAGE_DTYPES

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
SWEEP_FUNCTIONS = ("glob(", "range(", "choice(", "interval(", "[")     # a group swept by a function: not checked
GROUPS = ("model", "task", "prototype", "method", "mask", "trainer", "logger", "data", "experiment", "profile")


class ConfigError(ValueError):
    """One-line, user-facing configuration error."""


def group_choices(group: str) -> list[str]:
    """The options of a config group: the YAML files in conf/<group>/."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def check_group_override(group: str, value: str) -> None:
    choices = group_choices(group)
    if value not in choices and value != "null":
        raise ConfigError(f"{group}={value} is not a known {group}; choose one of: {', '.join(choices)}")


def check_command_line(arguments: list[str]) -> None:
    """Catch unknown group options (task=nope) and unknown keys (+trainer.max_step=3) before Hydra composes,
    with one line instead of Hydra's page (or, for a `+` key, instead of silence). Sweeps (task=rte,mrpc)
    are checked value by value."""
    groups, keys = {}, []
    for argument in arguments:
        if argument.startswith("-"):                       # -m, --multirun, --cfg job
            continue
        prefix = argument[:len(argument) - len(argument.lstrip("+~"))]
        key, sep, value = argument[len(prefix):].partition("=")
        if key in GROUPS:
            if sep and not value.startswith(SWEEP_FUNCTIONS):
                for one in value.split(","):
                    check_group_override(key, one.strip())
                groups[key] = [one.strip() for one in value.split(",")]
        elif (sep or prefix) and not key.startswith("hydra") and not set("/@") & set(key):
            keys.append((argument, key))
    if keys:
        check_keys_known(keys, groups)


def config_keys(node, prefix: str = "") -> set[str]:
    """Every dotted key of a config (sections and values), without resolving interpolations."""
    keys = set()
    for name in node.keys():
        key = f"{prefix}{name}"
        keys.add(key)
        child = node._get_node(name)
        if isinstance(child, DictConfig) and not child._is_none() and not child._is_interpolation():
            keys |= config_keys(child, f"{key}.")
    return keys


def known_keys(groups: dict[str, list[str]]) -> set[str] | None:
    """The keys of the config the command's group choices compose (every value of a swept group);
    None if they do not compose (Hydra then says why)."""
    from hydra import compose, initialize_config_dir

    first = {group: f"{group}={values[0]}" for group, values in groups.items()}
    choices = [list(first.values())]
    for group, values in groups.items():
        choices += [[*(o for g, o in first.items() if g != group), f"{group}={value}"] for value in values[1:]]
    keys = set()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        for overrides in choices:
            try:
                keys |= config_keys(compose(config_name="train", overrides=overrides)) - {"hydra"}
            except Exception:           # noqa: BLE001  (Hydra's composition errors have no common type)
                return None
    return keys


def check_keys_known(keys: list[tuple[str, str]], groups: dict[str, list[str]]) -> None:
    """(argument, dotted key) pairs whose key the composed config lacks: refused, with the nearest known key."""
    known = known_keys(groups)
    for argument, key in keys if known is not None else ():
        if key not in known:
            near = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"did you mean {near[0]}?" if near else "`propetl-train --cfg job` lists the keys"
            raise ConfigError(f"{argument}: {key} is not a config key; {hint}")


def _require(ok: bool, key: str, value, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid; allowed: {allowed}")


def _integer(cfg, key: str) -> None:
    value = OmegaConf.select(cfg, key)
    _require(isinstance(value, int) and not isinstance(value, bool), key, value, "an integer")


def _positive_int(cfg, key: str) -> None:
    value = OmegaConf.select(cfg, key)
    _require(isinstance(value, int) and not isinstance(value, bool) and value > 0, key, value, "a positive integer")


def _positive_number(cfg, key: str) -> None:
    value = OmegaConf.select(cfg, key)
    _require(isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0, key, value, "a positive number")


def _number_in(cfg, key: str, low: float, high: float, high_open: bool = True) -> None:
    value = OmegaConf.select(cfg, key)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value and (value < high if high_open else value <= high)
    _require(ok, key, value, f"a number in [{low}, {high}{')' if high_open else ']'}")


def _one_of(cfg, key: str, choices) -> None:
    value = OmegaConf.select(cfg, key)
    _require(value in choices, key, value, ", ".join(map(str, choices)))


def validate(cfg) -> None:
    """Raise ConfigError for the first invalid value (interpolations are resolved here too)."""
    check_resolves(cfg)
    _one_of(cfg, "task.name", group_choices("task"))
    validate_method(cfg)
    _integer(cfg, "seed")
    for key in ("trainer.epochs", "trainer.batch_size", "trainer.eval_batch_size", "data.max_length",
                "model.hidden_size", "model.num_layers"):
        _positive_int(cfg, key)
    if cfg.trainer.max_steps is not None:
        _positive_int(cfg, "trainer.max_steps")
    validate_learning_rates(cfg)
    _positive_number(cfg, "trainer.max_grad_norm")
    _number_in(cfg, "trainer.warmup_ratio", 0.0, 1.0)
    _one_of(cfg, "trainer.precision", ("fp32", "bf16", "fp16"))
    device = cfg.trainer.device
    _require(isinstance(device, str) and (device in ("auto", "cpu", "cuda") or device.startswith("cuda:")),
             "trainer.device", device, "auto, cpu, cuda, cuda:N")
    if cfg.trainer.save_steps is not None:
        _positive_int(cfg, "trainer.save_steps")
    _one_of(cfg, "trainer.resume", ("auto", True, False))
    if cfg.trainer.threads is not None:
        _positive_int(cfg, "trainer.threads")
    _one_of(cfg, "data.protocol", ("split", "full_dev"))
    _require(isinstance(cfg.data.group_by_length, bool), "data.group_by_length", cfg.data.group_by_length, "true or false")
    if cfg.data.max_train_examples is not None:
        _positive_int(cfg, "data.max_train_examples")
    _integer(cfg, "data.split_seed")
    _one_of(cfg, "logger.mode", ("online", "offline", "disabled"))
    _one_of(cfg, "storage.mask_coding", CODINGS)
    _one_of(cfg, "storage.dtype", tuple(STORAGE_DTYPES))
    _one_of(cfg, "mode", ("single", "multitask"))
    _one_of(cfg, "mask.combine", COMBINES)
    if cfg.mode == "multitask":
        tasks = cfg.tasks
        _require(OmegaConf.is_list(tasks) and len(tasks) > 0 and len(set(tasks)) == len(tasks)
                 and set(tasks) <= set(group_choices("task")), "tasks", None if tasks is None else list(tasks),
                 f"a list of distinct GLUE tasks, e.g. tasks=[rte,mrpc,stsb,cola], from: {', '.join(group_choices('task'))}")
        _require(cfg.method.name in ("propetl", "petl"), "method.name", cfg.method.name,
                 "propetl or petl with mode=multitask (one shared prototype / one shared module per layer)")
        _positive_number(cfg, "multitask.temperature")
        base = cfg.multitask.base_checkpoint
        _require(base is None or Path(str(base)).is_dir(), "multitask.base_checkpoint", base,
                 "null or the checkpoint folder of a finished multi-task run")


def check_resolves(cfg) -> None:
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except Exception as error:  # an interpolation that does not resolve, e.g. a non-numeric size
        raise ConfigError(f"config does not resolve: {str(error).splitlines()[0]}") from None


def validate_learning_rates(cfg) -> None:
    """What the optimizer's parameter groups take from the trainer group (loop.parameter_groups)."""
    for key in ("trainer.lr", "trainer.head_lr"):
        _positive_number(cfg, key)
    _number_in(cfg, "trainer.weight_decay", 0.0, float("inf"))


def validate_method(cfg) -> None:
    """The method's part of a config (method, prototype, mask): what the runner and the Python API share."""
    _one_of(cfg, "method.name", METHODS)
    _one_of(cfg, "prototype.name", tuple(PROTOTYPES))
    if cfg.method.name == "peft":
        _require(cfg.prototype.name == "lora", "prototype.name", cfg.prototype.name,
                 "lora with method=peft (the PEFT reference row is LoRA only)")
        missing = peft_missing()
        if missing:
            raise ConfigError(missing)
    _one_of(cfg, "mask.kind", MASK_KINDS)
    _number_in(cfg, "mask.sparsity", 0.0, 1.0)
    _positive_number(cfg, "mask.lr")
    _number_in(cfg, "mask.weight_decay", 0.0, float("inf"))
    _integer(cfg, "mask.seed")
    name = cfg.prototype.name
    if name == "adapter":
        _positive_int(cfg, "prototype.reduction_factor")
        _positive_int(cfg, "prototype.bottleneck")
        _one_of(cfg, "prototype.non_linearity", ("relu", "gelu", "tanh"))
    elif name == "lora":
        _positive_int(cfg, "prototype.r")
        _positive_number(cfg, "prototype.alpha")
        targets = list(cfg.prototype.targets)
        _require(bool(targets) and set(targets) <= {"query", "key", "value"} and len(set(targets)) == len(targets),
                 "prototype.targets", targets, "a non-empty list drawn from query, key, value")
    elif name == "prefix":
        _positive_int(cfg, "prototype.length")
        _positive_int(cfg, "prototype.mlp_hidden")
        if "embedding_std" in cfg.prototype:
            _positive_number(cfg, "prototype.embedding_std")
    _positive_number(cfg, "prototype.lr")
