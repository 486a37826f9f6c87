"""Where propetl's configs are, as Hydra finds them, and the typed views lower layers take of a composed one.
The config tree ships inside the package (propetl/conf); Hydra's search path adds a user's own folders, whose files
are options like the shipped ones (which win a clash). Light on purpose: `propetl-train --help` uses it.
Below the run layer, functions take the typed objects here (`from_config`). The trainer, data, mask and storage groups
are typed: SCHEMAS go in Hydra's ConfigStore as <group>_schema, so a wrong type or unknown key fails composition;
model, task, prototype, method and peft stay untyped so a user's files may add keys.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.core.config_store import ConfigStore
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, Node, OmegaConf
from omegaconf.errors import OmegaConfBaseException, ValidationError

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11

CONF_DIR = Path(__file__).resolve().parent / "conf"
PRIMARY_CONFIG = "train"  # conf/train.yaml: what propetl-train composes


class ConfigError(ValueError):
    """One-line, user-facing configuration error."""


def searchpath_override(search_path: Sequence[str]) -> list[str]:
    """The Hydra override that puts `search_path` (file://DIR, pkg://module) after the shipped configs."""
    return [f"hydra.searchpath=[{','.join(search_path)}]"] if search_path else []


_TOOL_SEARCH_PATH: list[str] = []  # propetl-eval / propetl-export --config-dir, for the tool's run (config_dirs)


def config_dir_entry(folder: str) -> str:
    """A --config-dir folder as a search path entry (file:///abs/folder); one line if there is no such folder."""
    absolute = os.path.abspath(folder)
    if not os.path.isdir(absolute):
        raise ConfigError(f"--config-dir {folder}: no such folder")
    return f"file://{absolute}"


@contextmanager
def config_dirs(folders: Sequence[str]) -> Iterator[None]:
    """A tool's --config-dir folders after the shipped configs, for the block: a checkpoint of a user's task,
    model or prototype is then read as propetl-train wrote it."""
    entries = [config_dir_entry(folder) for folder in folders]
    previous = list(_TOOL_SEARCH_PATH)
    _TOOL_SEARCH_PATH[:] = entries
    try:
        yield
    finally:
        _TOOL_SEARCH_PATH[:] = previous


def add_config_dir_argument(parser) -> None:
    """propetl-eval's and propetl-export's --config-dir (repeatable; read by config_dirs)."""
    parser.add_argument(
        "--config-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="a folder of your own task/model/prototype configs, as given to propetl-train (repeatable)",
    )


def run_search_path() -> list[str]:
    """Inside propetl-train: the run's hydra.searchpath (its --config-dir is in Hydra's loader already);
    in propetl-eval / propetl-export: their --config-dir (config_dirs); elsewhere none."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().searchpath) if HydraConfig.initialized() else list(_TOOL_SEARCH_PATH)


@contextmanager
def hydra_initialized() -> Iterator[None]:
    """Hydra's compose API over the shipped configs; inside propetl-train, the run's own (with its --config-dir)."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        yield
        return
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        yield


def group_choices(group: str, search_path: Sequence[str] | None = None) -> list[str]:
    """The options of a config group: its YAML files on Hydra's search path (the shipped conf/<group>/, then
    `search_path`; None: the current run's)."""
    from hydra.core.global_hydra import GlobalHydra

    search_path = run_search_path() if search_path is None else search_path
    with hydra_initialized():
        loader = GlobalHydra.instance().config_loader()
        return sorted(set(loader.get_group_options(group, overrides=searchpath_override(search_path))))


def require_option(group: str, name: str, search_path: Sequence[str] | None = None) -> None:
    """A ConfigError naming the choices unless `name` is an option of `group` on the search path (or null)."""
    choices = group_choices(group, search_path)
    if name not in choices and name != "null":
        raise ConfigError(f"{group}={name} is not a known {group}; choose one of: {', '.join(choices)}")


def compose(
    overrides: Sequence[str] = (),
    search_path: Sequence[str] = (),
    config_name: str | None = PRIMARY_CONFIG,
    with_hydra: bool = False,
) -> DictConfig:
    """The config a command line gives (Hydra's compose API), with `search_path` after the shipped configs
    (and Hydra's own settings under `hydra` when with_hydra)."""
    from hydra import compose as hydra_compose

    with hydra_initialized():
        try:
            return hydra_compose(
                config_name=config_name,
                overrides=[*overrides, *searchpath_override(search_path)],
                return_hydra_config=with_hydra,
            )
        except ConfigCompositionException as error:  # an override's error is its cause, a config file's its context
            if isinstance(cause := error.__cause__ or error.__context__, OmegaConfBaseException) and cause.full_key:
                where = str(error).partition(": ")[0] + ": " if str(error).startswith("In '") else ""
                raise ConfigError(where + schema_error(cause)) from None
            raise


TYPE_NAMES = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}


def schema_error(error: OmegaConfBaseException) -> str:
    """A schema's refusal (a value of the wrong type, a key it lacks) as one line naming the key."""
    node = error.parent_node._get_node(error.key) if error.parent_node is not None else None
    if not isinstance(error, ValidationError) or not isinstance(node, Node):
        return f"{error.full_key}: {str(error.msg).splitlines()[0]}"
    name = getattr(node._metadata.ref_type, "__name__", "")
    allowed = TYPE_NAMES.get(name, name) + (" or null" if node._metadata.optional else "")
    return f"{error.full_key}={error.value!r} is invalid; allowed: {allowed}"


def group_option(group: str, name: str, search_path: Sequence[str] | None = None) -> DictConfig:
    """One option of a group (task `rte` -> conf/task/rte.yaml), found on the search path (None: the run's)."""
    search_path = run_search_path() if search_path is None else search_path
    require_option(group, name, search_path)
    return compose([f"+{group}={name}"], search_path, config_name=None)[group]


def plain_value(cfg, key: str):
    """cfg's value at a dotted key as plain python (containers resolved): for comparing configs."""
    value = OmegaConf.select(cfg, key)
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


# ----------------------------------------------------------------------------- typed views of a composed config


def plain_group(group: Mapping[str, Any]) -> dict[str, Any]:
    """A config group (a DictConfig or a mapping) as a plain dict, interpolations resolved."""
    config = group if isinstance(group, DictConfig) else OmegaConf.create(dict(group))
    values = OmegaConf.to_container(config, resolve=True)
    assert isinstance(values, dict)  # a DictConfig's container
    return {str(key): value for key, value in values.items()}


class _FromGroup:
    """from_config (for dataclasses): one of a config group's values; keys it has no field for are not its business."""

    @classmethod
    def from_config(cls, group: Mapping[str, Any]) -> Self:
        values, own = plain_group(group), fields(cls)  # type: ignore[arg-type]
        if missing := [f.name for f in own if f.default is f.default_factory and f.name not in values]:  # required
            prefix = cls.__name__.removesuffix("Config").lower()
            raise ConfigError(f"the config lacks {', '.join(f'{prefix}.{name}' for name in missing)}")
        return cls(**{f.name: values[f.name] for f in own if f.name in values})


@dataclass(frozen=True)
class ModelConfig(_FromGroup):
    """The model group (conf/model/*.yaml): which backbone, and the sizes it is checked against."""

    name: str
    name_or_path: str
    hidden_size: int
    num_layers: int
    max_length: int | None = None  # the Python API's model has none (it tokenises nothing)
    family: str = (
        "encoder"  # encoder: a classification head per task (MultiTaskModel) | t5: text to text (TextToTextModel)
    )

    @property
    def text_to_text(self) -> bool:
        return self.family == "t5"


@dataclass(frozen=True, kw_only=True)  # keyword-only: the fields in glue.yaml's order, which a saved config keeps
class DataConfig(_FromGroup):
    """The data group (conf/data/glue.yaml): where the task files are and how they are split and tokenised."""

    dir: str | None = None
    protocol: str
    split_seed: int
    max_length: int
    group_by_length: bool = False
    allow_hub: bool = True
    max_train_examples: int | None = None

    def split(self) -> dict[str, Any]:
        """The run's data split as a checkpoint records it (propetl-eval re-makes it)."""
        return {"protocol": self.protocol, "split_seed": int(self.split_seed), "max_length": int(self.max_length)}


@dataclass(frozen=True)
class StorageConfig:
    """How a checkpoint is written (train.yaml's storage): the masks' coding, the dense tensors' dtype."""

    mask_coding: str
    dtype: str

    @classmethod
    def from_config(cls, group: Mapping[str, Any]) -> StorageConfig:
        return cls(str(group["mask_coding"]), str(group["dtype"]))


@dataclass
class TrainerSchema:
    """The trainer group's schema (conf/trainer/default.yaml holds the values)."""

    epochs: int
    max_steps: int | None
    batch_size: int
    eval_batch_size: Any  # auto | N: OmegaConf takes no union; validate.py checks it
    lr: float
    head_lr: float
    weight_decay: float
    warmup_ratio: float
    selection_skips_warmup: bool
    max_grad_norm: float
    device: str
    precision: str
    threads: int | None
    progress: bool
    log_every_steps: int
    save_weights: bool
    resume: Any  # auto | true | false, as eval_batch_size
    save_steps: int | None
    warmup_steps: int | None = None  # set: this many warm-up steps instead of warmup_ratio (T5: 500)
    eval_every_steps: int | None = None  # set: an "epoch" is this many steps (evaluation, selection, checkpoint)
    mask_lr_ratio: float | None = None  # set: the mask scores' lr = this x the weights' current lr (T5: 10)
    label_smoothing: float = 0.0  # text-to-text loss only (T5: 0.1)


@dataclass(frozen=True, kw_only=True)
class MaskConfig:
    """The mask group (conf/mask/default.yaml), its schema and the view the masks read: learned | random | none, the
    fraction of zeros, the optimizer's lr and weight decay of the scores (None: a setup read from an old checkpoint),
    the seed of random masks, and how a task's mask and a site's combine (older configs lack it: or)."""

    kind: str
    sparsity: float
    lr: float | None = None
    weight_decay: float | None = None
    seed: int
    combine: str = "or"

    @classmethod
    def from_config(cls, group: Mapping[str, Any]) -> MaskConfig:
        mask = plain_group(group)
        return cls(
            kind=str(mask["kind"]),
            sparsity=float(mask["sparsity"]),
            lr=mask.get("lr"),
            weight_decay=mask.get("weight_decay"),
            seed=int(mask["seed"]),
            combine=str(mask.get("combine", "or")),
        )


SCHEMAS = {"trainer": TrainerSchema, "data": DataConfig, "mask": MaskConfig, "storage": StorageConfig}
for _group, _schema in SCHEMAS.items():  # Hydra's ConfigStore: <group>_schema, at the group's package
    _node = OmegaConf.structured(_schema)
    OmegaConf.set_readonly(_node, False)  # a frozen view as a schema: the yamls and overrides still set values
    ConfigStore.instance().store(name=f"{_group}_schema", node=_node, package=_group)


MODEL_SECTIONS = ("model", "prototype", "method", "mask")  # + peft with method=peft, data with a data split


@dataclass(frozen=True)
class ModelSetup:
    """How a run's model is built and kept: `saved`, its model, prototype, method, mask and (method=peft) peft groups
    and (a run) its data split, as plain values — what a checkpoint's propetl.json records and the method is attached
    from —, how its checkpoint is written (storage), and the task of a transformers model with the
    method inside (the Python API's has none)."""

    saved: dict[str, Any]
    storage: StorageConfig
    task: str | None = None

    @classmethod
    def from_config(cls, cfg: DictConfig) -> ModelSetup:
        """A run's (or the Python API's runner config's) setup: the run layer builds it once."""
        sections = (*MODEL_SECTIONS, *(("peft",) if cfg.method.name == "peft" else ()))
        saved = {k: plain_group(cfg[k]) for k in sections}
        if cfg.get("data") is not None:  # the Python API has no data split
            saved["data"] = DataConfig.from_config(cfg.data).split()
        task = cfg.task.name if cfg.get("task") is not None else None
        return cls(saved, StorageConfig.from_config(cfg.storage), task)

    @classmethod
    def from_checkpoint(cls, config: Mapping[str, Any]) -> ModelSetup:
        """The setup a checkpoint config (propetl.json) records."""
        sections = (*MODEL_SECTIONS, "peft", "data")
        return cls({k: config[k] for k in sections if k in config}, StorageConfig.from_config(config["storage"]))

    @property
    def model(self) -> ModelConfig:
        return ModelConfig.from_config(self.saved["model"])

    @property
    def method(self) -> str:
        return str(self.saved["method"]["name"])

    @property
    def mask(self) -> MaskConfig:
        return MaskConfig.from_config(self.saved["mask"])

    @property
    def peft(self) -> PeftGroup | None:
        """method=peft's tuner; None for the other methods."""
        return PeftGroup.from_config(self.saved["peft"]) if self.method == "peft" else None


@dataclass(frozen=True)
class PeftGroup(_FromGroup):
    """The peft group (conf/peft/<name>.yaml) of method=peft: one of PEFT's config classes and its keyword arguments
    (a mapping or None; peft_tuners.refusal names anything else)."""

    name: str
    config_class: str
    config: Any = None
