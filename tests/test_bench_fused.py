"""scripts/bench_fused.py (the issue-28 benchmark) times the runner's own fused step (propetl/run/fused.py): its check,
K fused runs against each run alone (fp32, dropout off), holds for every prototype."""
from __future__ import annotations

import types

import pytest
import torch
from test_device_script import load_script


@pytest.mark.parametrize("prototype", ["lora", "adapter"])
def test_three_fused_runs_train_as_each_run_alone(prototype):
    module = load_script("bench_fused")
    args = types.SimpleNamespace(length=16, precision="fp32", batch=4, prototype=prototype)
    assert module.check_exact(args, torch.device("cpu"), steps=3, batch=4) < 1e-5
