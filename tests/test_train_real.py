"""Real few-step runs on real GLUE data with the embedded pre-trained MiniLM (marked slow: ~10-30 s each)."""
from __future__ import annotations

import importlib.util
import json

import pytest
from conftest import compose_cfg

from propetl.cli.evaluate import evaluate_checkpoint
from propetl.run.train import train

pytestmark = pytest.mark.slow
FAST = ["trainer.batch_size=8", "trainer.eval_batch_size=64", "logger.mode=disabled", "trainer.progress=false"]


def run(tmp_path, glue_dir, *overrides):
    cfg = compose_cfg([f"data.dir={glue_dir}", *FAST, *overrides])
    return train(cfg, tmp_path), cfg


PEFT = pytest.param("peft", "lora", marks=pytest.mark.skipif(
    importlib.util.find_spec("peft") is None, reason="method=peft needs the optional package peft: pip install 'propetl[peers]'"))


@pytest.mark.parametrize("method,prototype", [("propetl", "lora"), ("petl", "adapter"), PEFT])
def test_few_steps_on_rte(tmp_path, glue_dir, method, prototype):
    metrics, cfg = run(tmp_path, glue_dir, "task=rte", f"method={method}", f"prototype={prototype}", "trainer.max_steps=4")
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["test"] == metrics["test"] and 0.0 <= metrics["test"]["accuracy"] <= 1.0
    assert on_disk["steps"] == 4 and on_disk["train_examples"] == 32
    assert (on_disk["selection"].keys(), on_disk["test"].keys()) == ({"accuracy"}, {"accuracy"})
    trivial = on_disk["trivial"]                      # always-majority on RTE's test half of dev
    assert trivial["rule"].startswith("majority class") and 0.4 < trivial["test"]["accuracy"] < 0.6
    s = on_disk["storage"]
    assert s["file_bytes"] > 0 and s["backbone_params"] == 22_565_376          # MiniLM without pooler and classifier
    if method == "propetl":
        assert 0.19 < s["storage_ratio_to_plain_petl"] < 0.21                    # ~ 1/6 + 1/32 on 6 layers
        # LoRA r=16 on MiniLM: A [16, 384] and B [384, 16] for query and value, 6144 entries each, 6 layers;
        # sparsity 0.9 keeps 6144 - floor(0.9 * 6144) = 615 ones in every one of the 24 masks.
        assert (s["mask_entries"], s["mask_ones"]) == (24 * 6144, 24 * 615)
    if method == "peft":    # PEFT's LoRA keeps what our plain LoRA keeps, A and B for query and value, 6 layers, in
        # PEFT's own two files: the storage figure is their bytes, as on disk
        assert s["stored_params"] == s["plain_petl_params"] == 24 * 6144 and s["storage_bytes"] == s["file_bytes"]
        assert 1.0 < s["storage_ratio_to_plain_petl"] < 1.01

    # the saved checkpoint predicts what the trained model predicted on the test split, merged or not
    for merge in (False, True):
        scored = evaluate_checkpoint(tmp_path / "checkpoint", "test", merge=merge, data_dir=glue_dir)
        assert scored["accuracy"] == pytest.approx(metrics["test"]["accuracy"]) and scored["examples"] == 139


def test_regression_task_stsb(tmp_path, glue_dir):
    metrics, _ = run(tmp_path, glue_dir, "task=stsb", "method=petl", "prototype=lora", "trainer.max_steps=2")
    assert set(metrics["test"]) == {"pearson", "spearman", "combined"}
    assert metrics["glue_score"] == pytest.approx((metrics["test"]["pearson"] + metrics["test"]["spearman"]) / 2)


@pytest.mark.parametrize("task,names", [("mrpc", {"accuracy", "f1", "combined"}), ("cola", {"matthews"})])
def test_task_metrics_appear(tmp_path, glue_dir, task, names):
    metrics, _ = run(tmp_path, glue_dir, f"task={task}", "method=propetl", "prototype=adapter", "trainer.max_steps=1",
                     "trainer.save_weights=false")
    assert set(metrics["test"]) == names == set(metrics["selection"])
