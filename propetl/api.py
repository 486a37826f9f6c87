"""The public Python API, in the style of Hugging Face PEFT: ProPETL on one's own BERT/RoBERTa-family
`*ForSequenceClassification` model, in one's own training code:
    model = get_propetl_model(AutoModelForSequenceClassification.from_pretrained(name, num_labels=2),
                              LoRAConfig(r=8, mask_sparsity=0.9))          # or ProPETLConfig(prototype="lora", ...)
    optimizer = torch.optim.AdamW(model.parameter_groups(lr=1e-4, mask_lr=3e-2))     # any optimizer
    model.save_propetl(folder)              # prototype, masks and head only: the runner's checkpoint format
    model = load_propetl(AutoModelForSequenceClassification.from_pretrained(name, num_labels=2), folder)
    plain = model.merge_and_unload()        # LoRA folded into W_q / W_v: the plain transformers model
Built on the runner's own code (config defaults, methods.attach, loop.parameter_groups, checkpoint.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from propetl import methods, validate
from propetl.configs import CONF_DIR, ConfigError, ModelConfig, ModelSetup
from propetl.methods import rules
from propetl.methods.rules import PrototypeConfig
from propetl.models.backbone import encoder_layers, head_parameter_names
from propetl.models.t5 import TextToTextModel
from propetl.run import loop
from propetl.storage import accounting, checkpoint, files

RUNNER_KEYS = {  # the API's settings outside a prototype's dataclass: their runner keys (lr, mask_lr: parameter_groups)
    "mask_kind": "mask.kind",
    "mask_seed": "mask.seed",
    "head_lr": "trainer.head_lr",
    "weight_decay": "trainer.weight_decay",
    "lr": "trainer.lr",
    "mask_lr": "mask.lr",
}
RENAMED = {"sparsity": "mask_sparsity", "prototype_seed": "seed"}  # ProPETLConfig's names of dataclass fields
LOADABLE_METHODS = ("propetl", "petl")


@dataclass(init=False)
class ProPETLConfig:
    """ProPETL settings under one flat set of names: `prototype` (lora | adapter | prefix | one registered), then by
    keyword its dataclass's fields (lr, mask_lr, freeze, r, alpha, targets, ...; sparsity: mask_sparsity,
    prototype_seed: seed, target_modules: PEFT's name for targets), and mask_kind (learned | random | none), mask_seed,
    head_lr (None: lr), weight_decay. None: the prototype's default (conf/prototype/<prototype>.yaml; sizes scale with
    hidden). Kept as `settings` (the dataclass's field names) and `runner_settings` (RUNNER_KEYS' names)."""

    prototype: str
    settings: dict[str, Any]
    runner_settings: dict[str, Any]

    def __init__(
        self,
        prototype: str = "lora",
        *,
        mask_kind: str = "learned",
        mask_seed: int = 0,
        head_lr: float | None = None,
        weight_decay: float | None = None,
        target_modules: Sequence[str] | None = None,
        **settings: Any,
    ):
        targets = settings.get("targets")
        if target_modules is not None:  # PEFT's name: one setting, not two that could disagree
            if targets is not None and list(targets) != list(target_modules):
                raise ConfigError(
                    f"target_modules={list(target_modules)!r} and targets={list(targets)!r} disagree; give one of them"
                )
            settings["targets"] = list(target_modules)
        self.prototype, self.settings = prototype, {RENAMED.get(k, k): v for k, v in settings.items() if v is not None}
        given = {"mask_kind": mask_kind, "mask_seed": mask_seed, "head_lr": head_lr, "weight_decay": weight_decay}
        self.runner_settings = {name: value for name, value in given.items() if value is not None}

    def prototype_config(self) -> PrototypeConfig:
        """The prototype's dataclass with these settings, each checked (one line, in this class's names)."""
        config_class = prototype_module(self.prototype).CONFIG
        for name, value in self.settings.items():
            if name == "name" or name not in {f.name for f in fields(config_class)}:
                raise ConfigError(
                    f"{name}={value!r} is not a setting of prototype={self.prototype}; "
                    f"its settings: {', '.join(config_class.own_settings())}"
                )
        config = config_class(**self.settings)
        config.check(names={field: name for name, field in RENAMED.items()}, skip_unset=True)
        return config


def prototype_module(name: str):
    """The registered prototype `name`'s module, or a one-line error naming the registered ones."""
    if name not in methods.PROTOTYPES:
        raise ConfigError(f"prototype={name!r} is invalid; allowed: {', '.join(methods.PROTOTYPES)}")
    return methods.PROTOTYPES[name]


def checked(cfg: DictConfig) -> DictConfig:
    """The runner's validation of the method part and the learning rates."""
    validate.check_resolves(cfg)
    validate.validate_method(cfg)
    validate.validate_learning_rates(cfg)
    return cfg


def trainer_defaults() -> DictConfig:
    """The trainer keys the optimizer's groups read: lr (follows method.lr), head_lr (follows lr), weight_decay."""
    trainer = OmegaConf.load(CONF_DIR / "trainer" / "default.yaml")
    assert isinstance(trainer, DictConfig)
    return OmegaConf.masked_copy(trainer, ["lr", "head_lr", "weight_decay"])


def with_settings(cfg: DictConfig, settings: dict[str, Any]) -> DictConfig:
    """A copy of cfg with the API's settings (RUNNER_KEYS' names, each checked by its key's rule in its own name) at
    their runner keys (interpolations of the rest follow them), validated."""
    cfg = cfg.copy()
    for name, value in settings.items():
        rule = (validate.RUN_RULES | validate.MASK_RULES)[RUNNER_KEYS[name]]
        rules.require(rule.accepts(value), name, value, rule.allowed)
        OmegaConf.update(cfg, RUNNER_KEYS[name], value, merge=False)
    return checked(cfg)


def runner_config(config: PrototypeConfig, model: nn.Module, settings: dict[str, Any] | None = None) -> DictConfig:
    """The runner's config for `model` with `config` (over its yaml's defaults, a shipped prototype's) and `settings`
    (RUNNER_KEYS' names; mask_seed 0 unless given) applied: what propetl-train would compose."""
    prototype_module(config.name)
    config.check(skip_unset=True)
    yaml = CONF_DIR / "prototype" / f"{config.name}.yaml"
    model_config: Any = model.config  # transformers' config (torch types a module's attributes as Tensor | Module)
    cfg = OmegaConf.create(
        {
            "model": {
                "name": model_config.model_type,
                "name_or_path": model.name_or_path,
                "hidden_size": model_config.hidden_size,
                "num_layers": model_config.num_hidden_layers,
            },
            "task": {"name": None, "num_labels": model_config.num_labels},
            "prototype": OmegaConf.merge(OmegaConf.load(yaml) if yaml.is_file() else {}, config.given()),
            "method": OmegaConf.load(CONF_DIR / "method" / "propetl.yaml"),
            "mask": OmegaConf.load(CONF_DIR / "mask" / "default.yaml"),
            "trainer": trainer_defaults(),
            "storage": OmegaConf.load(CONF_DIR / "train.yaml").storage,
        }
    )
    type(config).from_config(cfg.prototype).check()  # with what its yaml derives (adapter's bottleneck), in our names
    return with_settings(cfg, {"mask_seed": 0, **(settings or {})})  # mask.seed: no run seed to follow


def check_supported(model: nn.Module) -> None:
    """A BERT/RoBERTa-family *ForSequenceClassification model without ProPETL yet, or a one-line error."""
    try:
        first: Any = encoder_layers(model)[0]  # a BERT/RoBERTa block: torch types its submodules as Tensor | Module
        attention = first.attention.self
        family = hasattr(attention, "query") and hasattr(attention, "value")
    except (AttributeError, IndexError, TypeError):
        family = False
    if not family or not type(model).__name__.endswith("ForSequenceClassification"):
        raise ConfigError(
            f"model {type(model).__name__} is not supported; pass a BERT/RoBERTa-family "
            f"*ForSequenceClassification model from transformers (e.g. BertForSequenceClassification)"
        )
    if methods.petl_weights(model) is not None:
        raise ConfigError(f"model {type(model).__name__} already has ProPETL; pass a fresh model")


UNGROUPED = (
    "ProPETLModel: trained without its parameter groups, so the mask scores would move at the prototype's "
    "learning rate and the method would silently change; use propetl.ProPETLTrainer instead of "
    "transformers.Trainer, or an optimizer over model.parameter_groups()"
)


class ProPETLModel(nn.Module):
    """A transformers model with ProPETL attached in place, shaped like a PEFT model (save_pretrained /
    from_pretrained, print_trainable_parameters, get_base_model); calls, outputs and attributes it lacks are the
    model's. Training refuses to start (one line) until parameter_groups() has been asked for: a plain optimizer over
    model.parameters() (transformers.Trainer's included) would train the masks at the prototype's rate."""

    def __init__(self, model: nn.Module, cfg: DictConfig):
        super().__init__()
        self.model = model
        self.runner_config = cfg  # the runner's config (model, prototype, method, mask, trainer, ...)
        self.head_names = head_parameter_names(model)
        self.grouped = False  # parameter_groups() was asked for (forward checks it in training)

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        labels=None,
        **kwargs,
    ):
        """The model's forward; the explicit names let the HF Trainer keep these dataset columns and find labels."""
        if self.training and torch.is_grad_enabled() and not self.grouped:
            raise ConfigError(UNGROUPED)
        return self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            labels=labels,
            **kwargs,
        )

    def get_base_model(self) -> nn.Module:
        """The transformers model, the method inside it (PEFT's get_base_model)."""
        return self.model

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable parameters, all parameters), each tensor once (PEFT's get_nb_trainable_parameters)."""
        return (
            accounting.count(p for p in self.model.parameters() if p.requires_grad),
            accounting.count(self.model.parameters()),
        )

    def stored_bytes(self) -> tuple[int, int]:
        """(bytes a task keeps without its head, with it): fp32 prototype + one bit a mask entry (accounting.py)."""
        figures = accounting.account(
            self.model,
            ModelSetup.from_config(self.runner_config),
            accounting.backbone_params(self.model, self.head_names),
        )
        return int(figures["storage_bytes"]), int(figures["storage_bytes_with_head"])

    def print_trainable_parameters(self) -> None:
        """PEFT's line, and the bytes a task keeps (what ProPETL saves on: the masks are bits, not floats)."""
        trainable, total = self.get_nb_trainable_parameters()
        stored, with_head = self.stored_bytes()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
            f" || stored per task: {stored:,d} bytes ({with_head:,d} with head)"
        )

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def parameter_groups(
        self,
        lr: float | None = None,
        mask_lr: float | None = None,
        head_lr: float | None = None,
        weight_decay: float | None = None,
    ) -> list[dict]:
        """torch optimizer groups (each with its `name`): the prototype at lr, the mask scores at mask_lr, the
        head at head_lr; biases and LayerNorm weights without decay. None: the config's values."""
        given = {"lr": lr, "mask_lr": mask_lr, "head_lr": head_lr, "weight_decay": weight_decay}
        cfg = with_settings(self.runner_config, {name: value for name, value in given.items() if value is not None})
        self.grouped = True
        return loop.parameter_groups(self.model, cfg, self.head_names)

    def save_propetl(self, directory) -> Path:
        """Write the prototype, the masks and the head (not the backbone) to `directory`, atomically. `directory` may be
        new, empty or an earlier save (or export), which it replaces; anything else is refused (files.OutputError,
        one line, nothing written): a folder holding files propetl did not write, the working folder."""

        def build(folder: Path) -> None:  # the checkpoint built inside, then its entries moved up
            inner = checkpoint.save_checkpoint(
                self.model, ModelSetup.from_config(self.runner_config), folder / ".checkpoint"
            )
            for entry in inner.iterdir():
                entry.rename(folder / entry.name)
            inner.rmdir()

        return files.write_output_folder(Path(directory), build, "save_propetl")

    def save_pretrained(self, directory, **kwargs) -> Path:
        """PEFT's name for save_propetl: the prototype, the masks and the head (never the backbone). transformers'
        AutoModel.from_pretrained refuses the folder loudly (no transformers config.json); ProPETLModel.from_pretrained reads it."""
        if kwargs:
            raise ConfigError(f"save_pretrained({', '.join(kwargs)}=...): ProPETL's save takes the folder only")
        return self.save_propetl(directory)

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory, **kwargs) -> ProPETLModel | TextToTextModel:
        """PEFT's PeftModel.from_pretrained(base, folder): load_propetl."""
        if kwargs:
            raise ConfigError(
                f"from_pretrained({', '.join(kwargs)}=...): ProPETL's load takes the model and the folder"
            )
        return load_propetl(model, directory)

    def merge_and_unload(self) -> nn.Module:
        """LoRA: fold every layer's masked update into W_q / W_v and return the plain transformers model."""
        reason = methods.not_foldable(self.runner_config.prototype.name)
        if reason:
            raise ConfigError(f"merge_and_unload: {reason}; keep the ProPETL model (save_propetl / load_propetl)")
        methods.merge(self.model, encoder_layers(self.model), self.runner_config.prototype.name)
        return self.model


def attach(model: nn.Module, cfg: DictConfig, for_training: bool) -> ProPETLModel:
    """methods.attach on the given model, as MultiTaskModel on its encoder (the store goes to the model's device)."""
    device = next(model.parameters()).device
    methods.attach(model, encoder_layers(model), ModelSetup.from_config(cfg), head_parameter_names(model), for_training)
    model.to(device)
    return ProPETLModel(model, cfg)


def get_propetl_model(model: nn.Module, config: PrototypeConfig | ProPETLConfig) -> ProPETLModel:
    """Freeze `model`'s backbone and add one shared prototype with a learned mask per layer; the head trains.
    `config`: a prototype's dataclass (LoRAConfig(r=8), ...; None fields: its yaml's defaults) or a ProPETLConfig."""
    check_supported(model)
    if isinstance(config, ProPETLConfig):
        cfg = runner_config(config.prototype_config(), model, config.runner_settings)
    else:
        cfg = runner_config(config, model)
    return attach(model, cfg, for_training=True)


def load_propetl(model: nn.Module, directory) -> ProPETLModel | TextToTextModel:
    """`model` (the backbone the folder was trained on) with the saved prototype, masks and head, in eval mode, from
    save_propetl's or the runner's method=propetl|petl checkpoints, read by checkpoint.load_checkpoint (which loads
    the backbone propetl.json names) and copied in. Prefix loads its stored table, without the MLP.
    A T5 run's checkpoint (model.family=t5, any number of tasks) into a T5ForConditionalGeneration: the TextToTextModel
    around it (models/t5.py; generate(..., task=i) with task i's masks), in eval mode."""
    directory = Path(directory)
    config = checkpoint.read_checkpoint_config(directory)
    if ModelConfig.from_config(config["model"]).text_to_text:
        return load_t5(model, directory, config)
    check_supported(model)
    saved = OmegaConf.create(checkpoint.single_task_config(config, directory))
    if saved.method.name not in LOADABLE_METHODS:
        raise ConfigError(
            f"{directory}: method={saved.method.name} is not loaded by load_propetl; it loads: "
            f"{', '.join(LOADABLE_METHODS)} (checkpoint.load_checkpoint loads the rest)"
        )
    model_config: Any = model.config  # transformers' config (torch types a module's attributes as Tensor | Module)
    ours = {
        "model.hidden_size": model_config.hidden_size,
        "model.num_layers": model_config.num_hidden_layers,
        "task.num_labels": model_config.num_labels,
    }
    for key, value in ours.items():
        if OmegaConf.select(saved, key) != value:
            raise ConfigError(f"{directory} was saved for {key}={OmegaConf.select(saved, key)}, this model has {value}")
    cfg = OmegaConf.merge(saved, {"trainer": trainer_defaults()})
    assert isinstance(cfg, DictConfig)
    loaded, _ = checkpoint.load_checkpoint(directory, config)  # the one reader: into the MultiTaskModel
    wrapped = attach(model, checked(cfg), for_training=False)
    model.load_state_dict({loaded.transformers_name(n): t for n, t in loaded.state_dict().items()})
    return wrapped.eval()


def load_t5(model: nn.Module, directory: Path, config: dict) -> TextToTextModel:
    """load_propetl of a T5 checkpoint: `model` must be a T5ForConditionalGeneration of the saved sizes."""
    t5_config: Any = getattr(model, "config", None)
    if type(model).__name__ != "T5ForConditionalGeneration" or t5_config is None:
        raise ConfigError(
            f"{directory} is a T5 checkpoint; pass a T5ForConditionalGeneration, not {type(model).__name__}"
        )
    saved = ModelConfig.from_config(config["model"])
    for key, ours, theirs in (
        ("hidden_size", t5_config.d_model, saved.hidden_size),
        ("num_layers", t5_config.num_layers, saved.num_layers),
    ):
        if ours != theirs:
            raise ConfigError(f"{directory} was saved for model.{key}={theirs}, this model has {ours}")
    loaded, _ = checkpoint.load_multitask(directory, config=config, t5=model)
    return loaded
