"""method=peft, the reference row: Hugging Face PEFT's LoRA against our plain LoRA (method=petl prototype=lora),
on the tiny random BERT. Tests that need the optional package skip with a reason when it is missing."""
from __future__ import annotations

import sys

import pytest
import torch
from conftest import TINY, tiny_batch
from test_cli import propetl_train
from test_methods import logits, train_steps

from propetl import methods
from propetl.configs import ModelSetup
from propetl.models import backbone
from propetl.run import loop
from propetl.storage import accounting, checkpoint
from propetl.validate import ConfigError, validate

R, LR, HEAD_LR = 4, 1e-3, 5e-3
TARGETS = ("query", "value")
LORA_PARAMS = len(TARGETS) * TINY["layers"] * (R * TINY["hidden"] * 2)      # A [r, h] + B [h, r] per target per layer


@pytest.fixture
def peft():
    return pytest.importorskip("peft", reason="method=peft needs the optional package peft: pip install 'propetl[peers]'")


def build(tiny_cfg, method: str, *overrides: str):
    """method=petl or peft with LoRA r=4 and distinct PETL / head lrs, validated like a run."""
    cfg = tiny_cfg(f"method={method}", "prototype=lora", f"prototype.r={R}", f"trainer.lr={LR}",
                   f"trainer.head_lr={HEAD_LR}", "trainer.warmup_ratio=0.0", *overrides)
    validate(cfg)
    torch.manual_seed(0)
    return backbone.build(ModelSetup.from_config(cfg), 2), cfg


def lora_pair(model, layer: int, target: str):
    """PEFT's (lora_A, lora_B) weights of one layer's target projection."""
    module = getattr(backbone.encoder_layers(model)[layer].attention.self, target)
    return module.lora_A["default"].weight, module.lora_B["default"].weight


# ----------------------------------------------------------------------------- (a) it trains

def test_peft_trains_lora_and_head_and_nothing_else(tiny_cfg, peft):
    model, cfg = build(tiny_cfg, "peft")
    assert type(model).__name__ == "BertForSequenceClassification"         # injected in place, class kept
    heads = backbone.head_parameter_names(model)
    lora = methods.peft_parameters(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert all(torch.all(lora_pair(model, l, t)[1] == 0) for l in range(TINY["layers"]) for t in TARGETS)   # B starts at 0
    optimizer, scheduler = loop.make_optimizer(model, cfg, heads, total_steps=5)
    model.train()
    batch, losses = tiny_batch(), []
    for _ in range(5):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    after = dict(model.named_parameters())
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert moved == set(lora) | heads                  # every LoRA tensor and the whole head (pooler too); backbone frozen
    assert all(torch.any(lora_pair(model, l, t)[1] != 0) for l in range(TINY["layers"]) for t in TARGETS)


# ----------------------------------------------------------------------------- (b) counts and storage

def test_lora_counts_match_petl_and_storage_is_peft_files(tiny_cfg, tmp_path, peft):
    figures, files = {}, {}
    for method in ("petl", "peft"):
        model, cfg = build(tiny_cfg, method)
        heads = backbone.head_parameter_names(model)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        petl = {n for n in trainable if n not in heads}
        assert sum(dict(model.named_parameters())[n].numel() for n in petl) == LORA_PARAMS
        if method == "peft":
            assert petl == set(methods.peft_parameters(model)) and len(petl) == 2 * len(TARGETS) * TINY["layers"]
        figures[method] = accounting.account(model, ModelSetup.from_config(cfg), accounting.backbone_params(model, heads))
        checkpoint.save_checkpoint(model, ModelSetup.from_config(cfg), tmp_path / method)
        files[method] = checkpoint.file_sizes(tmp_path / method)
    same = ("trainable_params", "trainable_params_with_head", "stored_params", "plain_petl_params", "head_params",
            "backbone_params", "mask_entries")
    assert {k: figures["peft"][k] for k in same} == {k: figures["petl"][k] for k in same}
    s, f = figures["peft"], files["peft"]
    assert s["stored_params"] == s["trainable_params"] == s["plain_petl_params"] == LORA_PARAMS
    # what a task keeps is PEFT's own two files, byte for byte as the checkpoint holds them
    adapter = f["file_bytes/shared/adapter_model.safetensors"] + f["file_bytes/shared/adapter_config.json"]
    assert s["storage_bytes"] == s["adapter_bytes"] == adapter == f["file_bytes"]
    assert s["storage_bytes_with_head"] == adapter + 4 * s["head_params"]
    assert 4 * LORA_PARAMS < f["file_bytes/shared/adapter_model.safetensors"] < 4 * LORA_PARAMS + 4096
    assert s["storage_counted"].startswith("LORA: lora_A, lora_B")
    head_bytes = {m: files[m]["file_bytes_with_head"] - files[m]["file_bytes"] for m in files}
    assert head_bytes["peft"] == head_bytes["petl"] > 0


# ----------------------------------------------------------------------------- (c) the same math

def test_our_lora_and_peft_lora_give_the_same_logits_for_the_same_weights(tiny_cfg, peft):
    ours, _ = build(tiny_cfg, "petl")
    train_steps(ours)                                  # B leaves zero, the head moves
    theirs, _ = build(tiny_cfg, "peft")
    ours_params = dict(ours.named_parameters())
    store = methods.petl_weights(ours).weights
    with torch.no_grad():
        for name, parameter in theirs.named_parameters():
            if name in backbone.head_parameter_names(theirs):
                parameter.copy_(ours_params[name])
        assert not torch.allclose(logits(theirs), logits(ours), atol=1e-4)      # their B is still zero
        for layer in range(TINY["layers"]):
            for target in TARGETS:
                a, b = lora_pair(theirs, layer, target)
                a.copy_(store[f"{target}_A"][layer])
                b.copy_(store[f"{target}_B"][layer])
    torch.testing.assert_close(logits(theirs), logits(ours), rtol=0.0, atol=1e-6)
    assert lora_pair(theirs, 0, "query")[0].shape == (R, TINY["hidden"])
    assert backbone.encoder_layers(theirs)[0].attention.self.query.scaling["default"] == \
        backbone.encoder_layers(ours)[0].attention.self.query.scaling                     # alpha / r


# ----------------------------------------------------------------------------- (d) optimizer groups

def group_summary(optimizer) -> list[tuple]:
    return [(g["name"], g["initial_lr"], g["weight_decay"], sum(p.numel() for p in g["params"]))
            for g in optimizer.param_groups]


def test_optimizer_groups_lora_at_method_lr_head_and_pooler_at_head_lr(tiny_cfg, peft):
    model, cfg = build(tiny_cfg, "peft")
    heads = backbone.head_parameter_names(model)
    optimizer, _ = loop.make_optimizer(model, cfg, heads, total_steps=10)
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert set(groups) == {"weights", "head", "head_no_decay"}
    params = dict(model.named_parameters())

    def ids(parameters):
        return {id(p) for p in parameters}

    assert ids(groups["weights"]["params"]) == ids(methods.peft_parameters(model).values())
    assert groups["weights"]["initial_lr"] == cfg.trainer.lr == LR
    assert ids(groups["head"]["params"] + groups["head_no_decay"]["params"]) == ids(params[n] for n in heads)
    assert groups["head"]["initial_lr"] == groups["head_no_decay"]["initial_lr"] == cfg.trainer.head_lr == HEAD_LR
    pooler = {n for n in heads if ".pooler." in n}
    assert pooler and all(params[n].requires_grad for n in pooler)
    assert ids(params[n] for n in pooler) <= ids(groups["head"]["params"] + groups["head_no_decay"]["params"])
    petl, petl_cfg = build(tiny_cfg, "petl")
    petl_heads = backbone.head_parameter_names(petl)
    assert group_summary(optimizer) == group_summary(loop.make_optimizer(petl, petl_cfg, petl_heads, total_steps=10)[0])


# ----------------------------------------------------------------------------- checkpoint and merge

def test_save_load_merge_give_identical_predictions(tiny_cfg, tmp_path, peft):
    model, cfg = build(tiny_cfg, "peft")
    train_steps(model)
    expected = logits(model)
    checkpoint.save_checkpoint(model, ModelSetup.from_config(cfg), tmp_path / "checkpoint")
    assert sorted(p.name for p in (tmp_path / "checkpoint").rglob("*") if p.is_file()) == \
        ["adapter_config.json", "adapter_model.safetensors", "head.safetensors", "manifest.json", "manifest.json",
         "propetl.json", "task.json"]
    loaded, saved = checkpoint.load_checkpoint(tmp_path / "checkpoint")
    assert saved.method.name == "peft" and torch.equal(logits(loaded), expected)
    methods.merge(loaded, backbone.encoder_layers(loaded), "lora")
    assert not methods.peft_parameters(loaded)
    assert all(type(getattr(layer.attention.self, t)) is torch.nn.Linear
               for layer in backbone.encoder_layers(loaded) for t in TARGETS)        # the bare model's cost
    torch.testing.assert_close(logits(loaded), expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- (e) bad input

def test_peft_needs_prototype_lora(tiny_cfg):
    with pytest.raises(ConfigError) as error:
        validate(tiny_cfg("method=peft", "prototype=adapter"))
    message = str(error.value)
    assert "\n" not in message and "prototype.name='adapter'" in message and "allowed: lora" in message


def test_peft_config_null_is_no_arguments_and_a_number_is_one_line(tiny_cfg, peft):
    validate(tiny_cfg("method=peft", "prototype=lora", "peft.config=null"))            # LoraConfig()
    with pytest.raises(ConfigError) as error:
        validate(tiny_cfg("method=peft", "prototype=lora", "peft.config=5"))
    message = str(error.value)
    assert "\n" not in message and "peft.config=5 is invalid" in message and "a mapping of LoraConfig's" in message


def test_peft_with_another_prototype_exits_2_on_the_command_line(tmp_path):
    result = propetl_train(tmp_path, "method=peft", "prototype=prefix", "logger.mode=disabled")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "prototype.name='prefix'" in lines[0] and "lora" in lines[0], result.stderr
    assert not (tmp_path / "run").exists()


def test_missing_peft_is_one_line(tiny_cfg, tmp_path, monkeypatch, peft):
    model, cfg = build(tiny_cfg, "peft")
    checkpoint.save_checkpoint(model, ModelSetup.from_config(cfg), tmp_path / "checkpoint")
    monkeypatch.setitem(sys.modules, "peft", None)                        # as if it were not installed
    with pytest.raises(ConfigError) as error:
        validate(cfg)
    assert str(error.value) == "method=peft needs the optional package peft: pip install 'propetl[peers]'"
    with pytest.raises(checkpoint.CheckpointError) as error:
        checkpoint.load_checkpoint(tmp_path / "checkpoint")
    assert "\n" not in str(error.value) and str(error.value).endswith(methods.PEFT_MISSING)


def test_get_peft_model_on_the_encoder_gives_inject_adapter_in_models_weights(tiny_cfg, peft):
    """methods/peft_tuners.py adapts with get_peft_model (inject_adapter_in_model refuses VeRA, VB-LoRA, …); for LoRA,
    the path the reference row took before, both draw the same LoRA weights from the same seed, names and order too."""
    model, cfg = build(tiny_cfg, "peft")
    torch.manual_seed(0)
    before = backbone.load_backbone(cfg.model, 2)
    peft.inject_adapter_in_model(peft.LoraConfig(r=R, lora_alpha=cfg.prototype.alpha, lora_dropout=0.0,
                                                 target_modules=list(TARGETS), bias="none"), before)
    ours, theirs = list(model.named_parameters()), list(before.named_parameters())
    assert [n for n, _ in ours] == [n for n, _ in theirs]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(ours, theirs))
