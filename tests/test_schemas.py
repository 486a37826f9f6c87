"""The typed groups' schemas (configs.SCHEMAS, Hydra's ConfigStore): what they type, what they leave as the yamls
hold it, and a value of the wrong type as one line."""
from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import compose_cfg
from omegaconf import OmegaConf

from propetl.cli.command_line import check_command_line
from propetl.configs import SCHEMAS, ConfigError


def test_typed_groups_compose_as_their_schemas_with_the_yamls_values():
    cfg = compose_cfg()
    for group, schema in SCHEMAS.items():
        assert OmegaConf.get_type(cfg[group]) is schema
    assert list(cfg.data) == ["dir", "protocol", "split_seed", "max_length", "group_by_length", "allow_hub",
                              "max_train_examples"]                                   # glue.yaml's order, as saved
    assert list(cfg)[:2] == ["storage", "seed"] and list(cfg)[-3:] == ["trainer", "logger", "data"]
    assert cfg.trainer.eval_batch_size == "auto" and compose_cfg(["trainer.eval_batch_size=64"]).trainer.eval_batch_size == 64
    assert compose_cfg(["trainer.resume=true"]).trainer.resume is True
    cfg.trainer.batch_size = 8                                                     # not read-only (DataConfig is frozen)
    cfg.data.max_train_examples = 64


@pytest.mark.parametrize("argument,message", [
    ("trainer.batch_size=abc", "trainer.batch_size='abc' is invalid; allowed: an integer"),
    ("mask.sparsity=high", "mask.sparsity='high' is invalid; allowed: a number"),
    ("data.group_by_length=maybe", "data.group_by_length='maybe' is invalid; allowed: true or false"),
    ("trainer.max_steps=x", "trainer.max_steps='x' is invalid; allowed: an integer or null"),
    ("storage.dtype=[1]", "storage.dtype=[1] is invalid; allowed: a string"),
    ("-m trainer.batch_size=8,abc", "trainer.batch_size='abc' is invalid"),           # each swept value
    ("-m task=rte,mrpc mask.sparsity=0.5 trainer.lr=fast", "trainer.lr='fast' is invalid; allowed: a number"),
])
def test_a_value_of_the_wrong_type_is_one_line_before_hydra(argument, message):
    with pytest.raises(ConfigError) as error:
        check_command_line(argument.split())
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_users_files_add_keys_to_untyped_groups_and_are_typed_in_typed_ones(tmp_path):
    (tmp_path / "prototype").mkdir()
    (tmp_path / "trainer").mkdir()
    (tmp_path / "prototype" / "wide.yaml").write_text("defaults:\n  - adapter\n  - _self_\nbottleneck: 64\nnote: mine\n")
    (tmp_path / "trainer" / "quick.yaml").write_text("defaults:\n  - default\n  - _self_\nbatch_size: 8\n")
    (tmp_path / "trainer" / "broken.yaml").write_text("defaults:\n  - default\n  - _self_\nbatch_size: eight\n")
    check_command_line(["--config-dir", str(tmp_path), "prototype=wide", "prototype.note=x", "trainer=quick"])
    with pytest.raises(ConfigError, match=r"^In 'trainer/broken': trainer.batch_size='eight' is invalid; allowed: an integer$"):
        check_command_line(["--config-dir", str(tmp_path), "trainer=broken"])


def test_propetl_train_refuses_a_wrong_type_in_one_line(tmp_path):
    run = subprocess.run([sys.executable, "-m", "propetl", "mask.sparsity=high", f"hydra.run.dir={tmp_path}/run"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 2
    assert run.stderr.strip() == "propetl-train: error: mask.sparsity='high' is invalid; allowed: a number"
