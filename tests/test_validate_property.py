"""Property-based: random invalid config values each give a one-line error naming the key, and nothing is written."""
from __future__ import annotations

import copy
import math

import pytest
from conftest import compose_cfg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from propetl.run.train import train
from propetl.validate import ConfigError

# untyped copies, as a config built in code: validate's rules answer (a composed config's schemas refuse a value of
# the wrong type as it is set; the command line's one line for that: tests/test_schemas.py)
BASE = {p: OmegaConf.create(OmegaConf.to_container(compose_cfg([f"prototype={p}"]))) for p in ("adapter", "lora", "prefix")}

text = st.text(min_size=1, max_size=8).filter(lambda s: s.strip() and not s.lstrip("-").replace(".", "").isdigit())
not_positive_int = st.one_of(st.integers(max_value=0), st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: x != int(x) or x <= 0), text, st.booleans())
not_positive_number = st.one_of(st.floats(max_value=0.0, allow_nan=False), st.integers(max_value=0), text, st.booleans())
negative = st.one_of(st.floats(max_value=-1e-9, allow_nan=False, allow_infinity=False), text)


def outside(low: float, high: float):
    return st.one_of(st.floats(max_value=low, exclude_max=True, allow_nan=False), st.floats(min_value=high, allow_nan=False), text)


def unknown(choices):
    return text.filter(lambda s: s not in choices)


INVALID = {
    "mask.sparsity": outside(0.0, 1.0), "mask.kind": unknown({"learned", "random", "none"}),
    "mask.lr": not_positive_number, "mask.weight_decay": negative,
    "trainer.epochs": not_positive_int, "trainer.batch_size": not_positive_int, "trainer.eval_batch_size": not_positive_int.filter(lambda v: v != "auto"),
    "trainer.max_steps": not_positive_int, "trainer.save_steps": not_positive_int,
    "trainer.lr": not_positive_number, "trainer.head_lr": not_positive_number, "trainer.max_grad_norm": not_positive_number,
    "trainer.weight_decay": negative, "trainer.warmup_ratio": outside(0.0, 1.0),
    "trainer.precision": unknown({"fp32", "bf16", "fp16"}), "trainer.device": unknown({"auto", "cpu", "cuda"}).filter(lambda s: not s.startswith("cuda:")),
    "trainer.resume": unknown({"auto"}), "trainer.threads": not_positive_int,
    "data.protocol": unknown({"split", "full_dev"}), "data.max_length": not_positive_int,
    "data.max_train_examples": not_positive_int, "logger.mode": unknown({"online", "offline", "disabled"}),
    "task.name": unknown({"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte"}),
    "method.name": unknown({"propetl", "petl", "finetune", "peft"}), "prototype.lr": not_positive_number,
    "adapter:prototype.reduction_factor": not_positive_int, "adapter:prototype.non_linearity": unknown({"relu", "gelu", "tanh", "gelu_new"}),
    "lora:prototype.r": not_positive_int, "lora:prototype.alpha": not_positive_number,
    "prefix:prototype.length": not_positive_int, "prefix:prototype.mlp_hidden": not_positive_int,
    "prototype.freeze": st.one_of(text, st.integers(), st.floats(allow_nan=False)),
    "prototype.seed": st.one_of(st.integers(max_value=-1), text),
}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_every_invalid_value_is_one_line_and_writes_nothing(tmp_path, data):
    target = data.draw(st.sampled_from(sorted(INVALID)))
    prototype, _, key = target.rpartition(":")
    value = data.draw(INVALID[target])
    cfg = copy.deepcopy(BASE[prototype or "adapter"])
    OmegaConf.update(cfg, key, value, force_add=False)
    run_dir = tmp_path / f"run-{abs(hash((target, repr(value))))}"
    with pytest.raises(ConfigError) as error:
        train(cfg, run_dir)
    message = str(error.value)
    assert "\n" not in message
    named = key.split(".")[-1] in message or "does not resolve" in message
    assert named, message
    assert not run_dir.exists()


def test_valid_edges_pass():
    from propetl.validate import validate

    cfg = copy.deepcopy(BASE["adapter"])
    for key, value in [("mask.sparsity", 0.0), ("mask.sparsity", 0.999), ("trainer.warmup_ratio", 0.0),
                       ("trainer.max_steps", 1), ("trainer.weight_decay", 0.0)]:
        OmegaConf.update(cfg, key, value)
        validate(cfg)
    assert not math.isnan(cfg.mask.sparsity)
