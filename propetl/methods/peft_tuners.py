"""method=peft: a Hugging Face PEFT tuner (peft=<name>, conf/peft/<name>.yaml: `config_class` and its `config`)
instead of propetl's modules. Imported only on method=peft's path: `peft` is optional (`propetl[peers]`).
`peft.get_peft_model` adapts the encoder in place, so every tensor PEFT trains, shared ones too (VB-LoRA, Uni-LoRA), has
the same name in the MultiTaskModel and the transformers model (`inject_adapter_in_model` refuses shared state). The
PeftModel is kept unregistered (PEFT_MODEL) to save and load the adapter. The head is ours (no task_type nor
modules_to_save, which would rename it and freeze the pooler), made trainable again after PEFT freezes the encoder.
A task keeps what `save_pretrained` writes (adapter_files); the storage figure uses LEAST_STORING (accounting.py).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import peft
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from propetl.configs import ConfigError, PeftGroup
from propetl.methods import PEFT_FILES

PEFT_MODEL = "peft_model"  # the attribute the PeftModel is kept under (not a submodule)
NOT_ON_BERT = {
    "AdaptionPromptConfig": "PEFT supports no BERT model type for it",
    "XLoraConfig": "it needs use_cache=False and a causal LM",
    "PolyConfig": "it needs task_ids",
    "ShadowConfig": "it fails inside PEFT on BERT",
    "CPTConfig": "it is for causal LMs only",
}
# Save options that store less but whose file does not reload bit for bit: used for the storage figure only (the
# checkpoint keeps the full tensors). VB-LoRA's top-k file recomputes the softmax weights (3e-8 off).
LEAST_STORING: dict[str | None, dict[str, bool]] = {peft.PeftType.VBLORA: {"save_only_topk_weights": True}}
KEPT = {  # what each method's file holds (accounting names it in metrics.json as storage_counted)
    "LORA": "lora_A, lora_B of every target",
    "VERA": "lambda_b, lambda_d of every target (save_projection=False: the shared random A, B regenerate from "
    "projection_prng_key)",
    "VBLORA": "the vector bank and each sub-vector's top-k indices and weights (save_only_topk_weights)",
    "FOURIERFT": "each target's spectrum coefficients (entry locations regenerate from random_loc_seed)",
    "UNILORA": "theta_d (save_indices=False: indices and scales regenerate from proj_seed)",
    "TINYLORA": "each group's v and, always, the truncated SVD buffers tinylora_A, tinylora_B (save_projection="
    "False: P regenerates from projection_seed)",
    "IA3": "each target's scaling vector",
    "LOHA": "hada_w1_a/b, hada_w2_a/b of every target",
    "LOKR": "lokr_w1, lokr_w2_a/b of every target",
}


def tuner_classes() -> list[str]:
    """PEFT's config classes whose tuner adapts a model in place (not prompt learning) and works on BERT."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    return sorted(
        cls.__name__
        for kind, cls in PEFT_TYPE_TO_CONFIG_MAPPING.items()
        if issubclass(PEFT_TYPE_TO_TUNER_MAPPING.get(kind, object), BaseTuner)
        and not issubclass(cls, peft.PromptLearningConfig)
        and cls.__name__ not in NOT_ON_BERT
    )


def refusal(group: PeftGroup) -> str | None:
    """Why the peft group cannot work (one line naming the valid choices), or None."""
    name = group.config_class
    if name not in tuner_classes():
        reason = f" ({NOT_ON_BERT[name]})" if name in NOT_ON_BERT else ""
        return f"peft.config_class={name!r} is invalid{reason}; allowed: {', '.join(tuner_classes())}"
    if not (group.config is None or isinstance(group.config, dict)):
        return f"peft.config={group.config!r} is invalid; allowed: null or a mapping of {name}'s keyword arguments"
    config = group.config or {}
    for key in ("task_type", "modules_to_save"):
        if config.get(key) is not None:
            why = "propetl trains the head, classifier and pooler, at trainer.head_lr itself"
            return f"peft.config.{key}={config[key]!r} is invalid; allowed: null ({why})"
    try:
        make_config(group)
    except (TypeError, ValueError) as error:
        return f"peft={group.name}: {name} refuses peft.config: {str(error).splitlines()[0]}"
    return None


def make_config(group: PeftGroup) -> peft.PeftConfig:
    """peft.<config_class>(**config) (null: no arguments; refusal() refuses a config that is not a mapping)."""
    return getattr(peft, group.config_class)(**(group.config or {}))


def encoder(model: nn.Module) -> nn.Module:
    """The backbone's encoder (BertModel / RobertaModel): the transformers model's base_model, the MultiTaskModel's."""
    prefix = model.base_model_prefix
    assert isinstance(prefix, str)
    return getattr(model, prefix)


def attach(model: nn.Module, group: PeftGroup, head_names: set[str]) -> None:
    """Adapt `model`'s encoder in place with the peft group's tuner; the head trains."""
    try:
        adapted = peft.get_peft_model(encoder(model), make_config(group))
    except (ValueError, TypeError, KeyError, NotImplementedError) as error:  # e.g. VB-LoRA's vector_length
        why = str(error).splitlines()[0]
        raise ConfigError(f"peft={group.name}: PEFT cannot adapt {type(model).__name__}: {why}") from None
    object.__setattr__(model, PEFT_MODEL, adapted)  # not registered: its modules are the model's own
    for name, parameter in model.named_parameters():
        if name in head_names:
            parameter.requires_grad_(True)


def peft_model(model: nn.Module) -> peft.PeftModel:
    return getattr(model, PEFT_MODEL)


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """name -> the tuner's parameters (by PEFT's own prefix: lora_, vera_lambda_, vblora_, …), each tensor once."""
    tuner = peft_model(model).base_model
    assert isinstance(tuner, BaseTuner)
    return {name: p for name, p in model.named_parameters() if tuner.prefix in name}


def adapter_files(model: nn.Module, least: bool = False) -> dict[str, bytes]:
    """The files of PEFT_FILES as `save_pretrained` writes them (least: with LEAST_STORING's options), by name."""
    adapted = peft_model(model)
    config = adapted.peft_config["default"]
    options = LEAST_STORING.get(config.peft_type, {}) if least else {}
    saved = {key: getattr(config, key) for key in options}
    with tempfile.TemporaryDirectory() as folder:
        try:
            for key, value in options.items():
                setattr(config, key, value)
            adapted.save_pretrained(folder)
        finally:
            for key, value in saved.items():
                setattr(config, key, value)
        return {name: (Path(folder) / name).read_bytes() for name in PEFT_FILES}


def load_adapter(model: nn.Module, state: dict) -> list[str]:
    """Load `state` (an adapter_model.safetensors' tensors) into the model's tuner; the keys that did not match
    (missing or unexpected; empty when every tensor was set)."""
    adapted = peft_model(model)
    expected = set(peft.get_peft_model_state_dict(adapted))
    if set(state) != expected:
        return sorted(set(state) ^ expected)
    peft.set_peft_model_state_dict(adapted, state)
    return []


def merge(model: nn.Module) -> None:
    """Fold the tuner into the frozen weights and put the plain modules back (the bare model's cost)."""
    peft_model(model).merge_and_unload()
    object.__delattr__(model, PEFT_MODEL)
