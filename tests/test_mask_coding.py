"""Mask coding (propetl/storage/mask_coding.py) and the storage it gives: lossless masks near log2 C(n, k), corrupted
streams refused, format-1 checkpoints upgraded, half-precision dense tensors, the on-disk ratios."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from conftest import compose_cfg, format1_packed_masks, tiny_batch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from propetl import methods, report
from propetl.cli import upgrade
from propetl.configs import MaskConfig, ModelSetup
from propetl.models import backbone
from propetl.run import log
from propetl.storage import accounting, checkpoint, files, mask_coding
from propetl.validate import ConfigError, validate


def random_masks(seed: int, shapes: list[tuple[int, ...]], densities: list[float]) -> dict[str, torch.Tensor]:
    """0/1 tensors of the given shapes, each mask (first dimension) with its own random count of ones."""
    rng = np.random.default_rng(seed)
    out = {}
    for index, (shape, density) in enumerate(zip(shapes, densities)):
        rows = shape[0] if len(shape) >= 2 else 1
        n = math.prod(shape) // rows if rows else 0
        values = np.zeros((rows, n), dtype=np.float32)
        for row in values:
            row[rng.permutation(n)[: rng.binomial(n, density)]] = 1.0
        out[f"tensor.{index}"] = torch.from_numpy(values).reshape(shape)
    return out


def bound_bytes(masks: dict[str, torch.Tensor]) -> float:
    return mask_coding.information_bits_of(masks) / 8


def mask_count(masks: dict[str, torch.Tensor]) -> int:
    return sum(m.shape[0] if m.dim() >= 2 else 1 for m in masks.values())


SHAPES = st.lists(st.integers(0, 24), min_size=1, max_size=3).map(tuple)
DENSITY = st.sampled_from([0.0, 0.001, 0.05, 0.1, 0.3, 0.5, 0.9, 1.0]) | st.floats(0.0, 1.0)


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), shapes=st.lists(SHAPES, min_size=1, max_size=4), data=st.data())
def test_random_masks_decode_bit_exact_near_their_information(seed, shapes, data):
    densities = [data.draw(DENSITY) for _ in shapes]
    masks = random_masks(seed, shapes, densities)
    for coding in mask_coding.CODINGS:
        tensors, metadata = mask_coding.encode(masks, coding)
        decoded = mask_coding.decode(tensors, metadata)
        assert list(decoded) == list(masks)
        for name, mask in masks.items():
            assert decoded[name].shape == tuple(mask.shape) and np.array_equal(decoded[name], mask.numpy())
    size = accounting.MaskFile(masks).coded_bytes("entropy")               # digest + payload
    assert size <= 1.01 * bound_bytes(masks) + 64 * max(1, mask_count(masks))      # (no mask: the digest)


def test_learned_size_masks_cost_their_information_plus_a_few_bytes():
    """Masks the size of roberta-base's LoRA (12 layers x [32, 768]) at sparsity 0.9: within 0.1% + 8 bytes a mask."""
    masks = random_masks(0, [(12, 32, 768)] * 4, [0.1] * 4)
    size = accounting.MaskFile(masks).coded_bytes("entropy")
    assert bound_bytes(masks) < size <= 1.001 * bound_bytes(masks) + 8 * mask_count(masks)
    assert accounting.MaskFile(masks).coded_bytes("bits") == 32 + 4 * 12 * 32 * 768 // 8        # digest + 1 bit an entry


def test_information_bits_is_log2_binomial():
    assert mask_coding.information_bits(10, 3) == pytest.approx(math.log2(math.comb(10, 3)))
    assert mask_coding.information_bits(6144, 615) == pytest.approx(math.log2(math.comb(6144, 615)))
    assert mask_coding.information_bits(7, 0) == mask_coding.information_bits(7, 7) == 0


def test_not_a_mask_is_refused():
    with pytest.raises(ValueError, match="other than 0 and 1"):
        mask_coding.encode({"w": torch.tensor([[0.0, 0.5]])}, "entropy")
    with pytest.raises(ValueError, match="storage.mask_coding='zip'"):
        mask_coding.encode({"w": torch.ones(2, 2)}, "zip")


@pytest.mark.parametrize("coding", mask_coding.CODINGS)
def test_every_flipped_byte_is_refused_in_one_line(tmp_path, coding):
    """Any byte of the file flipped: a one-line CheckpointError, or (a harmless header byte) the same masks;
    never a wrong mask. A flipped byte of the coded data is always refused."""
    cfg = compose_cfg([f"storage.mask_coding={coding}"])
    masks = random_masks(3, [(3, 4, 20), (2, 50)], [0.1, 0.6])
    path = tmp_path / "masks.safetensors"
    checkpoint.save_masks(accounting.MaskFile(masks), path, cfg.storage.mask_coding)
    raw = path.read_bytes()
    data_start = 8 + int.from_bytes(raw[:8], "little")
    for position in range(len(raw)):
        broken = bytearray(raw)
        broken[position] ^= 0x5A
        path.write_bytes(bytes(broken))
        try:
            decoded = checkpoint.read_masks(path)
        except checkpoint.CheckpointError as error:
            assert "\n" not in str(error) and str(path) in str(error)
            continue
        assert position < data_start, f"flipped data byte {position} was not refused"
        assert all(torch.equal(decoded[name], mask) for name, mask in masks.items())


def test_corrupted_stream_message(tmp_path):
    path = tmp_path / "masks.safetensors"
    checkpoint.save_masks(accounting.MaskFile(random_masks(1, [(6, 300)], [0.1])), path, compose_cfg().storage.mask_coding)
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(checkpoint.CheckpointError, match="SHA-256 check"):
        checkpoint.read_masks(path)


# ----------------------------------------------------------------------------- checkpoints


def tiny_propetl(tiny_cfg, *overrides):
    cfg = tiny_cfg("method=propetl", "prototype=lora", "prototype.r=4", "mask.sparsity=0.9", *overrides)
    torch.manual_seed(0)
    model = backbone.build(ModelSetup.from_config(cfg), 2)
    return model, cfg, backbone.head_parameter_names(model)


def write_flat(directory, model):  # what propetl-upgrade reads
    """Turn a one-task checkpoint into the flat layout propetl wrote before format 4 (format 3): propetl.json, the
    dense file, masks.safetensors and head.safetensors side by side, the head under the transformers model's names."""
    shared, part = directory / checkpoint.SHARED_DIR, next((directory / checkpoint.TASKS_DIR).iterdir())
    config = json.loads((shared / checkpoint.CONFIG_FILE).read_text())
    name = config.pop("tasks")[0]
    config = {**config, "format_version": 3, "task": {"name": name, "num_labels": config.pop("num_labels")[name]}}
    del config["task_masks"]
    for path in shared.glob("*.safetensors"):
        path.rename(directory / (upgrade.FLAT_MASKS_FILE if path.name == checkpoint.LAYER_MASKS_FILE else path.name))
    layout = backbone.head_layout(model)
    head = {backbone.swap_prefix(n, layout): t for n, t in load_file(part / checkpoint.HEAD_FILE).items()}
    save_file(head, str(directory / checkpoint.HEAD_FILE))
    shutil.rmtree(shared)
    shutil.rmtree(directory / checkpoint.TASKS_DIR)
    (directory / checkpoint.CONFIG_FILE).write_text(json.dumps(config))
    files.seal(directory)


def write_format1(directory):
    """Turn a checkpoint into what propetl wrote before format 2: bit-packed masks, one tensor per name."""
    masks = checkpoint.read_masks(directory / upgrade.FLAT_MASKS_FILE)
    save_file({n: format1_packed_masks(m) for n, m in masks.items()}, str(directory / upgrade.FLAT_MASKS_FILE),
              metadata={"shapes": json.dumps({n: list(m.shape) for n, m in masks.items()})})
    config = json.loads((directory / checkpoint.CONFIG_FILE).read_text())
    config["format_version"] = 1
    del config["storage"]
    (directory / checkpoint.CONFIG_FILE).write_text(json.dumps(config))
    (directory / files.MANIFEST_FILE).unlink()                 # manifests came with format 3


@pytest.mark.parametrize("version", [1, 3])
def test_a_flat_checkpoint_of_formats_1_to_3_is_upgraded_and_then_predicts_as_before(tiny_cfg, tmp_path, version):
    model, cfg, heads = tiny_propetl(tiny_cfg)
    old, new = tmp_path / "checkpoint", tmp_path / "upgraded"
    checkpoint.save_checkpoint(model, ModelSetup.from_config(cfg), old)
    write_flat(old, model)
    if version == 1:
        write_format1(old)
    with pytest.raises(checkpoint.CheckpointError) as refused:                  # the loaders read today's format only
        checkpoint.load_checkpoint(old)
    assert str(refused.value) == (f"{old} is a checkpoint of format {version}; this propetl reads format 4: "
                                  f"run `propetl-upgrade {old} NEW_FOLDER` to rewrite it")
    if version == 1:                                                            # format 1 has no manifest: asked for
        with pytest.raises(checkpoint.CheckpointError, match="pass --allow-unsealed"):
            upgrade.upgrade(old, new)
    upgrade.main([str(old), str(new), "--allow-unsealed"])
    loaded, saved = checkpoint.load_checkpoint(new)
    assert saved.format_version == 4 and saved.task.num_labels == 2 and saved.storage.mask_coding == (
        "bits" if version == 1 else cfg.storage.mask_coding)
    expected, got = accounting.stored_masks(model), accounting.stored_masks(loaded)
    assert expected.keys() == got.keys() and all(torch.equal(expected[n], got[n]) for n in expected)
    batch = tiny_batch()
    with torch.no_grad():                                                       # what the old loader gave: the model
        assert torch.equal(loaded(batch["input_ids"], batch["attention_mask"]).logits,
                           model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits)


@pytest.mark.parametrize("coding", mask_coding.CODINGS)
def test_checkpoint_round_trip_per_coding(tiny_cfg, tmp_path, coding):
    model, cfg, heads = tiny_propetl(tiny_cfg, f"storage.mask_coding={coding}")
    checkpoint.save_checkpoint(model, ModelSetup.from_config(cfg), tmp_path / "checkpoint")
    loaded, saved = checkpoint.load_checkpoint(tmp_path / "checkpoint")
    assert saved.format_version == 4 and saved.storage.mask_coding == coding
    expected, got = accounting.stored_masks(model), accounting.stored_masks(loaded)
    assert all(torch.equal(expected[n], got[n]) for n in expected)
    _, metadata = checkpoint.read_safetensors(tmp_path / "checkpoint" / "shared" / checkpoint.LAYER_MASKS_FILE)
    assert mask_coding.file_coding(metadata) == coding


def dense_data_bytes(path) -> int:
    """Bytes of a safetensors file's tensor data (without its header)."""
    raw = path.read_bytes()
    return len(raw) - 8 - int.from_bytes(raw[:8], "little")


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_halves_the_dense_bytes_and_loads_as_fp32(tiny_cfg, tmp_path, dtype):
    model, cfg, heads = tiny_propetl(tiny_cfg)
    checkpoint.save_checkpoint(model, ModelSetup.from_config(cfg), tmp_path / "fp32")
    checkpoint.save_checkpoint(model, ModelSetup.from_config(tiny_propetl(tiny_cfg, f"storage.dtype={dtype}")[1]), tmp_path / "half")
    for name in ("shared/prototype.safetensors", f"tasks/{cfg.task.name}/head.safetensors"):
        assert 2 * dense_data_bytes(tmp_path / "half" / name) == dense_data_bytes(tmp_path / "fp32" / name)
    loaded, _ = checkpoint.load_checkpoint(tmp_path / "half")
    torch_dtype = accounting.STORAGE_DTYPES[dtype]
    for name, tensor in accounting.stored_dense_tensors(model, "propetl", heads).items():
        again = accounting.stored_dense_tensors(loaded, "propetl", heads)[name]
        assert again.dtype == torch.float32 and torch.equal(again, tensor.to(torch_dtype).float())


def test_fp16_refuses_values_beyond_its_range(tiny_cfg, tmp_path):
    model, cfg, heads = tiny_propetl(tiny_cfg, "storage.dtype=fp16")
    with torch.no_grad():
        next(iter(methods.petl_weights(model).weights.values())).view(-1)[0] = 1e6
    with pytest.raises(checkpoint.CheckpointError, match="storage.dtype=fp16: .* beyond its range"):
        checkpoint.save_checkpoint(model, ModelSetup.from_config(cfg), tmp_path / "checkpoint")
    assert not (tmp_path / "checkpoint").exists()


@pytest.mark.parametrize("key,value,allowed", [("storage.dtype", "fp8", "fp32, bf16, fp16"),
                                               ("storage.mask_coding", "zip", "bits, entropy")])
def test_bad_storage_values_give_one_line(key, value, allowed):
    with pytest.raises(ConfigError) as error:
        validate(compose_cfg([f"{key}={value}"]))
    assert str(error.value) == f"{key}={value!r} is invalid; allowed: {allowed}"


def run_figures(tiny_cfg, folder):
    """A tiny ProPETL-LoRA's storage figures as a run logs them, its checkpoint written into `folder`."""
    model, cfg, heads = tiny_propetl(tiny_cfg)
    figures = accounting.account(model, ModelSetup.from_config(cfg), accounting.backbone_params(model, heads))
    checkpoint.save_checkpoint(model, ModelSetup.from_config(cfg), folder / "checkpoint")
    figures.update(checkpoint.file_figures(folder / "checkpoint", figures))
    return figures, accounting.stored_masks(model)


def test_run_figures_per_coding(tiny_cfg, tmp_path):
    figures, masks = run_figures(tiny_cfg, tmp_path)
    entries = figures["mask_entries"]
    assert figures["mask_bits_per_entry_bound"] == pytest.approx(mask_coding.information_bits_of(masks) / entries)
    assert figures["mask_bits_per_entry/bits"] == pytest.approx(8 * (32 + math.ceil(entries / 8)) / entries)
    assert figures["mask_bits_per_entry_bound"] < figures["mask_bits_per_entry/entropy"] < figures["mask_bits_per_entry/bits"]
    assert figures["file_bytes/shared/layer_masks.safetensors"] * 8 / entries == pytest.approx(figures["file_mask_bits_per_entry"])
    plain = 4 * figures["plain_petl_params"]
    assert figures["storage_ratio_to_plain_petl/entropy"] == pytest.approx(
        (4 * figures["stored_params"] + figures["mask_bytes/entropy"]) / plain)
    assert figures["file_ratio_to_plain_petl"] == pytest.approx(figures["file_bytes"] / plain)


def test_summary_table_and_report_show_storage_per_coding(tiny_cfg, tmp_path):
    figures, _ = run_figures(tiny_cfg, tmp_path)
    metrics = {"task": "rte", "model": "tiny", "method": "propetl", "prototype": "lora", "mask_kind": "learned",
               "mask_sparsity": 0.9, "seed": 1, "best_epoch": 1, "epochs_run": 1, "steps": 1, "train_seconds": 1.0,
               "selection": {"accuracy": 0.5}, "test": {"accuracy": 0.5}, "glue_score": 0.5, "storage": figures}
    table = log.summary_table(metrics)
    assert "as written: masks entropy, dense fp32" in table
    assert f"ratio to PETL, entropy{figures['storage_ratio_to_plain_petl/entropy']:>34.4f}" in table
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    section = report.coding_table(report.load_runs([tmp_path]))
    assert section.splitlines()[2].startswith("| RTE | ProPETL-LoRA | 0.9 | fp32 | entropy | ")
    assert f"| {figures['mask_bits_per_entry_bound']:.4f} |" in section and section.rstrip().endswith("| 1 |")


# ----------------------------------------------------------------------------- real shapes

def written_bytes(cfg, hidden: int, layers: int, folder) -> int:
    """Bytes of the files a checkpoint of this method keeps without its head (dense tensors, masks), written
    through checkpoint.py's own writers from the PETL store of a model of this width and depth."""
    torch.manual_seed(0)
    prototype, mask = methods.prototype_config(cfg.prototype), MaskConfig.from_config(cfg.mask)
    weights = methods.make_weights(cfg.method.name, prototype, mask, hidden, layers, for_training=False)
    folder.mkdir()
    checkpoint.save_dense(weights.base_tensors(), folder / "dense.safetensors", cfg.storage.dtype)
    if masks := weights.binary_masks():
        checkpoint.save_masks(accounting.MaskFile(masks), folder / checkpoint.LAYER_MASKS_FILE, cfg.storage.mask_coding)
    return sum(p.stat().st_size for p in folder.iterdir())


@pytest.mark.parametrize("model,hidden,layers,bound", [("minilm", 384, 6, 1 / 6 + 0.5 / 32), ("roberta-base", 768, 12, 0.10)])
def test_propetl_lora_at_sparsity_09_on_disk(tmp_path, model, hidden, layers, bound):
    """ProPETL-LoRA at sparsity 0.9, entropy-coded masks, fp32, head excluded, against plain PETL-LoRA on disk:
    ≤ 1/6 + 0.5/32 on the embedded MiniLM's shapes, ≤ 0.10 on roberta-base's."""
    propetl = compose_cfg([f"model={model}", "prototype=lora", "mask.sparsity=0.9", "storage.mask_coding=entropy"])
    petl = compose_cfg([f"model={model}", "prototype=lora", "method=petl"])
    ratio = written_bytes(propetl, hidden, layers, tmp_path / "propetl") / written_bytes(petl, hidden, layers, tmp_path / "petl")
    assert ratio <= bound
    bits = compose_cfg([f"model={model}", "prototype=lora", "mask.sparsity=0.9", "storage.mask_coding=bits"])
    assert written_bytes(bits, hidden, layers, tmp_path / "bits") / written_bytes(petl, hidden, layers, tmp_path / "petl2") > bound
