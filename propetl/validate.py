"""Every config value checked before any work starts; each failure is ONE line naming the key, the
bad value and what is allowed (raised as ConfigError, printed by the entry point, exit code 2)."""
from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from propetl.configs import ConfigError, group_choices
from propetl.mask_coding import CODINGS
from propetl.masks import COMBINES, MASK_KINDS
from propetl.methods import METHODS, PROTOTYPES, peft_missing, rules
from propetl.accounting import STORAGE_DTYPES


MAX_LEARNING_RATE = 1e30


def _require(ok: bool, key: str, value, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid; allowed: {allowed}")


def _check(cfg, key: str, rule: rules.Rule) -> None:
    """cfg's value at `key` (a list or mapping as plain python) against `rule`: its one-line error if refused."""
    value = OmegaConf.select(cfg, key)
    value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    _require(rule.accepts(value), key, value, rule.allowed)


def _integer(cfg, key: str) -> None:
    _check(cfg, key, rules.integer())


def _positive_int(cfg, key: str) -> None:
    _check(cfg, key, rules.positive_int())


def _positive_number(cfg, key: str) -> None:
    _check(cfg, key, rules.positive_number())


def _learning_rate(cfg, key: str) -> None:
    """A positive number the optimizer's step can take in fp32 (beyond MAX_LEARNING_RATE AdamW's step
    size, lr / (1 - beta1^t), overflows: a traceback, not a diverged loss)."""
    value = OmegaConf.select(cfg, key)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= MAX_LEARNING_RATE
    _require(ok, key, value, f"a positive number up to {MAX_LEARNING_RATE:g}")


def _number_in(cfg, key: str, low: float, high: float, high_open: bool = True) -> None:
    value = OmegaConf.select(cfg, key)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value and (value < high if high_open else value <= high)
    _require(ok, key, value, f"a number in [{low}, {high}{')' if high_open else ']'}")


def _one_of(cfg, key: str, choices) -> None:
    _check(cfg, key, rules.one_of(choices))


def validate(cfg, search_path=None) -> None:
    """Raise ConfigError for the first invalid value (interpolations are resolved here too). Tasks are the
    task group's options on the config search path (None: the current run's; see propetl.configs)."""
    check_resolves(cfg)
    tasks_known = group_choices("task", search_path)
    _one_of(cfg, "task.name", tasks_known)
    validate_method(cfg)
    _integer(cfg, "seed")
    for key in ("trainer.epochs", "trainer.batch_size", "trainer.eval_batch_size", "trainer.log_every_steps",
                "data.max_length", "model.hidden_size", "model.num_layers"):
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
                 and set(tasks) <= set(tasks_known), "tasks", None if tasks is None else list(tasks),
                 f"a list of distinct tasks, e.g. tasks=[rte,mrpc,stsb,cola], from: {', '.join(tasks_known)}")
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
        _learning_rate(cfg, key)
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
    _learning_rate(cfg, "mask.lr")
    _number_in(cfg, "mask.weight_decay", 0.0, float("inf"))
    _integer(cfg, "mask.seed")
    for field, rule in PROTOTYPES[cfg.prototype.name].SETTINGS.items():   # the prototype module's own rules
        if not (rule.optional and field not in cfg.prototype):
            _check(cfg, f"prototype.{field}", rule)
    _learning_rate(cfg, "prototype.lr")
