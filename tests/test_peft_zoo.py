"""method=peft for every PEFT tuner of conf/peft/ on the tiny random BERT: it trains, its checkpoint keeps PEFT's own
files and reloads with identical logits, its storage figure is the bytes save_pretrained writes (with the method's
least-storing options), it exports; what cannot work is refused in one line. Skips without the optional peft."""
from __future__ import annotations

import json

import pytest
import torch
import transformers
from conftest import tiny_text_overrides
from test_cli import propetl_train
from test_methods import logits, train_steps

from propetl import methods
from propetl.cli.export import export
from propetl.configs import ModelSetup, group_choices
from propetl.models import backbone
from propetl.storage import accounting, checkpoint
from propetl.validate import ConfigError, validate

peft = pytest.importorskip("peft", reason="method=peft needs the optional package peft: pip install 'propetl[peers]'")

TUNERS = ("lora", "vera", "vblora", "fourierft", "unilora", "ia3", "tinylora", "loha", "lokr")
TINY_SIZES = {      # the tiny model's width 32 scales some settings to nothing: sizes that fit it
    "lora": ["prototype=lora", "prototype.r=4"],
    "vblora": ["peft.config.vector_length=16"],        # must divide 32 and 64 (the yaml: width / 3)
    "loha": ["peft.config.r=2", "peft.config.alpha=2"],
    "lokr": ["peft.config.r=2", "peft.config.alpha=2"],
}


def build(tiny_cfg, name: str, *overrides: str):
    cfg = tiny_cfg("method=peft", f"peft={name}", *TINY_SIZES.get(name, []), *overrides)
    validate(cfg)
    torch.manual_seed(0)
    return backbone.build(ModelSetup.from_config(cfg), 2), cfg


def saved_bytes(model, folder, **options) -> int:
    """What PEFT's own save_pretrained writes (the two files a task keeps) with the config's `options` set by hand."""
    config = methods.peft_module().peft_model(model).peft_config["default"]
    kept = {key: getattr(config, key) for key in options}
    for key, value in options.items():
        setattr(config, key, value)
    methods.peft_module().peft_model(model).save_pretrained(str(folder))
    for key, value in kept.items():
        setattr(config, key, value)
    return sum((folder / name).stat().st_size for name in ("adapter_model.safetensors", "adapter_config.json"))


def test_every_yaml_is_tested():
    assert set(group_choices("peft")) == set(TUNERS)


@pytest.mark.parametrize("name", TUNERS)
def test_tuner_trains_saves_reloads_and_counts_its_files(tiny_cfg, tmp_path, name):
    model, cfg = build(tiny_cfg, name)
    assert type(model).__name__ == "BertForSequenceClassification"           # adapted in place, class kept
    heads = backbone.head_parameter_names(model)
    adapter = methods.peft_parameters(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert adapter and trainable == set(adapter) | heads                       # the tuner and the head, pooler too
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(model)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert heads <= moved <= trainable and moved & set(adapter)                # the backbone stays frozen
    expected = logits(model)
    figures = accounting.account(model, ModelSetup.from_config(cfg), accounting.backbone_params(model, heads))
    checkpoint.save_checkpoint(model, ModelSetup.from_config(cfg), tmp_path / "checkpoint")
    shared = tmp_path / "checkpoint" / "shared"
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {p.name for p in shared.iterdir()}
    assert not (shared / "README.md").exists()
    loaded, saved = checkpoint.load_checkpoint(tmp_path / "checkpoint")
    assert saved.peft.name == name and torch.equal(logits(loaded), expected)
    # the figure: PEFT's files as save_pretrained writes them with the least-storing options, without / with head
    least = saved_bytes(model, tmp_path / "least", **({"save_only_topk_weights": True} if name == "vblora" else {}))
    assert figures["storage_bytes"] == figures["adapter_bytes"] == least
    assert figures["storage_bytes_with_head"] == least + 4 * figures["head_params"]
    assert figures["trainable_params"] == accounting.count(adapter.values()) == figures["stored_params"]
    assert figures["storage_counted"].startswith(str(cfg.peft.config_class).removesuffix("Config").upper()[:4])
    files = checkpoint.file_sizes(tmp_path / "checkpoint")
    assert files["file_bytes"] == saved_bytes(model, tmp_path / "full")   # the checkpoint: full files
    if name != "vblora":
        assert files["file_bytes"] == least


@pytest.mark.parametrize("name", ["vera", "vblora", "unilora"])
def test_peft_export_loads_in_peft_with_the_same_logits(tiny_cfg, tmp_path, name):
    model, cfg = build(tiny_cfg, name)
    train_steps(model)
    checkpoint.save_checkpoint(model, ModelSetup.from_config(cfg), tmp_path / "checkpoint")
    out = export(tmp_path / "checkpoint", tmp_path / "out", "peft")
    base = backbone.load_backbone(cfg.model, 2)
    theirs = peft.PeftModel.from_pretrained(base, str(out)).eval()
    torch.testing.assert_close(logits(theirs), logits(model.eval()), rtol=0.0, atol=1e-6)
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == cfg.peft.config_class.removesuffix(
        "Config").upper()
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(export(
        tmp_path / "checkpoint", tmp_path / "hf", "hf")).eval()                  # folded by PEFT: the plain model
    torch.testing.assert_close(logits(merged), logits(model), rtol=0.0, atol=1e-5)


def test_same_seed_same_adapter_for_tuners_that_draw_from_the_global_rng(tiny_cfg):
    for name in ("vblora", "fourierft"):
        first, _ = build(tiny_cfg, name)
        second, _ = build(tiny_cfg, name)
        a, b = methods.peft_parameters(first), methods.peft_parameters(second)
        assert all(torch.equal(a[n], b[n]) for n in a)


def test_vblora_resumes_from_its_trainable_tensors(tiny_cfg):
    """resume/ keeps every trainable tensor (loop.trainable_state): the bank and the full logits load back."""
    from propetl.run import loop

    model, _ = build(tiny_cfg, "vblora")
    train_steps(model)
    state = loop.trainable_state(model)
    assert any("vblora_vector_bank" in n for n in state) and any("vblora_logits_A" in n for n in state)
    fresh, _ = build(tiny_cfg, "vblora", "seed=7")
    loop.load_trainable_state(fresh, state)
    assert torch.equal(logits(fresh.eval()), logits(model))


def test_vblora_bank_has_its_own_lr(tiny_cfg):
    from propetl.run import loop

    model, cfg = build(tiny_cfg, "vblora")
    optimizer, _ = loop.make_optimizer(model, cfg, backbone.head_parameter_names(model), total_steps=10)
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert groups["weights/vblora_vector_bank"]["initial_lr"] == 1e-3 and groups["weights"]["initial_lr"] == 1e-2
    assert sum(p.numel() for p in groups["weights/vblora_vector_bank"]["params"]) == 3 * 16    # one bank


# ----------------------------------------------------------------------------- refused in one line

@pytest.mark.parametrize("overrides,words", [
    (["peft=vblora", "peft.config.vector_length=10"], ["peft=vblora", "PEFT cannot adapt", "divisible"]),
    (["peft=vera", "peft.config_class=PrefixTuningConfig"], ["peft.config_class='PrefixTuningConfig'", "VeraConfig"]),
    (["peft=vera", "peft.config_class=XLoraConfig"], ["use_cache", "allowed:", "LoraConfig"]),
    (["peft=vera", "+peft.config.task_type=SEQ_CLS"], ["peft.config.task_type='SEQ_CLS'", "head_lr"]),
    (["peft=vera", "+peft.config.nope=1"], ["peft=vera", "VeraConfig refuses", "nope"]),
    (["peft=lora", "prototype=adapter"], ["prototype.name='adapter'", "allowed: lora"]),
    (["peft=vera", "storage.dtype=bf16"], ["storage.dtype='bf16'", "allowed: fp32"]),
    (["peft=vblora", "peft.lrs.vblora_vector_bank=-1"], ["peft.lrs.vblora_vector_bank=-1", "a positive number"]),
])
def test_what_cannot_work_is_one_line(tiny_cfg, overrides, words):
    with pytest.raises(ConfigError) as error:
        cfg = tiny_cfg("method=peft", *overrides)
        validate(cfg)
        backbone.build(ModelSetup.from_config(cfg), 2)
    message = str(error.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_peft_without_method_peft_exits_2_in_one_line(tmp_path):
    result = propetl_train(tmp_path, "peft=vera", "logger.mode=disabled")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "method=peft" in lines[0], result.stderr


# ----------------------------------------------------------------------------- a real run

@pytest.mark.slow
def test_vera_on_real_stsb_through_propetl_train(tmp_path, tiny_text_model_dir, glue_dir):
    result = propetl_train(tmp_path, "method=peft", "peft=vera", "task=stsb", "trainer.max_steps=2",
                           "data.max_train_examples=32", *tiny_text_overrides(tiny_text_model_dir, glue_dir))
    assert result.returncode == 0, result.stderr[-2000:]
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    storage, shared = metrics["storage"], run / "checkpoint" / "shared"
    assert metrics["prototype"] == "vera" and metrics["method"] == "peft"
    assert storage["storage_bytes"] == sum((shared / n).stat().st_size for n in methods.PEFT_FILES)
    assert storage["trainable_params"] == 2 * 2 * (42 + 32)         # lambda_d [r] + lambda_b [out], q and v, 2 layers
    config = json.loads((shared / "adapter_config.json").read_text())
    assert config["peft_type"] == "VERA" and config["save_projection"] is False


@pytest.mark.slow
def test_killed_vblora_run_resumes_to_identical_metrics(tmp_path, tiny_text_model_dir, glue_dir):
    """VB-LoRA's checkpoint file can be top-k only, but resume/ keeps every trainable tensor (the bank and the full
    logits): SIGKILL after the first resume checkpoint, the same command again, the uninterrupted run's metrics."""
    import signal

    from test_resume import comparable, finish, kill_and_resume

    overrides = [*tiny_text_overrides(tiny_text_model_dir, glue_dir), "task=rte", "method=peft", "peft=vblora",
                 "peft.config.vector_length=16", "data.max_train_examples=48", "trainer.epochs=3",
                 "trainer.save_steps=4"]                         # test_resume's run: the kill lands mid-epoch
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    expected = finish(tmp_path / "a" / "run", overrides)
    assert comparable(kill_and_resume(tmp_path / "b" / "run", overrides, signal.SIGKILL)) == comparable(expected)
