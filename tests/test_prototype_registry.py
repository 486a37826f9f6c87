"""A fourth prototype is one module and one yaml. This file IS that module: a masked bias added to every
layer's feed-forward output (its dataclass BiasConfig as CONFIG, FOLDABLE, specs, attach, merge below), and the
tests register it through its yaml (`module: test_prototype_registry`) in a config folder of their own. The one
dataclass serves the command line (a run), validation (a bad value refused in one line) and the Python API."""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
import torch
from conftest import TINY, tiny_batch, tiny_text_overrides
from omegaconf import OmegaConf
from torch import nn

from propetl import configs, get_propetl_model, methods
from propetl.configs import ModelSetup
from propetl.methods import rules
from propetl.methods.weights import LayerWeights, TensorSpec, bind
from propetl.models import backbone
from propetl.storage import accounting, checkpoint
from propetl.validate import ConfigError, validate

# ----------------------------------------------------------------------------- the prototype

@dataclass
class BiasConfig(rules.PrototypeConfig):
    name: str = "bias"
    init_std: float = rules.setting(rules.positive_number(), shape=True)


CONFIG = BiasConfig
FOLDABLE = False
YAML = """name: bias
module: test_prototype_registry            # this file: imported and registered when a run starts
init_std: 0.02
lr: 1.0e-3
mask_sparsity: 0.5
mask_lr: 1.0e-2
"""


def specs(cfg: BiasConfig, hidden: int) -> dict[str, TensorSpec]:
    return {"bias": TensorSpec((hidden,), f"normal:{cfg.init_std}", masked=True)}


class BiasedOutput(nn.Module):
    """A BERT layer's `output` block, then + the layer's (masked) bias."""

    def __init__(self, original: nn.Module, weights: LayerWeights, layer_index: int):
        super().__init__()
        self.original, self.layer_index = original, layer_index
        bind(self, weights)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.original(hidden_states, input_tensor) + self.weights.layer(self.layer_index)["bias"]


def attach(model: nn.Module, layers: nn.ModuleList, weights: LayerWeights, cfg: BiasConfig) -> None:
    for index, layer in enumerate(layers):
        layer.output = BiasedOutput(layer.output, weights, index)


def merge(layers: nn.ModuleList, weights: LayerWeights) -> LayerWeights:
    plain = weights.to_plain()
    for layer in layers:
        bind(layer.output, plain)
    return plain


# ----------------------------------------------------------------------------- the tests

@pytest.fixture
def bias_cfg(tiny_model_dir, tmp_path):
    """Configs with prototype=bias from a config folder of the test's own; the prototype unregistered after."""
    (tmp_path / "conf" / "prototype").mkdir(parents=True)
    (tmp_path / "conf" / "prototype" / "bias.yaml").write_text(YAML)
    search_path = [f"file://{tmp_path / 'conf'}"]

    def make(*overrides: str):
        cfg = configs.compose([f"model.name_or_path={tiny_model_dir}", "model.name=tiny",
                               f"model.hidden_size={TINY['hidden']}", f"model.num_layers={TINY['layers']}", "data.max_length=64",
                               "logger.mode=disabled", "prototype=bias", *overrides], search_path)
        methods.import_prototype(cfg.prototype)            # what train.begin_run does
        validate(cfg, search_path)
        return cfg
    yield make
    methods.PROTOTYPES.pop("bias", None)


def test_its_yaml_registers_it_and_its_settings_are_validated_in_one_line(bias_cfg):
    bias_cfg()
    assert methods.PROTOTYPES["bias"] is sys.modules[__name__]
    with pytest.raises(ConfigError, match=r"^prototype.init_std=-1 is invalid; allowed: a positive number$"):
        bias_cfg("prototype.init_std=-1")
    assert "prototype.init_std" in tuple(checkpoint.MATCH_KEYS)
    assert "cannot be folded" in methods.not_foldable("bias")
    with pytest.raises(ConfigError, match=r"^prototype.module='no_such_module' is invalid .*; allowed: .*CONFIG"):
        methods.import_prototype(OmegaConf.create({"name": "nope", "module": "no_such_module"}))


@pytest.mark.parametrize("method", ["propetl", "petl"])
def test_it_trains_counts_and_reloads(bias_cfg, tmp_path, method):
    cfg = bias_cfg(f"method={method}")
    torch.manual_seed(0)
    model = backbone.build(ModelSetup.from_config(cfg), 2)
    model(**tiny_batch()).loss.backward()
    weights = methods.petl_weights(model)
    assert weights.weights["bias"].grad.abs().sum() > 0
    scores = [p for n, p in weights.named_parameters() if n.endswith("scores")]
    assert len(scores) == (method == "propetl") and (method == "petl" or scores[0].grad.abs().sum() > 0)

    figures = accounting.account(model, ModelSetup.from_config(cfg), backbone_params=1000)
    hidden, layers = TINY["hidden"], TINY["layers"]
    if method == "propetl":      # the prototype once, one bit per mask entry
        assert (figures["stored_params"], figures["mask_entries"]) == (hidden, layers * hidden)
    else:
        assert (figures["stored_params"], figures["mask_entries"]) == (layers * hidden, 0)

    checkpoint.save_checkpoint(model, ModelSetup.from_config(cfg), tmp_path / "checkpoint")
    loaded, _ = checkpoint.load_checkpoint(tmp_path / "checkpoint")
    batch = tiny_batch(seed=5)
    batch.pop("labels")
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)


def test_its_dataclass_is_the_python_apis_config(bias_cfg, tiny_model_dir):
    bias_cfg()                                                      # registered, as a run or register_prototype does
    from transformers import BertForSequenceClassification
    settings = {"init_std": 0.02, "lr": 1e-3, "mask_sparsity": 0.5, "mask_lr": 1e-2}
    fresh = lambda: BertForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)  # noqa: E731
    model = get_propetl_model(fresh(), BiasConfig(**settings))
    assert model.runner_config.prototype.init_std == 0.02 and model.runner_config.mask.sparsity == 0.5
    assert {g["name"]: g["lr"] for g in model.parameter_groups()}["masks"] == 1e-2
    model(**tiny_batch()).loss.backward()
    assert methods.petl_weights(model.model).weights["bias"].grad.abs().sum() > 0
    with pytest.raises(ConfigError, match=r"^init_std=-1 is invalid; allowed: a positive number$"):
        get_propetl_model(fresh(), BiasConfig(**{**settings, "init_std": -1}))


@dataclass(kw_only=True)
class NoDefault(rules.PrototypeConfig):
    width: int


@dataclass
class Misspelt(rules.PrototypeConfig):
    width: int = rules.setting(rules.positive_int(), defualt=4)


@pytest.mark.parametrize("parts,message", [
    ({"SETTINGS": {}}, "module mine lacks CONFIG (a rules.PrototypeConfig dataclass; SETTINGS is the old form)"),
    ({"CONFIG": NoDefault}, "CONFIG.width has no default; give it one (rules.setting(rule, default))"),
    ({"CONFIG": Misspelt}, "CONFIG.width: rules.setting() takes rule, default, shape, not defualt"),
])
def test_a_badly_written_prototype_is_refused_in_one_line_naming_it_and_the_field(parts, message, monkeypatch):
    module = ModuleType("mine")
    vars(module).update({"FOLDABLE": False, "specs": specs, "attach": attach, "merge": merge, **parts})
    with pytest.raises(TypeError) as error:
        methods.register_prototype("mine", module)
    assert str(error.value) == f"prototype mine: {message}" and "mine" not in methods.PROTOTYPES
    monkeypatch.setitem(sys.modules, "mine", module)                  # its yaml's `module: mine`, as a run reads it
    with pytest.raises(ConfigError, match=rf"^prototype.module='mine' is invalid \(prototype mine: .*CONFIG[^\n]*$"):
        methods.import_prototype(OmegaConf.create({"name": "mine", "module": "mine"}))


@pytest.mark.slow
def test_a_run_of_it_from_the_command_line(tmp_path, tiny_text_model_dir, glue_dir, monkeypatch):
    from test_cli import ENV, propetl_train

    (tmp_path / "conf" / "prototype").mkdir(parents=True)
    (tmp_path / "conf" / "prototype" / "bias.yaml").write_text(YAML)
    monkeypatch.setitem(ENV, "PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), ENV.get("PYTHONPATH", "")]))
    arguments = ("--config-dir", str(tmp_path / "conf"), *tiny_text_overrides(tiny_text_model_dir, glue_dir),
                 "task=rte", "prototype=bias", "trainer.max_steps=1", "data.max_train_examples=16")
    bad = propetl_train(tmp_path, *arguments, "prototype.init_std=0")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr[-3000:]
    assert bad.stderr.strip().endswith("error: prototype.init_std=0 is invalid; allowed: a positive number")
    result = propetl_train(tmp_path, *arguments)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads(next((tmp_path / "run").rglob("metrics.json")).read_text())
    assert metrics["prototype"] == "bias" and metrics["storage"]["stored_params"] == TINY["hidden"]
