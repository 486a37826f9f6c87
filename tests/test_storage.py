"""Storage arithmetic against a hand count on the tiny BERT (hidden 32, 2 layers), and real file sizes."""
from __future__ import annotations

import pytest
import torch
from conftest import TINY

from propetl.configs import ModelSetup
from propetl.models import backbone
from propetl.storage import accounting, checkpoint

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
    model = backbone.build(ModelSetup.from_config(cfg), 2)
    heads = backbone.head_parameter_names(model)
    backbone_params = sum(p.numel() for n, p in model.named_parameters() if n not in heads and not n.startswith("petl_weights."))
    figures = accounting.account(model, ModelSetup.from_config(cfg), backbone_params)
    if tmp_path is not None:
        checkpoint.save_checkpoint(model, ModelSetup.from_config(cfg), tmp_path / "checkpoint")
        figures.update(checkpoint.file_sizes(tmp_path / "checkpoint"))
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


@pytest.mark.parametrize("prototype", list(CASES))
def test_checkpoint_files_hold_the_prototype_once_and_one_bit_a_mask_entry(tiny_cfg, tmp_path, prototype):
    """Read back what a saved ProPETL checkpoint holds: the prototype's tensors once (fp32), a mask per layer over
    each masked tensor at the configured density, packed at one bit an entry; a plain PETL checkpoint holds L copies."""
    from safetensors import safe_open

    _, per_layer, masked = CASES[prototype]
    figures_for(tiny_cfg, "propetl", prototype, tmp_path / "propetl", "storage.mask_coding=bits", "mask.sparsity=0.75")
    figures_for(tiny_cfg, "petl", prototype, tmp_path / "petl")
    propetl_dir, petl_dir = tmp_path / "propetl" / "checkpoint" / "shared", tmp_path / "petl" / "checkpoint" / "shared"

    with safe_open(propetl_dir / checkpoint.DENSE_FILE["propetl"], "pt") as f:
        prototype_tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert all(t.dtype == torch.float32 for t in prototype_tensors.values())
    assert sum(t.numel() for t in prototype_tensors.values()) == per_layer          # once, not once a layer
    with safe_open(petl_dir / checkpoint.DENSE_FILE["petl"], "pt") as f:
        assert sum(f.get_tensor(k).numel() for k in f.keys()) == L * per_layer

    masks = checkpoint.read_masks(propetl_dir / checkpoint.LAYER_MASKS_FILE)
    assert sorted(m.numel() for m in masks.values()) == sorted(L * n for n in masked)  # [layers, *tensor's shape]
    for m in masks.values():
        assert m.shape[0] == L and set(m.unique().tolist()) <= {0, 1}
        per_layer_kept = m.reshape(L, -1).sum(dim=1)
        assert per_layer_kept.tolist() == [m[0].numel() // 4] * L                     # sparsity 0.75: a quarter kept
    with safe_open(propetl_dir / checkpoint.LAYER_MASKS_FILE, "pt") as f:
        stored_bytes = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
    bits_bytes = sum(L * n // 8 for n in masked)
    assert bits_bytes <= stored_bytes <= bits_bytes + 32 + 8 * len(masks)              # + digest and row padding
