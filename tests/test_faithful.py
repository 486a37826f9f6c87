"""Pinned against the reference code (../shared/paper.md §2): the initial mask-score ranges, the prefix
embedding's init and the multi-task mask density. Each changes how fast masks learn, because the
reference's mask learning rates were tuned for its score scale."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import compose_cfg

from propetl import methods
from propetl.configs import MaskConfig
from propetl.methods.masks import combine, ones_per_mask

MINILM_HIDDEN, MINILM_LAYERS = 384, 6


def propetl_weights(*overrides: str, num_tasks: int = 0):
    cfg = compose_cfg(["method=propetl", *overrides])
    torch.manual_seed(0)
    prototype, mask = methods.prototype_config(cfg.prototype), MaskConfig.from_config(cfg.mask)
    return methods.make_weights("propetl", prototype, mask, MINILM_HIDDEN, MINILM_LAYERS, num_tasks=num_tasks), cfg


def score_range(weights, name: str) -> float:
    return float(weights.masks[name].scores.detach().abs().max())


def test_adapter_score_ranges_are_the_references_transposed_layout():
    """Reference: down_mask [hidden, bottleneck] -> 1/sqrt(bottleneck); up_mask [bottleneck, hidden] -> 1/sqrt(hidden)."""
    weights, cfg = propetl_weights("prototype=adapter")
    assert int(cfg.prototype.bottleneck) == 32
    down, up = 1 / math.sqrt(32), 1 / math.sqrt(MINILM_HIDDEN)            # 0.177 and 0.051 on MiniLM
    assert down * 0.99 < score_range(weights, "down_weight") <= down
    assert up * 0.99 < score_range(weights, "up_weight") <= up


def test_lora_score_ranges_match_the_weights_layout():
    """Reference: A-mask [r, hidden] -> 1/sqrt(hidden); B-mask [hidden, r] -> 1/sqrt(r)."""
    weights, _ = propetl_weights("prototype=lora")
    a, b = 1 / math.sqrt(MINILM_HIDDEN), 1 / math.sqrt(16)
    assert a * 0.99 < score_range(weights, "query_A") <= a
    assert b * 0.99 < score_range(weights, "value_B") <= b


def test_prefix_scores_are_one_L_by_P_by_2h_tensor_and_embedding_starts_standard_normal():
    weights, cfg = propetl_weights("prototype=prefix")
    length = int(cfg.prototype.length)
    bound = 1 / math.sqrt(length * 2 * MINILM_HIDDEN)                     # 0.0064 on MiniLM (P=32): 5.7x below 1/sqrt(2h)
    assert bound * 0.99 < score_range(weights, "prefix") <= bound
    assert weights.embedding.std().item() == pytest.approx(1.0, abs=0.05)  # nn.Embedding's N(0, 1), not N(0, 0.02^2)


def test_multitask_overlay_keeps_three_tenths_of_each_mask():
    """The reference's multi-task runs keep 0.3 of task and of layer masks; OR-combined about 0.51 survive."""
    weights, cfg = propetl_weights("prototype=lora", "experiment=multitask", num_tasks=4)
    assert float(cfg.mask.sparsity) == pytest.approx(0.7)
    stack = weights.masks["query_A"]
    n = MINILM_HIDDEN * 16
    assert stack.tasks().sum(dim=1).sum().item() == 4 * ones_per_mask(n, 0.7)
    combined = combine(stack.tasks()[0], stack.layers(), "or")
    assert combined.mean().item() == pytest.approx(1 - 0.7 ** 2, abs=0.01)


def test_prefix_embedding_std_is_a_knob():
    """prototype.embedding_std=0.02 restores the small init (results/cpu: plain prefix-tuning diagnosis)."""
    weights, _ = propetl_weights("prototype=prefix", "prototype.embedding_std=0.02")
    assert weights.embedding.std().item() == pytest.approx(0.02, rel=0.05)


ONES_AT_07 = {  # n - floor(0.7 n) ones per MiniLM mask tensor (hidden 384, 6 layers), counted by hand
    "adapter": {"down_weight": 12288 - 8601, "up_weight": 12288 - 8601},             # [32, 384]: 8601.6 zeros
    "lora": {f"{t}_{m}": 6144 - 4300 for t in ("query", "value") for m in "AB"},      # [16, 384]: 4300.8 zeros
    "prefix": {"prefix": 24576 - 17203},                                              # [32, 768]: 17203.2 zeros
}


@pytest.mark.parametrize("prototype", ["adapter", "lora", "prefix"])
def test_multitask_mode_alone_keeps_three_tenths_of_each_mask(prototype):
    """mode=multitask itself (no experiment overlay) carries the reference's multi-task setting: task and layer masks
    each keep 0.3 for every prototype, exactly, and their OR about 1 - 0.7^2 = 0.51 (not 0.19 as a single-task 0.9
    would leave); |task OR layer| = |task| + |layer| - |task AND layer| on every layer."""
    tasks = ("mode=multitask", "tasks=[rte,stsb]", f"prototype={prototype}")
    assert float(compose_cfg(list(tasks)).mask.sparsity) == 0.7
    weights, _ = propetl_weights(*tasks, num_tasks=2)
    union = entries = 0
    for name, ones in ONES_AT_07[prototype].items():
        stack = weights.masks[name]
        task_masks, layer_masks = stack.tasks(), stack.layers()
        assert task_masks.reshape(2, -1).sum(dim=1).tolist() == [ones] * 2
        assert layer_masks.reshape(MINILM_LAYERS, -1).sum(dim=1).tolist() == [ones] * MINILM_LAYERS
        for task in range(2):
            combined = stack(task).reshape(MINILM_LAYERS, -1)
            both = (task_masks[task].unsqueeze(0) * layer_masks).reshape(MINILM_LAYERS, -1).sum(dim=1)
            assert combined.sum(dim=1).tolist() == (2 * ones - both).tolist()
            union, entries = union + combined.sum().item(), entries + combined.numel()
    assert union / entries == pytest.approx(1 - 0.7**2, abs=0.01)


@pytest.mark.parametrize("overrides", [("mode=multitask", "tasks=[rte,stsb]"), ("experiment=multitask",)])
def test_an_explicit_mask_sparsity_wins_over_the_multitask_default(overrides):
    for prototype in ("adapter", "lora", "prefix"):
        assert float(compose_cfg([*overrides, f"prototype={prototype}"]).mask.sparsity) == 0.7
        assert float(compose_cfg([*overrides, f"prototype={prototype}", "mask.sparsity=0.5"]).mask.sparsity) == 0.5
    single = [float(compose_cfg([f"prototype={p}"]).mask.sparsity) for p in ("adapter", "lora", "prefix")]
    assert single == [0.5, 0.9, 0.9]                                    # mode=single: the prototypes' own


def test_multitask_adapter_scores_are_shaped_like_the_t5_linear_weights():
    """Reference T5 (multi-task) scores are shaped like nn.Linear.weight: down [64, 768] -> 1/sqrt(768) = 0.0361, up
    [768, 64] -> 1/sqrt(64) = 0.125 (paper.md §2.1): the single-task (transposed) bounds swapped, for task and
    layer masks alike. One task (no task masks) stays the single-task layout."""
    cfg = compose_cfg(["model=roberta-base", "prototype=adapter", "mode=multitask", "tasks=[rte,stsb]"])
    prototype, mask = methods.prototype_config(cfg.prototype), MaskConfig.from_config(cfg.mask)
    assert int(prototype.bottleneck) == 64
    torch.manual_seed(0)
    multi = methods.make_weights("propetl", prototype, mask, 768, 12, num_tasks=2)
    single = methods.make_weights("propetl", prototype, mask, 768, 12)
    for name, fan_in, single_fan_in in (("down_weight", 768, 64), ("up_weight", 64, 768)):
        bound, single_bound = 1 / math.sqrt(fan_in), 1 / math.sqrt(single_fan_in)
        stack = multi.masks[name]
        for scores in (*stack.tasks.scores, stack.layers.scores):
            assert bound * 0.99 < float(scores.detach().abs().max()) <= bound
        assert single_bound * 0.99 < score_range(single, name) <= single_bound
    assert 1 / math.sqrt(768) == pytest.approx(0.0361, abs=1e-4) and 1 / math.sqrt(64) == 0.125
