"""scripts/bench_fused.py's fused ProPETL-LoRA (the issue-28 benchmark): K runs over one frozen backbone are K runs
made alone — the same losses step after step (fp32, dropout off) — each run's masks keep exactly their share, and
gradients reach only a run's own slice of the stacked tensors."""
from __future__ import annotations

import types

import torch
from test_device_script import load_script


def bench():
    return load_script("bench_fused")


def test_three_fused_runs_train_as_each_run_alone():
    module = bench()
    args = types.SimpleNamespace(length=16, precision="fp32", batch=4)
    assert module.check_exact(args, torch.device("cpu"), steps=3, batch=4) < 1e-5


def test_a_runs_rows_move_only_that_runs_tensors():
    module = bench()
    cfg, encoder = module.load_encoder(torch.device("cpu"))
    p = cfg.prototype
    model = module.FusedProPETLLoRA(encoder, 3, int(p.r), float(p.alpha), list(p.targets), float(p.mask_sparsity), 2,
                                    seeds=[0, 1, 2])
    with torch.no_grad():                                    # B starts at zero, which would stop A's gradient
        for name, tensor in model.prototype.items():
            if name.endswith("_B"):
                tensor.normal_(0, 0.02)
    data = module.batch_for(3, 2, 8, torch.device("cpu"))
    losses = model(**data)
    losses[1].backward()                                     # run 1's loss alone
    for name, tensor in [*model.prototype.items(), *model.scores.items(), ("head_w", model.head_w)]:
        grad = tensor.grad
        assert grad is not None and grad[1].abs().sum() > 0, name
        assert grad[0].abs().sum() == 0 and grad[2].abs().sum() == 0, name
    masks = model._masks["query_A"]                          # [K, L, r, hidden]: keep 1 - sparsity of each
    kept = masks.flatten(2).sum(-1)
    expected = masks[0, 0].numel() - int(p.mask_sparsity * masks[0, 0].numel())
    assert torch.equal(kept, torch.full_like(kept, expected))
