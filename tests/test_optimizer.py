"""The runner's optimizer gives PETL weights, mask scores and the head the learning rates the config names."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_batch

from propetl import methods
from propetl.configs import ModelSetup
from propetl.models import backbone
from propetl.run import loop

LR, MASK_LR, HEAD_LR = 1e-3, 2e-2, 5e-3


def optimizer_for(tiny_cfg, prototype, *extra):
    cfg = tiny_cfg("method=propetl", f"prototype={prototype}", f"trainer.lr={LR}", f"mask.lr={MASK_LR}",
                   f"trainer.head_lr={HEAD_LR}", "trainer.weight_decay=0.0", "mask.weight_decay=0.0",
                   "trainer.warmup_ratio=0.0", *extra)
    torch.manual_seed(0)
    model = backbone.build(ModelSetup.from_config(cfg), 2)
    heads = backbone.head_parameter_names(model)
    optimizer, scheduler = loop.make_optimizer(model, cfg, heads, total_steps=10)
    return model, heads, optimizer, scheduler


def role(name, parameter, heads, scores) -> str:
    if id(parameter) in scores:
        return "mask"
    return "head" if name in heads else "prototype"


@pytest.mark.parametrize("prototype", ["adapter", "lora", "prefix"])
def test_each_trainable_parameter_gets_its_roles_learning_rate_once(tiny_cfg, prototype):
    model, heads, optimizer, _ = optimizer_for(tiny_cfg, prototype)
    scores = {id(p) for p in methods.petl_weights(model).score_parameters()}
    lr_of = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            assert id(p) not in lr_of, "a parameter in two groups"
            lr_of[id(p)] = group["lr"]
    expected = {"mask": MASK_LR, "head": HEAD_LR, "prototype": LR}
    seen = set()
    for name, p in model.named_parameters():
        if p.requires_grad:
            kind = role(name, p, heads, scores)
            seen.add(kind)
            assert lr_of.pop(id(p)) == pytest.approx(expected[kind]), name
        else:
            assert id(p) not in lr_of, f"frozen {name} is optimised"
    assert seen == {"mask", "head", "prototype"} and not lr_of


def test_one_step_moves_each_role_by_its_learning_rate(tiny_cfg):
    """Adam's first step moves every parameter with a gradient by about its lr (|update| = lr * |g| / (|g| + eps)):
    a mask lr swapped with the weights' lr, or the head's, fails here. Prefix: its table starts non-zero, so the
    first step reaches the mask scores (adapter's up and LoRA's B start at zero: no score gradient yet)."""
    model, heads, optimizer, scheduler = optimizer_for(tiny_cfg, "prefix")
    scores = {id(p) for p in methods.petl_weights(model).score_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.train()
    model(**tiny_batch()).loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer.step()
    scheduler.step()
    expected = {"mask": MASK_LR, "head": HEAD_LR, "prototype": LR}
    checked = set()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        moved = (p.detach() - before[name]).abs()
        big = grads[name].abs() > 1e-6                        # 100x Adam's eps: the step is the lr itself (1%)
        if big.any():
            checked.add(role(name, p, heads, scores))
            torch.testing.assert_close(moved[big], torch.full_like(moved[big], expected[role(name, p, heads, scores)]),
                                       rtol=2e-2, atol=0)
    assert checked == {"mask", "head", "prototype"}
