"""Every config value checked before any work starts; each failure is ONE line naming the key, the
bad value and what is allowed (raised as ConfigError, printed by the entry point, exit code 2)."""

from __future__ import annotations

import math
from pathlib import Path

from omegaconf import OmegaConf

from propetl.configs import ConfigError, PeftGroup, group_choices, group_option
from propetl.data.generation_eval import GENERATION_METRICS
from propetl.data.metrics import metrics_for, selections_for
from propetl.data.tasks import encoder_tasks, is_generation_task
from propetl.data.text_to_text import FIELDS as text_to_text_tasks
from propetl.methods import METHODS, PROTOTYPES, peft_missing, peft_module, rules
from propetl.methods.masks import COMBINES, MASK_KINDS
from propetl.methods.rules import BOOLEAN, LEARNING_RATE, MAX_SEED, SEED  # noqa: F401 (MAX_SEED: tests)
from propetl.models import backbone
from propetl.models.t5 import check_t5_setup
from propetl.storage.accounting import STORAGE_DTYPES
from propetl.storage.mask_coding import CODINGS

NULLABLE: tuple[str, ...] = ("trainer.max_steps", "trainer.save_steps", "trainer.threads", "data.max_train_examples")
NULLABLE += ("trainer.selection_skips_warmup",)  # absent from configs saved before it existed: false
NULLABLE += ("trainer.warmup_steps", "trainer.eval_every_steps", "trainer.mask_lr_ratio")
POSITIVE = rules.positive_int()
MODEL_FAMILIES = ("encoder", "t5")  # model.family: a classification head per task | text to text (models/t5.py)
RUN_RULES = {  # checked in this order; a key of NULLABLE may also be null
    "seed": SEED,
    "model.name_or_path": rules.Rule(lambda v: isinstance(v, str) and bool(v.strip()), backbone.MODEL_PATHS),
    **dict.fromkeys(("trainer.epochs", "trainer.batch_size", "trainer.log_every_steps", "data.max_length"), POSITIVE),
    **dict.fromkeys(("model.hidden_size", "model.num_layers", "trainer.max_steps"), POSITIVE),
    "trainer.eval_batch_size": rules.Rule(lambda v: v == "auto" or POSITIVE.accepts(v), "auto or a positive integer"),
    "trainer.lr": LEARNING_RATE,
    "trainer.head_lr": LEARNING_RATE,
    "trainer.weight_decay": rules.number_in(0.0, float("inf")),
    "trainer.max_grad_norm": rules.positive_number(),
    "trainer.warmup_ratio": rules.number_in(0.0, 1.0),
    "trainer.precision": rules.one_of(("fp32", "bf16", "fp16")),
    "trainer.device": rules.Rule(
        lambda v: isinstance(v, str) and (v in ("auto", "cpu", "cuda") or v.startswith("cuda:")),
        "auto, cpu, cuda, cuda:N",
    ),
    "trainer.save_steps": POSITIVE,
    "trainer.resume": rules.one_of(("auto", True, False)),
    "trainer.threads": POSITIVE,
    "data.protocol": rules.one_of(("split", "full_dev")),
    **dict.fromkeys(("data.group_by_length", "trainer.selection_skips_warmup"), BOOLEAN),
    "data.max_train_examples": POSITIVE,
    "data.split_seed": SEED,
    "logger.mode": rules.one_of(("online", "offline", "disabled")),
    "storage.mask_coding": rules.one_of(CODINGS),
    "storage.dtype": rules.one_of(STORAGE_DTYPES),
    "mode": rules.one_of(("single", "multitask")),
    "model.family": rules.Rule(
        lambda v: v is None or v in MODEL_FAMILIES, f"{', '.join(MODEL_FAMILIES)} (absent: encoder)"
    ),
    **dict.fromkeys(("trainer.warmup_steps", "trainer.eval_every_steps"), POSITIVE),
    "trainer.mask_lr_ratio": rules.positive_number(),
    "trainer.label_smoothing": rules.number_in(0.0, 1.0),
    "mask.combine": rules.one_of(COMBINES),
}
MASK_RULES = {
    "mask.kind": rules.one_of(MASK_KINDS),
    "mask.sparsity": rules.number_in(0.0, 1.0),
    "mask.lr": LEARNING_RATE,
    "mask.weight_decay": rules.number_in(0.0, float("inf")),
    "mask.seed": SEED,
}  # checked in this order, with the method (validate_method)
_UNSET = object()
LEARNING_RATE_KEYS = ("trainer.lr", "trainer.head_lr", "trainer.weight_decay")  # what the optimizer's groups read


def _check(cfg, key: str, rule: rules.Rule) -> None:
    """cfg's value at `key` (a list or mapping as plain python) against `rule`: its one-line error if refused."""
    value = OmegaConf.select(cfg, key)
    value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    rules.require(rule.accepts(value), key, value, rule.allowed)


def validate(cfg, search_path=None) -> None:
    """Raise ConfigError for the first invalid value (interpolations are resolved here too). Tasks are the
    task group's options on the config search path (None: the current run's; see propetl.configs)."""
    cfg = OmegaConf.create(OmegaConf.to_container(cfg))  # untyped: a bad value is its rule's line, not its schema's
    check_peft_prototype(cfg)  # before resolving: peft=lora reads prototype=lora's settings
    text_to_text = is_text_to_text(cfg)
    if not text_to_text:
        check_encoder_task(cfg.get("task"))  # before resolving: ${task.epochs} is GLUE's
    check_resolves(cfg)
    tasks_known = group_choices("task", search_path)
    _check(cfg, "task.name", rules.one_of(tasks_known))
    _check(cfg, "seed", SEED)  # before mask.seed, which is ${seed} unless set
    validate_method(cfg)
    for key, rule in RUN_RULES.items():
        if not (key in NULLABLE and OmegaConf.select(cfg, key, default=_UNSET) is None):  # ??? is not null
            _check(cfg, key, rule)
    base = OmegaConf.select(cfg, "multitask.base_checkpoint", default=None)
    if cfg.mode != "multitask":
        allowed = "null unless mode=multitask (it adds tasks to a multi-task checkpoint)"
        rules.require(base is None, "multitask.base_checkpoint", base, allowed)
        validate_task(cfg, text_to_text)
    else:
        tasks = None if cfg.tasks is None else list(cfg.tasks)
        allowed = f"a list of distinct tasks, e.g. tasks=[rte,mrpc,stsb,cola], from: {', '.join(tasks_known)}"
        listed = OmegaConf.is_list(cfg.tasks) and rules.distinct_list_of(tasks_known).accepts(tasks)
        rules.require(listed, "tasks", tasks, allowed)
        allowed = "propetl or petl with mode=multitask (one shared prototype / one shared module per layer)"
        allowed += ", or finetune with model.family=t5 (one T5 for every task, the task name before each source)"
        multitask_methods = ("propetl", "petl", "finetune") if text_to_text else ("propetl", "petl")
        rules.require(cfg.method.name in multitask_methods, "method.name", cfg.method.name, allowed)
        _check(cfg, "multitask.temperature", rules.positive_number())
        allowed = "null or the checkpoint folder of a finished multi-task run"
        rules.require(base is None or Path(str(base)).is_dir(), "multitask.base_checkpoint", base, allowed)
        allowed = "null with model.family=t5 (adding tasks to a T5 checkpoint is not supported yet)"
        rules.require(base is None or not text_to_text, "multitask.base_checkpoint", base, allowed)
        for name in cfg.tasks:
            try:
                validate_task(OmegaConf.create({"task": group_option("task", name, search_path)}), text_to_text)
            except ConfigError as error:
                raise ConfigError(f"tasks: {name}: {error}") from None
    if cfg.method.name == "peft":
        allowed = "fp32 with method=peft (the checkpoint keeps PEFT's own adapter file, in the tuner's dtype)"
        rules.require(cfg.storage.dtype == "fp32", "storage.dtype", cfg.storage.dtype, allowed)
    if text_to_text:
        try:
            check_t5_setup(cfg.method.name, cfg.prototype.name)
        except backbone.ModelError as error:
            raise ConfigError(str(error)) from None
    validate_model(cfg)


def is_text_to_text(cfg) -> bool:
    """model.family=t5: the text-to-text runner (TextToTextModel, generation-based evaluation)."""
    return OmegaConf.select(cfg, "model.family", default="encoder") == "t5"


def validate_generation_task(cfg) -> None:
    """A generation task's yaml (XSum, WMT16), what its data and scoring read."""
    allowed = f"a non-empty list of distinct metrics of a generation task, from: {', '.join(GENERATION_METRICS)}"
    _check(cfg, "task.metrics", rules.Rule(rules.distinct_list_of(GENERATION_METRICS).accepts, allowed))
    for key in ("task.max_new_tokens", "task.num_beams", "task.lengths.source", "task.lengths.target"):
        _check(cfg, key, POSITIVE)


def validate_task(cfg, text_to_text: bool = False) -> None:
    """A task's config (conf/task/*.yaml or a user's), what loading and scoring its data read: label count, size,
    metrics the task can report, the selection metric among them, label names and a regression label range; and what
    tables read (`report`: a title, an order, the paper's numbers, each optional)."""

    def optional(key: str, accepts, allowed: str) -> None:  # null, or a value `accepts` takes
        _check(cfg, key, rules.Rule(lambda v: v is None or accepts(v), allowed))

    if text_to_text and is_generation_task(cfg.task):
        validate_generation_task(cfg)
        return
    if text_to_text and cfg.task.get("name") not in text_to_text_tasks:
        allowed = f"a task with a text-to-text format with model.family=t5: {', '.join(text_to_text_tasks)}, xsum, …"
        rules.require(False, "task.name", cfg.task.get("name"), allowed)
    check_encoder_task(cfg.task)
    _check(cfg, "task.num_labels", rules.positive_int())
    _check(cfg, "task.size", rules.one_of(("small", "large")))
    labels, known = cfg.task.num_labels, metrics_for(cfg.task.num_labels)
    allowed = f"a non-empty list of distinct metrics for num_labels={labels}, from: {', '.join(known)}"
    _check(cfg, "task.metrics", rules.Rule(rules.distinct_list_of(known).accepts, allowed))
    _check(cfg, "task.selection_metric", rules.one_of(selections_for(list(cfg.task.metrics))))
    names = lambda v: isinstance(v, list) and len(v) == labels and len(set(map(str, v))) == labels
    optional("task.label_names", names, f"null or a list of {labels} distinct names (num_labels={labels})")
    bounds = lambda v: isinstance(v, list) and len(v) == 2 and all(rules.is_number(x) and math.isfinite(x) for x in v)
    allowed = "null, or [low, high] with low < high on a regression task (num_labels: 1)"
    optional("task.label_range", lambda v: labels == 1 and bounds(v) and v[0] < v[1], allowed)
    optional("task.report", lambda v: isinstance(v, dict), "null or a mapping")
    optional("task.report.title", lambda v: isinstance(v, str) and bool(v.strip()), "null or a title")
    optional("task.report.order", rules.positive_int().accepts, "null or a positive integer")
    count = len(cfg.task.metrics)
    numbers = lambda n: isinstance(n, list) and len(n) == count and all(map(rules.is_number, n))
    allowed = f"null, or row label -> a list of len(task.metrics)={count} numbers (x100)"
    optional("task.report.paper", lambda v: isinstance(v, dict) and all(map(numbers, v.values())), allowed)


def check_encoder_task(task) -> None:
    """A generation task (`kind: generation`: XSum, WMT16) refused in one line: it needs a text-to-text model."""
    if is_generation_task(task):
        raise ConfigError(
            f"task={task.get('name')} needs a text-to-text model (model=t5-…): it is a generation task, which a "
            f"classification head cannot train; tasks for this runner: {', '.join(encoder_tasks())}"
        )


def validate_model(cfg) -> None:
    """The model's folder (a pkg:// one too) is there, and data.max_length fits its positions: read from its
    config.json before anything loads (a hub id not in the local cache is left to the loader)."""
    positions = backbone.max_positions(cfg.model.name_or_path)
    allowed = f"1..{positions}, the positions of model.name_or_path={cfg.model.name_or_path}"
    rules.require(
        positions is None or cfg.data.max_length <= positions, "data.max_length", cfg.data.max_length, allowed
    )


def check_resolves(cfg) -> None:
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except Exception as error:  # noqa: BLE001 (an interpolation that does not resolve, e.g. a non-numeric size)
        raise ConfigError(f"config does not resolve: {str(error).splitlines()[0]}") from None


def validate_learning_rates(cfg) -> None:
    """What the optimizer's parameter groups take from the trainer group (loop.parameter_groups)."""
    for key in LEARNING_RATE_KEYS:
        _check(cfg, key, RUN_RULES[key])


def check_peft_prototype(cfg) -> None:
    """method=peft needs a peft group (conf/peft/); peft=lora, the reference row, takes prototype=lora's settings."""
    if OmegaConf.select(cfg, "method.name") != "peft":
        return
    allowed = f"a tuner with method=peft: peft={'|'.join(group_choices('peft'))} (conf/peft/<name>.yaml)"
    rules.require(OmegaConf.is_dict(cfg.get("peft")), "peft", cfg.get("peft"), allowed)
    if cfg.peft.get("name") == "lora":
        allowed = "lora with method=peft peft=lora (PEFT's LoRA takes r, alpha, targets and lr from prototype=lora)"
        rules.require(cfg.prototype.name == "lora", "prototype.name", cfg.prototype.name, allowed)


def validate_method(cfg) -> None:
    """The method's part of a config (method, prototype, mask): what the runner and the Python API share."""
    _check(cfg, "method.name", rules.one_of(METHODS))
    _check(cfg, "prototype.name", rules.one_of(PROTOTYPES))
    if cfg.method.name == "peft":
        check_peft_prototype(cfg)
        if missing := peft_missing():
            raise ConfigError(missing)
        if refused := peft_module().refusal(PeftGroup.from_config(cfg.peft)):
            raise ConfigError(refused)
        for key in cfg.peft.get("lrs") or {}:  # tensors at their own lr (VB-LoRA's bank)
            _check(cfg, f"peft.lrs.{key}", LEARNING_RATE)
    for key, rule in MASK_RULES.items():
        _check(cfg, key, rule)
    prototype = PROTOTYPES[cfg.prototype.name].CONFIG.from_config(cfg.prototype)
    prototype.check("prototype.")  # its dataclass's rules
    if prototype.freeze:
        why = "a frozen, seeded prototype is ProPETL's: masks learn over it; method=propetl"
        rules.require(
            cfg.method.name == "propetl", "prototype.freeze", True, f"false with method={cfg.method.name} ({why})"
        )
