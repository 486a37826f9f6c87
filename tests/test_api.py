"""The public Python API (propetl/api.py): the README example run as written on a tiny random BERT, the
optimizer groups' learning rates, save -> load -> the same logits, and its one-line refusals."""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest
import torch
from conftest import tiny_batch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from test_methods import logits, train_steps
from transformers import AutoTokenizer, BertForSequenceClassification

from propetl import (AdapterConfig, LoRAConfig, ProPETLConfig, PrefixConfig, embedded_model_path, get_propetl_model, load_propetl,
                     methods)
from propetl.configs import CONF_DIR, ConfigError, ModelConfig, ModelSetup
from propetl.methods.lora import LoRALinear
from propetl.models import backbone
from propetl.storage import checkpoint, files

README = Path(__file__).resolve().parent.parent / "README.md"
NAME_LINE = "name = embedded_model_path()"
PROTOTYPE_SETTINGS = {"lora": {"r": 4}, "adapter": {"reduction_factor": 4}, "prefix": {"length": 4}}


def readme_example() -> str:
    """The first python block of the README's "Python API" section."""
    section = README.read_text().split("\n## Python API\n", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def fresh(folder: str, num_labels: int = 2) -> BertForSequenceClassification:
    return BertForSequenceClassification.from_pretrained(folder, num_labels=num_labels, ignore_mismatched_sizes=True)


def propetl_model(folder: str, prototype: str = "lora", **settings):
    torch.manual_seed(0)
    return get_propetl_model(fresh(folder), ProPETLConfig(prototype=prototype, **PROTOTYPE_SETTINGS[prototype], **settings))


# ----------------------------------------------------------------------------- the README example

@pytest.mark.slow
def test_readme_example_runs_offline_as_written(tmp_path, monkeypatch, capsys):
    """The README's example, unchanged, on the embedded model: ProPETLTrainer trains, save_pretrained ->
    from_pretrained -> merge_and_unload give the same logits."""
    code = readme_example()
    assert NAME_LINE in code
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    assert capsys.readouterr().out.count("trainable params: ") == 1          # print_trainable_parameters
    model, again, plain = namespace["model"].eval(), namespace["again"], namespace["plain"]
    store = methods.petl_weights(model.model)
    assert all(torch.count_nonzero(store.weights[f"{t}_B"]) > 0 for t in ("query", "value"))   # B starts at 0: it trained

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_path())
    batch = tokenizer(["a gripping film", "far too long and dull, really"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(**batch).logits
        torch.testing.assert_close(again(**batch).logits, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(plain(**batch).logits, expected, atol=1e-5, rtol=0)
    assert type(plain) is BertForSequenceClassification and not any(isinstance(m, LoRALinear) for m in plain.modules())

    saved = tmp_path / "out" / "api-example" / "propetl"          # the prototype, masks and head: no backbone
    assert sorted(p.relative_to(saved).as_posix() for p in saved.rglob("*") if p.is_file()) == [
        files.OUTPUT_MARKER, "shared/layer_masks.safetensors", "shared/manifest.json", "shared/propetl.json",
        "shared/prototype.safetensors",
        "tasks/unnamed/head.safetensors", "tasks/unnamed/manifest.json", "tasks/unnamed/task.json"]
    assert set(load_file(saved / "shared" / "prototype.safetensors")) == {"query_A", "query_B", "value_A", "value_B"}
    assert set(load_file(saved / "tasks" / "unnamed" / "head.safetensors")) == {   # BERT's pooler + classifier
        "dense.weight", "dense.bias", "classifier.weight", "classifier.bias"}


# ----------------------------------------------------------------------------- optimizer groups

def test_parameter_groups_carry_the_configured_learning_rates(tiny_model_dir):
    model = propetl_model(tiny_model_dir, lr=1e-3, mask_lr=2e-2, head_lr=5e-3, weight_decay=0.01)
    groups = {g["name"]: g for g in model.parameter_groups()}
    assert {n: g["lr"] for n, g in groups.items()} == {"weights": 1e-3, "masks": 2e-2, "head": 5e-3, "head_no_decay": 5e-3}
    assert groups["masks"]["weight_decay"] == groups["weights"]["weight_decay"] == 0.01
    store = methods.petl_weights(model.model)
    assert {id(p) for p in groups["masks"]["params"]} == {id(p) for p in store.score_parameters()}
    grouped = [id(p) for g in groups.values() for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters() if p.requires_grad)     # each exactly once

    overridden = {g["name"]: g["lr"] for g in model.parameter_groups(mask_lr=7e-2)}
    assert overridden["masks"] == 7e-2 and overridden["weights"] == 1e-3 and overridden["head"] == 5e-3


def test_the_optimizer_moves_the_mask_scores_at_the_mask_lr(tiny_model_dir):
    mask_lr = 0.25
    model = propetl_model(tiny_model_dir, "adapter", mask_lr=mask_lr, weight_decay=0.0)   # LoRA: B = 0, no score grad yet
    optimizer = torch.optim.SGD(model.parameter_groups(lr=1e-3))
    scores = methods.petl_weights(model.model).score_parameters()
    before = [s.detach().clone() for s in scores]
    (1e4 * model(**tiny_batch()).loss).backward()           # scaled: each step is far above float error
    grads = [s.grad.clone() for s in scores]
    optimizer.step()
    assert min(float(g.abs().max()) for g in grads) > 1e-3
    for old, grad, new in zip(before, grads, scores):
        torch.testing.assert_close(new.detach(), old - mask_lr * grad, rtol=0, atol=1e-5)


def test_defaults_are_the_runners_for_the_prototype(tiny_model_dir):
    model = propetl_model(tiny_model_dir, "adapter")
    defaults = OmegaConf.load(CONF_DIR / "prototype" / "adapter.yaml")
    groups = {g["name"]: g["lr"] for g in model.parameter_groups()}
    assert groups["masks"] == defaults.mask_lr and groups["weights"] == groups["head"] == defaults.lr
    assert model.runner_config.mask.sparsity == defaults.mask_sparsity
    assert model.runner_config.prototype.bottleneck == 32 // 4


# ----------------------------------------------------------------------------- save, load, merge

@pytest.mark.parametrize("prototype", list(PROTOTYPE_SETTINGS))
def test_save_then_load_gives_the_same_logits(tiny_model_dir, tmp_path, prototype):
    model = propetl_model(tiny_model_dir, prototype, sparsity=0.5)
    train_steps(model)
    expected = logits(model)
    model.save_propetl(tmp_path / "saved")
    again = load_propetl(fresh(tiny_model_dir), tmp_path / "saved")
    torch.testing.assert_close(logits(again), expected, atol=1e-5, rtol=0)
    assert not (tmp_path / "saved" / "backbone.safetensors").exists()
    if prototype == "lora":
        torch.testing.assert_close(logits(again.merge_and_unload()), expected, atol=1e-5, rtol=0)
    else:
        with pytest.raises(ConfigError, match=f"prototype={prototype} cannot be folded into BERT's weights") as error:
            again.merge_and_unload()
        assert "\n" not in str(error.value)


def test_load_propetl_reads_a_runner_checkpoint_through_the_runners_reader(tiny_cfg, tiny_model_dir, tmp_path,
                                                                            monkeypatch):
    cfg = tiny_cfg("method=propetl", "prototype=lora", "prototype.r=4")
    torch.manual_seed(0)
    trained = backbone.build(ModelSetup.from_config(cfg), 2)
    train_steps(trained)
    checkpoint.save_checkpoint(trained, ModelSetup.from_config(cfg), tmp_path / "checkpoint")
    reads, reader = [], checkpoint.load_checkpoint
    monkeypatch.setattr(checkpoint, "load_checkpoint", lambda *args: reads.append(args) or reader(*args))
    torch.testing.assert_close(logits(load_propetl(fresh(tiny_model_dir), tmp_path / "checkpoint")), logits(trained),
                               atol=1e-5, rtol=0)
    assert len(reads) == 1                                           # one reader: the CLI's


def test_save_propetl_replaces_its_own_earlier_save_atomically(tiny_model_dir, tmp_path):
    model = propetl_model(tiny_model_dir, sparsity=0.5)
    saved = tmp_path / "saved"
    assert model.save_propetl(saved) == saved
    train_steps(model)                                               # other weights: the second save must replace
    model.save_propetl(saved)
    torch.testing.assert_close(logits(load_propetl(fresh(tiny_model_dir), saved)), logits(model), atol=1e-5, rtol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]    # no .saved.old, no .saved.*.tmp


@pytest.mark.parametrize("what", ["a user's file", "a file added to an earlier save", "a run's checkpoint"])
def test_save_propetl_refuses_a_folder_holding_files_it_did_not_write(tiny_cfg, tiny_model_dir, tmp_path, what):
    model = propetl_model(tiny_model_dir)
    target = tmp_path / "target"
    if what == "a user's file":
        target.mkdir()
        (target / "notes.txt").write_text("mine")
        foreign = "notes.txt"
    elif what == "a file added to an earlier save":
        model.save_propetl(target)
        (target / "shared" / "notes.txt").write_text("mine")
        foreign = "shared/notes.txt"
    else:
        checkpoint.save_checkpoint(backbone.build(ModelSetup.from_config(tiny_cfg("method=propetl", "prototype=lora")), 2),
                                   ModelSetup.from_config(tiny_cfg("method=propetl", "prototype=lora")), target)
        foreign = "shared/, tasks/"
    before = {p: p.read_bytes() for p in target.rglob("*") if p.is_file()}
    with pytest.raises(files.OutputError) as error:
        model.save_propetl(target)
    assert str(error.value) == f"{target} holds files propetl did not write: {foreign}; choose another OUT"
    assert {p: p.read_bytes() for p in target.rglob("*") if p.is_file()} == before      # nothing touched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]


def test_save_propetl_refuses_the_working_folder_and_a_file(tiny_model_dir, tmp_path, monkeypatch):
    model = propetl_model(tiny_model_dir)
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    with pytest.raises(files.OutputError, match=f"^{empty} is the working folder {empty}: .*choose a new folder"):
        model.save_propetl(".")
    (tmp_path / "file").write_text("x")
    with pytest.raises(files.OutputError, match="file is a file, not a folder propetl wrote; choose another OUT"):
        model.save_propetl(tmp_path / "file")
    assert list(empty.iterdir()) == [] and (tmp_path / "file").read_text() == "x"


# ----------------------------------------------------------------------------- one-line refusals

@pytest.mark.parametrize("config,message", [
    (ProPETLConfig(prototype="lorra"), "prototype='lorra' is invalid; allowed: adapter, lora, prefix"),
    (ProPETLConfig(prototype="adapter", r=4), "r=4 is not a setting of prototype=adapter; its settings: reduction_factor"),
    (ProPETLConfig(sparsity=1.0), "sparsity=1.0 is invalid; allowed: a number in [0.0, 1.0)"),
    (ProPETLConfig(mask_kind="soft"), "mask_kind='soft' is invalid; allowed: learned, random, none"),
    (ProPETLConfig(mask_lr=0), "mask_lr=0 is invalid; allowed: a positive number"),
    (ProPETLConfig(prototype="adapter", bottleneck=-1), "bottleneck=-1 is invalid; allowed: a positive integer"),
    (ProPETLConfig(prototype="adapter", reduction_factor=1000), "bottleneck=0 is invalid"),   # the yaml's, derived
])
def test_bad_settings_are_refused_in_one_line(tiny_model_dir, config, message):
    with pytest.raises(ConfigError) as error:
        get_propetl_model(fresh(tiny_model_dir), config)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


@pytest.mark.parametrize("config,message", [
    (LoRAConfig(r=0), "r=0 is invalid; allowed: a positive integer"),
    (LoRAConfig(targets=["query", "dense"]), "targets=['query', 'dense'] is invalid; allowed: a non-empty list drawn"),
    (PrefixConfig(mask_sparsity=1.0), "mask_sparsity=1.0 is invalid; allowed: a number in [0.0, 1.0)"),
    (PrefixConfig(length=4, freeze="yes"), "freeze='yes' is invalid; allowed: true or false"),
    (AdapterConfig(bottleneck=-1), "bottleneck=-1 is invalid; allowed: a positive integer"),
    (AdapterConfig(reduction_factor=1000), "bottleneck=0 is invalid; allowed: a positive integer"),
])
def test_a_prototypes_dataclass_is_refused_in_one_line_naming_its_field(tiny_model_dir, config, message):
    with pytest.raises(ConfigError) as error:
        get_propetl_model(fresh(tiny_model_dir), config)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_a_prototypes_dataclass_is_the_api_config_and_the_yamls_keys(tiny_model_dir):
    """LoRAConfig(...) gives the runner config ProPETLConfig's flat names give; each shipped prototype's dataclass
    has exactly its yaml's keys, and its None fields take the yaml's (scaled) defaults."""
    torch.manual_seed(0)
    model = get_propetl_model(fresh(tiny_model_dir), LoRAConfig(r=4, targets=["query", "key"], mask_sparsity=0.5))
    flat = propetl_model(tiny_model_dir, "lora", target_modules=["query", "key"], sparsity=0.5)
    assert OmegaConf.to_container(model.runner_config, resolve=True) == OmegaConf.to_container(
        flat.runner_config, resolve=True)
    assert model.runner_config.prototype.alpha == 6 and model.runner_config.mask.sparsity == 0.5   # 1.5 r, from the yaml
    torch.testing.assert_close(logits(model), logits(flat), atol=0, rtol=0)
    for name, module in methods.PROTOTYPES.items():
        keys = set(OmegaConf.load(CONF_DIR / "prototype" / f"{name}.yaml"))
        assert keys == {f.name for f in fields(module.CONFIG)} and module.CONFIG().name == name


def test_unsupported_models_and_mismatched_checkpoints_are_refused(tiny_model_dir, tmp_path):
    from transformers import BertModel
    with pytest.raises(ConfigError, match="model BertModel is not supported"):
        get_propetl_model(BertModel.from_pretrained(tiny_model_dir), ProPETLConfig())
    model = propetl_model(tiny_model_dir)
    with pytest.raises(ConfigError, match="already has ProPETL"):
        get_propetl_model(model.model, ProPETLConfig())
    model.save_propetl(tmp_path / "saved")
    with pytest.raises(ConfigError, match="was saved for task.num_labels=2, this model has 3"):
        load_propetl(fresh(tiny_model_dir, num_labels=3), tmp_path / "saved")


def test_propetl_config_takes_keywords_and_compares_and_prints_its_settings():
    config = ProPETLConfig("adapter", sparsity=0.5, reduction_factor=4)
    assert config == ProPETLConfig(prototype="adapter", reduction_factor=4, sparsity=0.5) != ProPETLConfig("adapter")
    assert repr(config).startswith("ProPETLConfig(prototype='adapter', settings={'mask_sparsity': 0.5, 'reduction_factor'")
    with pytest.raises(TypeError, match="positional"):
        ProPETLConfig("lora", "learned")


def test_a_config_group_without_a_required_key_is_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"^the config lacks model.name, model.num_layers$"):
        ModelConfig.from_config({"name_or_path": "x", "hidden_size": 32})


# ----------------------------------------------------------------------------- PEFT's habits, the HF Trainer

@pytest.mark.parametrize("prototype", list(PROTOTYPE_SETTINGS))
def test_save_pretrained_from_pretrained_gives_the_same_logits(tiny_model_dir, tmp_path, prototype):
    from propetl import ProPETLModel

    model = propetl_model(tiny_model_dir, prototype, sparsity=0.5)
    train_steps(model)
    model.save_pretrained(tmp_path / "saved")
    again = ProPETLModel.from_pretrained(fresh(tiny_model_dir), tmp_path / "saved")
    torch.testing.assert_close(logits(again), logits(model), atol=1e-5, rtol=0)
    assert again.get_base_model() is again.model


def test_transformers_refuses_the_saved_folder_loudly(tiny_model_dir, tmp_path):
    """Never a model with silently MISSING weights: the folder has no config.json for AutoModel to take."""
    from transformers import AutoModelForSequenceClassification

    propetl_model(tiny_model_dir).save_pretrained(tmp_path / "saved")
    with pytest.raises((OSError, ValueError), match="config.json"):
        AutoModelForSequenceClassification.from_pretrained(tmp_path / "saved")


def test_print_trainable_parameters_in_pefts_format(tiny_model_dir, capsys):
    model = propetl_model(tiny_model_dir, "adapter")
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert total == sum(p.numel() for p in model.parameters())
    model.print_trainable_parameters()
    stored, with_head = model.stored_bytes()
    assert capsys.readouterr().out == (f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: "
                                       f"{100 * trainable / total:.4f} || stored per task: {stored:,d} bytes "
                                       f"({with_head:,d} with head)\n")


def test_target_modules_is_pefts_name_for_targets(tiny_model_dir):
    model = propetl_model(tiny_model_dir, "lora", target_modules=["query", "key"])
    assert list(model.runner_config.prototype.targets) == ["query", "key"]
    for config in (ProPETLConfig(target_modules=("query", "key")), LoRAConfig(targets=("query", "key"))):   # tuples too
        assert list(get_propetl_model(fresh(tiny_model_dir), config).runner_config.prototype.targets) == ["query", "key"]
    with pytest.raises(ConfigError, match="target_modules=.* and targets=.* disagree"):
        ProPETLConfig(targets=["query"], target_modules=["value"])
    with pytest.raises(ConfigError, match="target_modules is not a setting of prototype=adapter|targets="):
        propetl_model(tiny_model_dir, "adapter", target_modules=["query"])


def tiny_rows(folder: str):
    from datasets import Dataset

    tokenizer = AutoTokenizer.from_pretrained(folder)
    rows = Dataset.from_dict({"text": ["a good film", "a bad one, really"] * 8, "label": [1, 0] * 8})
    return rows.map(lambda b: tokenizer(b["text"]), batched=True), tokenizer


def test_a_plain_trainer_is_refused_in_one_line(tiny_text_model_dir, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = propetl_model(tiny_text_model_dir, "lora")
    train, tokenizer = tiny_rows(tiny_text_model_dir)
    args = TrainingArguments(str(tmp_path / "out"), max_steps=1, report_to="none", save_strategy="no")
    with pytest.raises(ConfigError, match="trained without its parameter groups") as error:
        Trainer(model=model, args=args, train_dataset=train, processing_class=tokenizer).train()
    assert "\n" not in str(error.value) and "ProPETLTrainer" in str(error.value)


def test_propetl_trainer_trains_masks_at_the_mask_lr_and_checkpoints_the_trainable_parts(tiny_text_model_dir, tmp_path):
    """Default TrainingArguments but the step count: the masks' group at the config's mask_lr, the rest at the
    learning rate; checkpoint-N holds the trainable tensors only, and resuming reads them back."""
    from transformers import TrainingArguments

    from propetl import ProPETLTrainer
    from propetl.run.loop import trainable_state

    model = propetl_model(tiny_text_model_dir, "lora", mask_lr=0.05)
    train, tokenizer = tiny_rows(tiny_text_model_dir)
    args = TrainingArguments(str(tmp_path / "out"), max_steps=2, save_steps=2, report_to="none",
                             lr_scheduler_type="constant")
    trainer = ProPETLTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
    before = {n: t.clone() for n, t in trainable_state(model).items()}
    trainer.train()
    lrs = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert lrs["masks"] == 0.05 and lrs["weights"] == lrs["head"] == args.learning_rate
    moved = [n for n, t in trainable_state(model).items() if not torch.equal(t, before[n])]
    assert any(n.endswith(".scores") for n in moved)
    saved = load_file(tmp_path / "out" / "checkpoint-2" / "model.safetensors")
    assert set(saved) == set(trainable_state(model))                         # no frozen backbone tensor
    for name, tensor in trainable_state(model).items():
        assert torch.equal(saved[name], tensor)

    fresh_model = propetl_model(tiny_text_model_dir, "lora", mask_lr=0.05)
    ProPETLTrainer(model=fresh_model, args=args, train_dataset=train)._load_from_checkpoint(
        str(tmp_path / "out" / "checkpoint-2"))
    torch.testing.assert_close(logits(fresh_model.eval()), logits(model.eval()), atol=0, rtol=0)
    with pytest.raises(ConfigError, match="does not match the model's trainable tensors"):
        other = propetl_model(tiny_text_model_dir, "adapter")
        ProPETLTrainer(model=other, args=args, train_dataset=train)._load_from_checkpoint(
            str(tmp_path / "out" / "checkpoint-2"))


@pytest.mark.slow
def test_propetl_trainer_checkpoints_of_the_embedded_model_are_small(tmp_path):
    """The embedded model (90 MB of weights): a ProPETLTrainer checkpoint's model file holds the trainable tensors,
    1.3 MB, and no tokenizer; with save_only_model (no optimizer moments) the whole checkpoint is under 1.4 MB."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, TrainingArguments

    from propetl import ProPETLTrainer

    name = embedded_model_path()
    tokenizer = AutoTokenizer.from_pretrained(name)
    rows = Dataset.from_dict({"text": ["a good film", "a bad one"] * 4, "label": [1, 0] * 4})
    rows = rows.map(lambda b: tokenizer(b["text"]), batched=True)
    sizes = {}
    for only_model in (False, True):
        model = get_propetl_model(AutoModelForSequenceClassification.from_pretrained(name, num_labels=2),
                                  ProPETLConfig(prototype="adapter"))
        out = tmp_path / f"only-model-{only_model}"
        args = TrainingArguments(str(out), max_steps=1, save_steps=1, report_to="none", save_only_model=only_model)
        ProPETLTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer).train()
        folder = out / "checkpoint-1"
        sizes[only_model] = (sum(p.stat().st_size for p in folder.iterdir()), (folder / "model.safetensors").stat().st_size)
    assert sizes[True][1] == sizes[False][1] < 1.4e6
    assert sizes[True][0] < 1.4e6 and sizes[False][0] < 4e6    # AdamW's moments: 2x the trainable tensors
