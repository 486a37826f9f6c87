"""Multi-task ProPETL: temperature sampling, storage hand count, per-task checkpoint parts, adding a task
(tiny random BERT with the real tokenizer, real GLUE data)."""
from __future__ import annotations

import filecmp
import json
import math

import numpy as np
import pytest
import torch
from conftest import compose_cfg, tiny_batch, tiny_text_overrides

from propetl import methods
from propetl.configs import ModelSetup
from propetl.data import metrics as glue_metrics
from propetl.data.batches import PadCollator, tokenise
from propetl.data.glue import load_glue
from propetl.data.multitask import MultiTaskBatches, TaskCollator, task_configs
from propetl.models.backbone import load_tokenizer
from propetl.run import log, loop
from propetl.run.train import train
from propetl.storage import accounting, checkpoint, mask_coding

TASKS = ["rte", "stsb"]


def run_cfg(model_dir, glue_dir, *overrides):
    return compose_cfg([*tiny_text_overrides(model_dir, glue_dir), "mode=multitask", "prototype=lora",
                        "data.max_train_examples=24", "trainer.epochs=2", "mask.lr=0.05", "prototype.lr=0.01", *overrides])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_text_model_dir, glue_dir):
    out = tmp_path_factory.mktemp("multitask") / "run"
    metrics = train(run_cfg(tiny_text_model_dir, glue_dir, f"tasks=[{','.join(TASKS)}]"), out)
    return out, metrics


def test_temperature_sampling_and_single_task_batches():
    rows = [[{"text_a": "a", "label": 0}] * 100, [{"text_a": "b", "label": 1}] * 10_000]
    collators = [lambda batch, i=i: {"input_ids": torch.zeros(len(batch), 1), "task": torch.full((len(batch),), i)}
                 for i in range(2)]
    batches = MultiTaskBatches(rows, collators, batch_size=10, temperature=10, seed=0)
    expected = np.array([100 ** 0.1, 10_000 ** 0.1])
    assert batches.probabilities.tolist() == pytest.approx((expected / expected.sum()).tolist())
    assert len(batches) == 10 + 1000
    state = batches.generator.get_state()
    first = [int(b["task"][0]) for b in batches]
    assert all(len(set(b["task"].tolist())) == 1 for b in batches)           # every batch is one task's
    assert abs(first.count(0) / len(first) - batches.probabilities[0].item()) < 0.05
    batches.generator.set_state(state)
    assert [int(b["task"][0]) for b in batches] == first                     # replayable from the epoch's state


def test_length_grouped_multitask_batches_cover_each_task_with_less_padding():
    """With lengths, a task's batches come from its own length-grouped epochs: every example once per
    task epoch, far less padding than shuffled batches, replayable from the generator's state."""
    lengths = [[(7 * i) % 61 + 3 for i in range(320)], [(11 * i) % 37 + 2 for i in range(640)]]
    rows = [[{"row": i, "task": t} for i in range(len(lengths[t]))] for t in range(2)]
    collators = [lambda batch: batch] * 2
    grouped = MultiTaskBatches(rows, collators, batch_size=32, temperature=1, seed=0, lengths=lengths)
    shuffled = MultiTaskBatches(rows, collators, batch_size=32, temperature=1, seed=0)
    state = grouped.generator.get_state()
    batches = list(grouped)
    assert len(batches) == 30 and all(len({row["task"] for row in batch}) == 1 for batch in batches)

    def padding(epoch):
        return sum(max(lengths[b[0]["task"]][r["row"]] for r in b) * len(b) for b in epoch)

    assert padding(batches) < 0.7 * padding(list(shuffled))
    seen = [[r["row"] for b in batches if b[0]["task"] == t for r in b] for t in range(2)]
    for t in range(2):                                   # temperature 1: about one epoch of each task
        first_epoch = seen[t][:len(lengths[t])]
        assert len(set(first_epoch)) == len(first_epoch)
    grouped.generator.set_state(state)
    assert list(grouped) == batches


def test_a_real_multitask_run_writes_per_task_metrics_and_storage(trained):
    out, metrics = trained
    assert metrics["tasks"] == TASKS and set(metrics["per_task"]) == set(TASKS)
    assert "accuracy" in metrics["per_task"]["rte"]["test"] and "pearson" in metrics["per_task"]["stsb"]["test"]
    assert metrics["mean_test_score"] == pytest.approx(np.mean([metrics["per_task"][t]["glue_score"] for t in TASKS]))
    assert json.loads((out / "metrics.json").read_text())["storage"]["tasks"] == 2


def test_a_real_multitask_run_keeps_each_tasks_test_predictions_and_training_accuracy(trained):
    out, metrics = trained
    kept = log.read_predictions(out / "predictions.npz")
    assert set(kept) == set(TASKS) and kept["rte"][0].dtype == np.int8 and kept["stsb"][0].dtype == np.float32
    for task, task_cfg in zip(TASKS, task_configs(TASKS)):       # the test numbers recompute from what was kept
        scored = glue_metrics.compute(list(task_cfg.metrics), *kept[task])
        assert scored == pytest.approx(metrics["per_task"][task]["test"])
    for record in metrics["history"]:                 # STS-B is regression: no training accuracy
        assert [k for k in record if k.startswith("train/")] == ["train/rte/accuracy"]
        assert 0.0 <= record["train/rte/accuracy"] <= 1.0


def test_storage_hand_count(trained):
    """Tiny LoRA: hidden 32, r = 32/24 = 1, query+value -> A [1, 32] and B [32, 1] twice: 128 prototype
    parameters; 2 layers; sparsity 0.7 (mode=multitask's)."""
    _, metrics = trained
    s = metrics["storage"]
    assert s["shared_params"] == 128
    assert s["layer_mask_entries"] == 4 * 2 * 32 and s["task_mask_entries_per_task"] == 4 * 32
    assert s["shared_bytes"] == 4 * 128 + 4 * math.ceil(64 / 8)                  # 544
    assert s["task_mask_bytes_per_task"] == 4 * math.ceil(32 / 8)               # 16
    assert s["total_bytes"] == 544 + 2 * 16
    assert s["amortised_bytes_per_task"] == (544 + 2 * 16) / 2
    assert s["separate_single_task_bytes_per_task"] == 544
    assert s["plain_petl_bytes_per_task"] == 4 * 2 * 128                        # a module per layer, fp32
    heads = s["head_params"]
    assert heads == {"rte": 32 * 32 + 32 + 2 * 32 + 2, "stsb": 32 * 32 + 32 + 32 + 1}
    assert s["total_bytes_with_heads"] == 576 + 4 * sum(heads.values())


def test_masks_are_written_through_the_configured_coding(trained):
    """The layer masks file and each task's mask file: coded as storage.mask_coding says (entropy, the
    default), the same figures as single-task runs, amortised over the tasks."""
    out, metrics = trained
    files = [out / "checkpoint" / "shared" / "layer_masks.safetensors",
             *[out / "checkpoint" / "tasks" / t / "task_mask.safetensors" for t in TASKS]]
    assert [mask_coding.file_coding(checkpoint.read_safetensors(f)[1]) for f in files] == ["entropy"] * 3
    s = metrics["storage"]
    assert s["mask_entries"] == 4 * 2 * 32 + 2 * 4 * 32
    assert s["mask_bytes/bits"] == 3 * 32 + math.ceil(4 * 2 * 32 / 8) + 2 * math.ceil(4 * 32 / 8)     # digests + 1 bit
    assert s["amortised_ratio_to_plain_petl/bits"] == pytest.approx((4 * 128 + s["mask_bytes/bits"]) / 2 / (4 * 2 * 128))
    masks = sum(f.stat().st_size for f in files)
    assert s["file_mask_bits_per_entry"] == pytest.approx(8 * masks / s["mask_entries"])
    assert s["file_amortised_ratio_to_plain_petl"] == pytest.approx(s["file_bytes"] / 2 / (4 * 2 * 128))


def test_every_task_mask_has_exact_density(trained):
    out, _ = trained
    model, _ = checkpoint.load_multitask(out / "checkpoint")
    for name, mask in accounting.split_task_layer(methods.petl_weights(model).mask_stores())[0].items():
        ones = mask().reshape(len(TASKS), -1).sum(dim=1)
        assert ones.tolist() == [mask.ones_per_mask] * len(TASKS) == [10] * len(TASKS)    # 32 - floor(0.7*32)


def _test_predictions(model, task_name, glue_dir, tokenizer, index):
    """(logits, task config) on the task's test split in batches of the run's eval size (128: other paddings
    round differently, a regression task's Pearson by ~1e-7)."""
    task = task_configs([task_name])[0]
    split = load_glue(task, glue_dir)["test"]
    loader = torch.utils.data.DataLoader(tokenise(split, tokenizer, 128), batch_size=128, collate_fn=TaskCollator(
        PadCollator(tokenizer, int(task.num_labels) == 1), index))
    return loop.predict(model, loader, torch.device("cpu"))[0], task


def test_each_task_loads_alone_and_predicts_what_the_trained_model_did(trained, glue_dir, tiny_text_model_dir):
    out, metrics = trained
    tokenizer = load_tokenizer(compose_cfg([f"model.name_or_path={tiny_text_model_dir}"]).model)
    everything, _ = checkpoint.load_multitask(out / "checkpoint")
    for index, name in enumerate(TASKS):
        alone, _ = checkpoint.load_multitask(out / "checkpoint", tasks=[name])
        assert alone.task_names == [name]
        logits_all, task = _test_predictions(everything, name, glue_dir, tokenizer, index)
        logits_alone, _ = _test_predictions(alone, name, glue_dir, tokenizer, 0)
        assert torch.equal(torch.from_numpy(logits_all), torch.from_numpy(logits_alone))
        scored = loop.evaluate(alone, torch.utils.data.DataLoader(tokenise(load_glue(task, glue_dir)["test"], tokenizer, 128),
                               batch_size=128, collate_fn=TaskCollator(PadCollator(tokenizer, int(task.num_labels) == 1), 0)),
                               task, torch.device("cpu"))
        assert scored == pytest.approx(metrics["per_task"][name]["test"], abs=1e-12)


def test_adding_a_task_trains_only_its_part_and_changes_nothing_else(trained, tmp_path, tiny_text_model_dir, glue_dir):
    base, _ = trained
    out = tmp_path / "added"
    metrics = train(run_cfg(tiny_text_model_dir, glue_dir, "tasks=[mrpc]", f"multitask.base_checkpoint={base / 'checkpoint'}"), out)
    assert metrics["tasks"] == ["mrpc"] and metrics["base_tasks"] == TASKS
    for part in ["shared/prototype.safetensors", "shared/layer_masks.safetensors",
                 *[f"tasks/{t}/{f}" for t in TASKS for f in ("task_mask.safetensors", "head.safetensors")]]:
        assert filecmp.cmp(base / "checkpoint" / part, out / "checkpoint" / part, shallow=False), part
    old, _ = checkpoint.load_multitask(base / "checkpoint", tasks=["rte"])
    new, _ = checkpoint.load_multitask(out / "checkpoint", tasks=["rte"])
    tokenizer = load_tokenizer(compose_cfg([f"model.name_or_path={tiny_text_model_dir}"]).model)
    assert np.array_equal(_test_predictions(old, "rte", glue_dir, tokenizer, 0)[0],
                          _test_predictions(new, "rte", glue_dir, tokenizer, 0)[0])
    assert metrics["storage"]["tasks"] == 3


def test_a_base_checkpoint_with_other_settings_is_refused(trained, tmp_path, tiny_text_model_dir, glue_dir):
    base, _ = trained
    with pytest.raises(checkpoint.CheckpointError) as error:
        train(run_cfg(tiny_text_model_dir, glue_dir, "tasks=[mrpc]", "mask.sparsity=0.5",
                      f"multitask.base_checkpoint={base / 'checkpoint'}"), tmp_path / "x")
    assert "mask.sparsity=0.7" in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("prototype", ["adapter", "lora", "prefix"])
def test_every_prototype_builds_and_trains_a_multitask_model(tiny_cfg, prototype):
    """One forward/backward per task: a finite loss, and gradients reach the prototype and the mask scores
    (prefix: the encoder switches to the prefix attention, which the wrapping nn.Module alone cannot)."""
    from propetl.models.backbone import MultiTaskModel

    cfg = tiny_cfg("mode=multitask", "tasks=[rte,stsb]", f"prototype={prototype}")
    torch.manual_seed(0)
    model = MultiTaskModel(ModelSetup.from_config(cfg), ["rte", "stsb"], [2, 1])
    weights = methods.petl_weights(model)
    scores = {id(p) for p in weights.score_parameters()}
    for index, labels in enumerate((torch.tensor([0, 1]), torch.tensor([0.2, 0.9]))):
        batch = tiny_batch(batch=2)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    task=torch.full((2,), index), labels=labels)
        assert torch.isfinite(out.loss)
        model.zero_grad()
        out.loss.backward()
        grads = [(id(p) in scores, p.grad) for p in weights.parameters() if p.requires_grad]
        assert any(g is not None and bool(g.abs().sum() > 0) for is_score, g in grads if not is_score)   # prototype
        assert any(g is not None for is_score, g in grads if is_score)                                   # masks


@pytest.mark.parametrize("prototype", ["adapter", "lora", "prefix"])
def test_a_task_not_in_the_batch_keeps_its_mask_bit_for_bit(tiny_cfg, prototype):
    """AdamW with weight decay on the mask scores: once task B (stsb) has trained (its scores have AdamW moments),
    steps on task A (rte) alone leave B's task-mask scores and binary masks bit-identical (each task's scores are
    their own parameter: no gradient, so no momentum step and no decay), while A's and the layer masks move."""
    from propetl.models.backbone import MultiTaskModel

    cfg = tiny_cfg("mode=multitask", "tasks=[rte,stsb]", f"prototype={prototype}", "mask.lr=0.05",
                   "mask.weight_decay=0.1")
    assert cfg.mask.weight_decay > 0
    torch.manual_seed(0)
    model = MultiTaskModel(ModelSetup.from_config(cfg), ["rte", "stsb"], [2, 1]).train()
    optimization = loop.Optimization(*loop.make_optimizer(model, cfg, model.head_names(), 20),
                                     torch.amp.GradScaler("cpu", enabled=False))
    weights = methods.petl_weights(model)
    task_masks, layer_masks = accounting.split_task_layer(weights.mask_stores())

    def step(task: int, seed: int) -> None:
        batch = {**tiny_batch(seed=seed), "task": torch.full((3,), task)}
        if task == 1:                                                 # STS-B: regression
            batch["labels"] = torch.tensor([0.1, 0.5, 0.9])
        loop.train_step(model, batch, optimization, torch.device("cpu"), "fp32", 1.0)

    for task, seed in ((0, 1), (1, 2), (1, 3)):                       # both tasks trained: every score has moments
        step(task, seed)
    moments = [optimization.optimizer.state[p] for p in weights.score_parameters()]
    assert all(moments) and any(bool(m["exp_avg"].abs().sum() > 0) for m in moments)
    with torch.no_grad():
        task_b = {name: (mask()[1].clone(), mask.scores[1].clone()) for name, mask in task_masks.items()}
        task_a = {name: mask.scores[0].clone() for name, mask in task_masks.items()}
        layers = {name: mask.scores.detach().clone() for name, mask in layer_masks.items()}
    for seed in range(4, 8):
        step(0, seed)
    with torch.no_grad():
        for name, mask in task_masks.items():
            binary, scores = task_b[name]
            assert torch.equal(mask()[1], binary) and torch.equal(mask.scores[1], scores), name
        assert any(not torch.equal(m.scores[0], task_a[n]) for n, m in task_masks.items())
        assert any(not torch.equal(m.scores, layers[n]) for n, m in layer_masks.items())


@pytest.fixture(scope="module")
def tiny_roberta_dir(tmp_path_factory) -> str:
    """A tiny random RoBERTa (its head: dropout, dense, tanh, dropout, out_proj; no pooler)."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    config = RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-roberta")
    RobertaForSequenceClassification(config).save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("method,prototype", [("propetl", "lora"), ("propetl", "prefix"), ("petl", "adapter"),
                                              ("finetune", "adapter"), ("peft", "lora")])
@pytest.mark.parametrize("num_labels", [2, 1])
@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_one_task_without_task_masks_is_the_single_task_model_bit_for_bit(tiny_cfg, tiny_roberta_dir, method,
                                                                          prototype, num_labels, family):
    """Single-task is multi-task with one task: built from the same seed, the multi-task model with one task and
    layer masks only holds the single-task model's tensors (its head is the loaded model's own, under
    transformers_name's names) and gives the same loss and gradients, bit for bit, through dropout in training
    mode — for BERT and RoBERTa."""
    from propetl.models.backbone import MultiTaskModel, build

    roberta = [f"model.name_or_path={tiny_roberta_dir}"] if family == "roberta" else []
    cfg = tiny_cfg(f"method={method}", f"prototype={prototype}", *roberta)
    torch.manual_seed(3)
    single = build(ModelSetup.from_config(cfg), num_labels)
    torch.manual_seed(3)
    multi = MultiTaskModel(ModelSetup.from_config(cfg), ["task"], [num_labels], task_masks=False)
    single_parameters = list(single.named_parameters())
    assert [n for n, _ in single_parameters] == [multi.transformers_name(n) for n, _ in multi.named_parameters()]
    for (name, a), (_, b) in zip(single_parameters, multi.named_parameters()):
        assert torch.equal(a, b) and a.requires_grad == b.requires_grad, name
    batch = tiny_batch()
    labels = batch.pop("labels")
    if num_labels == 1:
        labels = torch.tensor([0.1, 0.5, 0.9])
    single.train(), multi.train()
    torch.manual_seed(7)
    loss_single = single(**batch, labels=labels).loss
    torch.manual_seed(7)
    loss_multi = multi(**batch, task=torch.zeros(3, dtype=torch.long), labels=labels).loss
    assert torch.equal(loss_single, loss_multi)
    loss_single.backward(), loss_multi.backward()
    for (name, a), (_, b) in zip(single_parameters, multi.named_parameters()):
        assert (a.grad is None) == (b.grad is None) and (a.grad is None or torch.equal(a.grad, b.grad)), name


@pytest.mark.parametrize("method,prototype", [("propetl", "lora"), ("propetl", "prefix"), ("petl", "adapter"),
                                              ("finetune", "adapter"), ("peft", "lora")])
@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_one_layout_from_either_model_and_into_either_model(tiny_cfg, tiny_roberta_dir, tmp_path, method, prototype,
                                                            family):
    """One checkpoint layout: the one-task MultiTaskModel (what runs train) and the transformers model with the
    method inside (what the API wraps) write byte-identical checkpoints; load_checkpoint (into the transformers
    model) and load_multitask (into the MultiTaskModel) both give back the trained model's logits exactly."""
    from propetl.models.backbone import MultiTaskModel, build

    roberta = [f"model.name_or_path={tiny_roberta_dir}"] if family == "roberta" else []
    cfg = tiny_cfg(f"method={method}", f"prototype={prototype}", *roberta)
    torch.manual_seed(3)
    single = build(ModelSetup.from_config(cfg), 2)
    torch.manual_seed(3)
    multi = MultiTaskModel(ModelSetup.from_config(cfg), [cfg.task.name], [2], task_masks=False)
    batch = tiny_batch()
    task = torch.zeros(len(batch["labels"]), dtype=torch.long)
    for model, extra in ((single, {}), (multi, {"task": task})):        # one identical step: weights move off init
        model.train()
        torch.manual_seed(7)
        model(**batch, **extra).loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p.add_(p.grad, alpha=-0.5)
    checkpoint.save_checkpoint(single, ModelSetup.from_config(cfg), tmp_path / "single")
    checkpoint.save_checkpoint(multi, ModelSetup.from_config(cfg), tmp_path / "multi")
    written = sorted(p.relative_to(tmp_path / "multi") for p in (tmp_path / "multi").rglob("*") if p.is_file())
    assert written == sorted(p.relative_to(tmp_path / "single") for p in (tmp_path / "single").rglob("*") if p.is_file())
    for name in written:
        assert filecmp.cmp(tmp_path / "multi" / name, tmp_path / "single" / name, shallow=False), name
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        expected = multi.eval()(**inputs, task=task).logits
        loaded, _ = checkpoint.load_checkpoint(tmp_path / "multi")
        assert torch.equal(loaded(**inputs).logits, expected)
        again, _ = checkpoint.load_multitask(tmp_path / "single")
        assert torch.equal(again(**inputs, task=task).logits, expected)


@pytest.mark.parametrize("grouped", [False, True])
def test_one_task_batches_are_a_single_task_loaders(glue_dir, grouped):
    """The batches of a one-task MultiTaskBatches are those of torch's shuffling DataLoader (the single-task runs'
    loader before issue 15; with grouping, its batch sampler over batches.batch_order), from the same draws."""
    from torch.utils.data import DataLoader

    from propetl.data.batches import MEGABATCH, token_lengths

    tokenizer = load_tokenizer(compose_cfg().model)
    train_split = load_glue(task_configs(["rte"])[0], glue_dir)["train"].select(range(40))
    tokenised = tokenise(train_split, tokenizer, 64)
    lengths, generator, collate = token_lengths(tokenised), torch.Generator().manual_seed(5), PadCollator(tokenizer, False)

    class GroupedBatchSampler:
        def __len__(self) -> int:
            return 5

        def __iter__(self):          # the rule stated by hand (not batches.batch_order, the code under test)
            assert 40 <= 8 * MEGABATCH                                  # one megabatch holds all 40 rows
            shuffled = torch.randperm(40, generator=generator).tolist()
            longest_first = sorted(shuffled, key=lambda i: -lengths[i])  # stable: equal lengths keep shuffled order
            blocks = [longest_first[i:i + 8] for i in range(0, 40, 8)]
            yield from (blocks[i] for i in torch.randperm(5, generator=generator).tolist())

    if grouped:
        loader = DataLoader(tokenised, batch_sampler=GroupedBatchSampler(), generator=generator, collate_fn=collate)
    else:
        loader = DataLoader(tokenised, batch_size=8, shuffle=True, generator=generator, collate_fn=collate)
    batches = MultiTaskBatches([tokenised], [TaskCollator(PadCollator(tokenizer, False), 0)], 8, 10.0, 5,
                               [lengths] if grouped else None)
    for _ in range(2):                                                   # two epochs: the generators move alike
        ours = list(batches)
        assert len(ours) == len(loader) == 5
        for mine, theirs in zip(ours, loader):
            assert mine.pop("task").tolist() == [0] * len(theirs["labels"])
            assert all(torch.equal(mine[k], theirs[k]) for k in theirs) and mine.keys() == theirs.keys()
    assert torch.equal(batches.generator.get_state(), loader.generator.get_state())


@pytest.mark.slow
@pytest.mark.parametrize("prototype", ["lora", "prefix"])
def test_a_one_task_multitask_run_is_the_single_task_run(tmp_path, tiny_text_model_dir, glue_dir, prototype):
    """Single-task is multi-task with one task: mode=multitask tasks=[rte] (layer masks only, the model's own head,
    the DataLoader's batch order) at the same mask.sparsity learns what task=rte learns — the same test metrics, the same checkpoint byte
    for byte (one layout: shared/ + tasks/rte/) — and its checkpoint refuses to take a second task in one line."""
    common = [*tiny_text_overrides(tiny_text_model_dir, glue_dir), f"prototype={prototype}", "data.max_train_examples=24",
              "trainer.epochs=2", "mask.lr=0.05", "prototype.lr=0.01", "data.group_by_length=true"]
    single = train(compose_cfg([*common, "task=rte"]), tmp_path / "single")
    multi = train(compose_cfg([*common, "mode=multitask", "tasks=[rte]", "mask.sparsity=0.9"]), tmp_path / "multi")
    assert multi["per_task"]["rte"]["test"] == single["test"]
    assert multi["history"][-1]["train_loss"] == single["history"][-1]["train_loss"]
    assert [r["train/rte/accuracy"] for r in multi["history"]] == [r["train/accuracy"] for r in single["history"]]
    written = sorted(p.relative_to(tmp_path / "multi").as_posix() for p in (tmp_path / "multi" / "checkpoint").rglob("*")
                     if p.is_file())
    assert written == sorted(p.relative_to(tmp_path / "single").as_posix()
                             for p in (tmp_path / "single" / "checkpoint").rglob("*") if p.is_file())
    assert "checkpoint/shared/layer_masks.safetensors" in written and "checkpoint/tasks/rte/head.safetensors" in written
    for name in written:
        assert filecmp.cmp(tmp_path / "multi" / name, tmp_path / "single" / name, shallow=False), name
    assert not (tmp_path / "multi" / "checkpoint" / "tasks" / "rte" / "task_mask.safetensors").exists()
    assert multi["storage"] == single["storage"]                       # one account: a one-task run's figures
    with pytest.raises(checkpoint.CheckpointError, match="trained on one task, with layer masks only") as error:
        train(compose_cfg([*common, "mode=multitask", "tasks=[stsb]", "mask.sparsity=0.9",
                           f"multitask.base_checkpoint={tmp_path / 'multi' / 'checkpoint'}"]), tmp_path / "more")
    assert "\n" not in str(error.value)


def test_a_head_that_is_neither_berts_nor_robertas_is_one_line():
    from transformers import ElectraConfig, ElectraForSequenceClassification

    from propetl.models.backbone import ModelError, pretrained_head

    electra = ElectraForSequenceClassification(ElectraConfig(vocab_size=100, embedding_size=16, hidden_size=32,
                                                             num_hidden_layers=1, num_attention_heads=4,
                                                             intermediate_size=64))
    with pytest.raises(ModelError, match="ElectraClassificationHead.*propetl runs BERT- and RoBERTa-family models"):
        pretrained_head(electra)


def test_a_run_of_tasks_outside_the_papers_average_has_no_glue_average(tmp_path, tiny_text_model_dir, glue_dir):
    """A user's task without the paper's numbers (no `report.paper` in its yaml) trains to the end; the run's
    glue_average is null instead of a crash after training."""
    import yaml

    from propetl.configs import CONF_DIR, compose, config_dirs

    rte = yaml.safe_load((CONF_DIR / "task" / "rte.yaml").read_text())
    (tmp_path / "conf" / "task").mkdir(parents=True)
    mine = {**{key: value for key, value in rte.items() if key != "report"}, "name": "mytask"}
    (tmp_path / "conf" / "task" / "mytask.yaml").write_text(yaml.safe_dump(mine))
    overrides = [*tiny_text_overrides(tiny_text_model_dir, glue_dir), "mode=multitask", "tasks=[mytask]",
                 "prototype=lora", "data.max_train_examples=16", "trainer.max_steps=2", "trainer.save_weights=false"]
    with config_dirs([str(tmp_path / "conf")]):        # as propetl-train --config-dir conf would find it
        metrics = train(compose(overrides, [f"file://{tmp_path / 'conf'}"]), tmp_path / "run")
    assert metrics["glue_average"] is None and set(metrics["per_task"]) == {"mytask"}
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["glue_average"] is None
