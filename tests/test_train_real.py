"""Real few-step runs on real GLUE data with the embedded pre-trained MiniLM (marked slow: ~10-30 s each)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import compose_cfg
from propetl import storage
from propetl.batches import make_loader
from propetl.data import load_glue
from propetl.loop import predict
from propetl.model import load_tokenizer
from propetl.train import train

pytestmark = pytest.mark.slow
FAST = ["trainer.batch_size=8", "trainer.eval_batch_size=64", "logger.mode=disabled", "trainer.progress=false"]


def run(tmp_path, glue_dir, *overrides):
    cfg = compose_cfg([f"data.dir={glue_dir}", *FAST, *overrides])
    return train(cfg, tmp_path), cfg


@pytest.mark.parametrize("method,prototype", [("propetl", "lora"), ("petl", "adapter")])
def test_few_steps_on_rte(tmp_path, glue_dir, method, prototype):
    metrics, cfg = run(tmp_path, glue_dir, "task=rte", f"method={method}", f"prototype={prototype}", "trainer.max_steps=4")
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["test"] == metrics["test"] and 0.0 <= metrics["test"]["accuracy"] <= 1.0
    assert on_disk["steps"] == 4 and on_disk["train_examples"] == 32
    assert (on_disk["selection"].keys(), on_disk["test"].keys()) == ({"accuracy"}, {"accuracy"})
    s = on_disk["storage"]
    assert s["file_bytes"] > 0 and s["backbone_params"] == 22_565_376          # MiniLM without pooler and classifier
    if method == "propetl":
        assert 0.19 < s["storage_ratio_to_plain_petl"] < 0.21                    # ~ 1/6 + 1/32 on 6 layers
        assert s["mask_ones"] == math.ceil(0.1 * s["mask_entries"] / 4) * 4 or s["mask_density"] == pytest.approx(0.1, abs=1e-3)

    # the saved checkpoint predicts exactly what the trained model predicted on the test split
    model, _ = storage.load_checkpoint(tmp_path / "checkpoint")
    split = load_glue(cfg.task, glue_dir)["test"]
    loader = make_loader(split, load_tokenizer(cfg.model), 128, False, 64, shuffle=False)
    logits, labels = predict(model, loader, torch.device("cpu"))
    assert (logits.argmax(-1) == labels).mean() == pytest.approx(metrics["test"]["accuracy"])


def test_regression_task_stsb(tmp_path, glue_dir):
    metrics, _ = run(tmp_path, glue_dir, "task=stsb", "method=petl", "prototype=lora", "trainer.max_steps=2")
    assert set(metrics["test"]) == {"pearson", "spearman", "combined"}
    assert metrics["glue_score"] == pytest.approx((metrics["test"]["pearson"] + metrics["test"]["spearman"]) / 2)
