"""What a run keeps beside its metrics: each task's test predictions (predictions.npz) and the training accuracy of
every epoch (metrics.json's history). Tiny text model, real RTE data, fixed seed."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import compose_cfg, tiny_text_overrides

from propetl.configs import ModelSetup
from propetl.data import metrics as glue_metrics
from propetl.models import backbone
from propetl.run import log, loop, rundir
from propetl.run.train import train

# 48 examples at batch 8: 6 steps an epoch, 2 epochs.
RUN = ["task=rte", "method=propetl", "prototype=lora", "data.max_train_examples=48", "trainer.epochs=2",
       "mask.lr=0.05", "prototype.lr=0.01"]
STEPS_PER_EPOCH = 6


@pytest.mark.slow
def test_a_run_keeps_what_it_predicted_on_test_and_its_training_accuracy(tmp_path, tiny_text_model_dir, glue_dir,
                                                                         monkeypatch):
    predicted, steps = {}, []                 # what the loop predicted on the test split; each training step's counts
    predict_task, forward = loop.predict_task, backbone.MultiTaskModel.forward

    def recording_predict(model, loader, task_cfg, device, precision="fp32", desc="eval", progress=False):
        out = predict_task(model, loader, task_cfg, device, precision, desc, progress)
        if desc.startswith("test"):
            predicted[task_cfg.name] = out
        return out

    def recording_forward(self, *args, **kwargs):
        output = forward(self, *args, **kwargs)
        if self.training:
            labels = kwargs["labels"]
            steps.append((int((output.logits.argmax(-1) == labels).sum()), len(labels)))
        return output

    monkeypatch.setattr(loop, "predict_task", recording_predict)
    monkeypatch.setattr(backbone.MultiTaskModel, "forward", recording_forward)
    out = tmp_path / "run"
    metrics = train(compose_cfg([*tiny_text_overrides(tiny_text_model_dir, glue_dir), *RUN]), out)

    kept = log.read_predictions(out / rundir.PREDICTIONS_FILE)
    assert list(kept) == ["rte"] and kept["rte"][0].dtype == kept["rte"][1].dtype == np.int8
    assert np.array_equal(kept["rte"][0], predicted["rte"][0]) and np.array_equal(kept["rte"][1], predicted["rte"][1])
    assert len(kept["rte"][0]) == 139                                         # RTE's test half of dev
    assert glue_metrics.compute(["accuracy"], *kept["rte"]) == metrics["test"]    # the report can recompute

    assert len(steps) == 2 * STEPS_PER_EPOCH and [r["epoch"] for r in metrics["history"]] == [1, 2]
    for record, epoch in zip(metrics["history"], (steps[:STEPS_PER_EPOCH], steps[STEPS_PER_EPOCH:])):
        right, rows = map(sum, zip(*epoch))
        assert rows == 48 and record["train/accuracy"] == right / rows
    assert rundir.other_files(out) == []                # predictions.npz is a run's own file


def test_a_regression_batch_counts_no_training_accuracy(tiny_cfg):
    """STS-B has no accuracy: a multi-task record names each classification task, regression none."""
    cfg = tiny_cfg("mode=multitask", "tasks=[rte,stsb]", "trainer.epochs=1", "trainer.progress=false")
    model = backbone.MultiTaskModel(ModelSetup.from_config(cfg), ["rte", "stsb"], [2, 1], task_masks=True)
    ids = torch.randint(1, 100, (4, 6), generator=torch.Generator().manual_seed(0))
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "task": torch.full((4,), task),
                "labels": labels} for task, labels in ((0, torch.tensor([0, 1, 1, 0])), (1, torch.rand(4) * 5))]

    class Batches(list):
        generator = torch.Generator().manual_seed(0)

    result = loop.fit(model, Batches(batches), lambda m: ({}, 0.0), cfg, model.head_names(), torch.device("cpu"),
                      task_names=["rte", "stsb"])
    record, = result.history
    assert [k for k in record if k.startswith("train/")] == ["train/rte/accuracy"]
    assert record["train/rte/accuracy"] in (0.0, 0.25, 0.5, 0.75, 1.0)
