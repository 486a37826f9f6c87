"""Storage arithmetic against a hand count on the tiny BERT (hidden 32, 2 layers), and real file sizes."""
from __future__ import annotations

import pytest
import torch

from conftest import TINY
from propetl import storage
from propetl import model as backbone

H, L = TINY["hidden"], TINY["layers"]
# Hand count of the tiny backbone without its head: embeddings (word 100x32, position 64x32, type 2x32,
# LayerNorm 2x32) + per layer (q, k, v, o: 32x32+32 each; LN 64; FFN 32x64+64 and 64x32+32; LN 64).
BACKBONE = (100 * 32 + 64 * 32 + 2 * 32 + 64) + L * (4 * (32 * 32 + 32) + 64 + (32 * 64 + 64) + (64 * 32 + 32) + 64)
HEAD = (32 * 32 + 32) + (32 * 2 + 2)         # BERT pooler (dense + tanh) + classifier

# One layer's module, by hand:
#   adapter, reduction factor 4 -> bottleneck 8: down 8x32 + 8, up 32x8 + 32   (masked: the two weights)
#   LoRA r=4 on query and value: A 4x32 + B 32x4, twice                         (all four masked)
#   prefix length 4: one [4, 2*32] key/value table                              (masked)
CASES = {
    "adapter": (["prototype.reduction_factor=4"], 8 * 32 + 8 + 32 * 8 + 32, [8 * 32, 32 * 8]),
    "lora": (["prototype.r=4"], 4 * (4 * 32), [4 * 32] * 4),
    "prefix": (["prototype.length=4"], 4 * 64, [4 * 64]),
}


def figures_for(tiny_cfg, method, prototype, tmp_path=None, *extra):
    overrides, _, _ = CASES[prototype]
    cfg = tiny_cfg(f"method={method}", f"prototype={prototype}", *overrides, *extra)
    torch.manual_seed(0)
    model = backbone.build(cfg, 2)
    heads = backbone.head_parameter_names(model)
    backbone_params = sum(p.numel() for n, p in model.named_parameters() if n not in heads and not n.startswith("petl_weights."))
    figures = storage.account(model, cfg, heads, backbone_params)
    if tmp_path is not None:
        storage.save_checkpoint(model, cfg, heads, tmp_path / "checkpoint")
        figures.update(storage.file_sizes(tmp_path / "checkpoint"))
    return figures


def test_backbone_and_head_hand_count(tiny_cfg):
    figures = figures_for(tiny_cfg, "petl", "adapter")
    assert figures["backbone_params"] == BACKBONE == 22464
    assert figures["head_params"] == HEAD == 1122


@pytest.mark.parametrize("prototype", list(CASES))
def test_plain_petl_hand_count(tiny_cfg, prototype):
    _, per_layer, _ = CASES[prototype]
    f = figures_for(tiny_cfg, "petl", prototype)
    assert f["stored_params"] == L * per_layer == f["plain_petl_params"]
    assert f["mask_entries"] == 0
    assert f["storage_bits"] == 32 * L * per_layer
    assert f["storage_bytes"] == 4 * L * per_layer
    assert f["storage_ratio_to_plain_petl"] == 1.0
    assert f["storage_bytes_with_head"] == 4 * (L * per_layer + HEAD)


@pytest.mark.parametrize("prototype", list(CASES))
def test_propetl_hand_count(tiny_cfg, tmp_path, prototype):
    _, per_layer, masked = CASES[prototype]
    f = figures_for(tiny_cfg, "propetl", prototype, tmp_path, "storage.mask_coding=bits")   # files: 1 bit an entry too
    mask_entries = L * sum(masked)                                   # one bit per entry, per layer
    assert f["prototype_params"] == f["stored_params"] == per_layer   # the prototype, once
    assert f["mask_entries"] == mask_entries
    assert f["storage_bits"] == 32 * per_layer + mask_entries
    assert f["storage_bytes"] == 4 * per_layer + sum(L * n // 8 for n in masked)
    assert f["storage_fp32_params"] == per_layer + mask_entries / 32
    assert f["storage_ratio_to_plain_petl"] == pytest.approx((per_layer + mask_entries / 32) / (L * per_layer))
    assert f["storage_percent_of_backbone"] == pytest.approx(100 * (per_layer + mask_entries / 32) / BACKBONE)
    assert f["storage_bytes_with_head"] == f["storage_bytes"] + 4 * HEAD
    # The files on disk: the computed figure plus a few hundred bytes of safetensors headers (and the masks'
    # 32-byte digest; format 2 packs all masks into one tensor, so no per-tensor byte padding).
    assert 0 < f["file_bytes"] - f["storage_bytes"] < 800
    assert 0 < f["file_bytes_with_head"] - f["storage_bytes_with_head"] < 1200


def test_propetl_trains_more_than_it_stores(tiny_cfg):
    """Scores are fp32 while training; only their bits are kept."""
    _, per_layer, masked = CASES["adapter"]
    f = figures_for(tiny_cfg, "propetl", "adapter")
    assert f["trainable_params"] == per_layer + L * sum(masked)


def test_ratio_follows_one_over_layers_plus_one_over_32():
    """The paper's ~10%: for weight-dominated prototypes the ratio is about 1/L + 1/32."""
    for layers in (6, 12):
        per_layer = 98_304                                            # LoRA r=32 on q, v at hidden 768
        ratio = (per_layer + layers * per_layer / 32) / (layers * per_layer)
        assert ratio == pytest.approx(1 / layers + 1 / 32)
    assert 1 / 12 + 1 / 32 == pytest.approx(0.1146, abs=1e-4)
