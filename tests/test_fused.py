"""Fused runs (issue 28; propetl/run/fused.py, hydra/launcher=fused): K runs stepped as one over the shared frozen
backbone compute what each run computes alone (fp32, dropout off: losses, gradients, metrics and every checkpoint
tensor within float rounding); a sweep's runs that cannot fuse run one after another; each fused run's dropout draws
are its own; a killed fused sweep resumes to the uninterrupted one's results."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY
from safetensors.torch import load_file
from torch import nn

from propetl.configs import ModelSetup
from propetl.models import backbone
from propetl.run import fused, keyed_dropout, loop

REPO = Path(__file__).resolve().parents[1]
SCRIPT = shutil.which("propetl-train") or "propetl-train"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
       "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}   # hydra_plugins of this checkout


def runner_models(cfg, seeds, dropout: float = 0.0) -> list[nn.Module]:
    """The runs' one-task models as run/train.py builds them, each from its own seed."""
    models = []
    for seed in seeds:
        torch.manual_seed(seed)
        model = backbone.MultiTaskModel(ModelSetup.from_config(cfg), ["rte"], [2], task_masks=False)
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = dropout
        models.append(model.train())
    return models


def batches(k: int, seed: int = 0) -> list[dict]:
    """K batches of 4 rows of different lengths (padding inside and between them)."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for run in range(k):
        length = 6 + run
        attention = torch.ones(4, length, dtype=torch.long)
        attention[1, length - 2:] = 0
        out.append({"input_ids": torch.randint(5, TINY["vocab"], (4, length), generator=generator) * attention,
                    "attention_mask": attention, "labels": torch.randint(0, 2, (4,), generator=generator)})
    return out


def fused_then_alone(models: list[nn.Module], data: list[dict]) -> tuple[torch.Tensor, list[dict]]:
    """One fused forward and backward of the runs, then each run alone on its batch: the losses, logits and every
    gradient (the same parameters get one) must agree. Returns the fused losses and each run's fused gradients."""
    losses, logits = fused.stacked_forward(models, data, fused.varying_names(models))
    losses.sum().backward()
    together = [{n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None} for m in models]
    for model in models:
        model.zero_grad(set_to_none=True)
    for k, (model, batch) in enumerate(zip(models, data)):
        output = model(**batch)
        output.loss.backward()
        assert abs(output.loss.item() - losses[k].item()) < 1e-6
        assert torch.allclose(output.logits, logits[k], atol=1e-6)
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert grads.keys() == together[k].keys()
        for name, grad in grads.items():
            assert torch.allclose(grad, together[k][name], atol=1e-6), name
    return losses, together


@pytest.mark.parametrize("overrides", [
    ["prototype=lora"], ["prototype=adapter"], ["prototype=prefix"], ["prototype=lora", "method=petl"],
    ["prototype=adapter", "mask.kind=random"], ["prototype=lora", "prototype.freeze=true"],
], ids=lambda o: ",".join(o))
def test_a_fused_step_equals_each_run_alone(tiny_cfg, overrides):
    """Losses, logits and every trainable gradient of 3 fused runs equal each run's own forward and backward."""
    models = runner_models(tiny_cfg(*overrides), [1, 2, 3])
    losses, together = fused_then_alone(models, batches(3))
    for model, grads in zip(models, together):               # every trainable tensor got its gradient
        assert grads.keys() == {n for n, p in model.named_parameters() if p.requires_grad}
    assert len({round(loss.item(), 6) for loss in losses}) == 3      # three runs, not one computed thrice


def test_runs_of_different_sparsities_and_mask_kinds_fuse_exactly(tiny_cfg):
    """One pass over runs at sparsity 0.5 and 0.9 with learned, random and all-ones masks, interleaved (runs of one
    sparsity and kind make their masks in one top-k): each run's masks are its own store's, so losses and every
    gradient equal each run's alone."""
    settings = [("0.5", "learned"), ("0.9", "learned"), ("0.5", "learned"), ("0.9", "none"), ("0.5", "random"),
                ("0.9", "none")]
    models = [runner_models(tiny_cfg("prototype=lora", f"mask.sparsity={s}", f"mask.kind={k}"), [seed])[0]
              for seed, (s, k) in enumerate(settings, start=1)]
    _, together = fused_then_alone(models, batches(len(models)))
    assert all(any("scores" in n for n in grads) for grads in together[:3])      # learned masks get their gradient


def test_what_the_runs_do_not_share():
    """Trainable tensors and frozen ones that differ are stacked; the rest (the backbone) is shared."""
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    b.weight.data.copy_(a.weight.data)
    a.bias.requires_grad_(False), b.bias.requires_grad_(False)
    b.bias.data.copy_(a.bias.data + 1)
    a.weight.requires_grad_(False), b.weight.requires_grad_(False)
    assert fused.varying_names([a, b]) == ["bias"]
    a.weight.requires_grad_(True)
    assert fused.varying_names([a, b]) == ["weight", "bias"]


def test_which_jobs_fuse(tiny_cfg, monkeypatch):
    """Jobs fuse when their overrides differ only in seeds, mask sparsity and mask kind; fine-tuning, several tasks,
    T5 and fp16 do not."""
    assert fused.fuse_key(["task=rte", "seed=1", "mask.seed=3", "mask.sparsity=0.5", "mask.kind=random"]) == (
        fused.fuse_key(["task=rte", "seed=2"])) == ("task=rte",)
    assert fused.fuse_key(["task=rte", "prototype=lora"]) != fused.fuse_key(["task=rte", "prototype=adapter"])
    assert fused.fuse_key(["task=rte", "method=petl"]) != fused.fuse_key(["task=rte", "method=propetl"])
    assert fused.refusal(tiny_cfg()) is None and fused.refusal(tiny_cfg("method=petl")) is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert "data-parallel" in fused.refusal(tiny_cfg())
    monkeypatch.delenv("WORLD_SIZE")
    assert "method=finetune" in fused.refusal(tiny_cfg("method=finetune"))
    assert "mode=multitask" in fused.refusal(tiny_cfg("mode=multitask", "tasks=[rte,mrpc]"))
    assert "fp16" in fused.refusal(tiny_cfg("trainer.precision=fp16"))


def keys(*seeds_and_steps) -> list[torch.Tensor]:
    return [keyed_dropout.run_key(seed, step) for seed, step in seeds_and_steps]


def test_each_fused_run_draws_its_own_dropout(tiny_cfg):
    """Two runs identical in every tensor and batch, fused with dropout on: their losses differ when their seeds (or
    steps) do, and are equal when both are (one stream, as two runs made alone with one seed); with dropout off they are
    equal; torch's generator (no keys) gives every run its own rows' draws."""
    cfg = tiny_cfg("prototype=lora")
    data = batches(1) * 2
    for dropout, run_keys, differ in (
        (0.3, keys((1, 0), (2, 0)), True), (0.3, keys((1, 0), (1, 5)), True), (0.3, keys((1, 4), (1, 4)), False),
        (0.0, keys((1, 0), (2, 0)), False), (0.3, None, True),
    ):
        models = runner_models(cfg, [1, 1], dropout)
        losses, _ = fused.stacked_forward(models, data, fused.varying_names(models), dropout_keys=run_keys)
        assert (abs(losses[0].item() - losses[1].item()) > 1e-6) == differ, (dropout, run_keys)


@pytest.mark.parametrize("prototype", ["lora", "adapter", "prefix"])
def test_a_fused_runs_dropout_does_not_depend_on_the_runs_beside_it(tiny_cfg, prototype):
    """Dropout on (hidden states, attention probabilities, the head): run 1's loss and gradients are the same fused
    beside run 2, beside a run 3 whose longer batch pads run 1's rows, and alone (a group of one). So a run resumed
    while the others stand at other steps (a kill between their saves) repeats its uninterrupted draws."""
    cfg = tiny_cfg(f"prototype={prototype}")
    data = batches(3)
    longer = batches(6)[5]                                      # 11 tokens: run 1's 6 are padded to 11
    results = []
    for beside, batch, step in ((None, None, None), (2, data[1], 3), (3, longer, 11)):
        seeds = [1] if beside is None else [1, beside]
        models = runner_models(cfg, seeds, dropout=0.3)
        run_data = [data[0]] + ([] if batch is None else [batch])
        run_keys = keys((1, 7), *([] if beside is None else [(beside, step)]))     # the other run at another step
        losses, _ = fused.stacked_forward(models, run_data, fused.varying_names(models) if beside else None,
                                          dropout_keys=run_keys)
        losses.sum().backward()
        results.append((losses[0].item(), {n: p.grad.clone() for n, p in models[0].named_parameters()
                                            if p.grad is not None}))
    (alone, grads), *others = results
    assert abs(alone - runner_models(cfg, [1], 0.0)[0](**data[0]).loss.item()) > 1e-4   # dropout did act
    for loss, other in others:
        assert abs(loss - alone) < 1e-6
        assert other.keys() == grads.keys()
        for name, grad in grads.items():
            assert torch.allclose(other[name], grad, atol=1e-6), name


def test_keyed_dropout_acts_on_every_dropout_site(tiny_cfg, monkeypatch):
    """A keyed pass draws at every dropout of the model: the embeddings, each layer's attention probabilities and two
    hidden states, and the head — one mask per site, the attention's [B, heads, T, T]."""
    shapes = []
    keep_mask = keyed_dropout.keep_mask
    monkeypatch.setattr(keyed_dropout, "keep_mask", lambda *args: shapes.append(tuple(args[2])) or keep_mask(*args))
    (model,) = runner_models(tiny_cfg("prototype=lora"), [1], dropout=0.3)
    (batch,) = batches(1)
    fused.stacked_forward([model], [batch], None, dropout_keys=keys((1, 0)))
    layers, rows, length = TINY["layers"], *batch["input_ids"].shape
    assert len(shapes) == 1 + 3 * layers + 1
    assert [s for s in shapes if len(s) == 4] == [(rows, TINY["heads"], length, length)] * layers


@pytest.mark.parametrize("case", ["bool", "float", "causal", "scale", "gqa", "a row all masked"])
def test_keyed_attention_is_torchs_attention(case):
    """With every entry kept, the keyed attention (math form, fp32) equals torch's SDPA: bool and additive masks,
    is_causal, a given scale, grouped-query heads, and a row with no key to attend (zeros)."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 5, 8, generator=generator) for _ in range(3))
    kwargs: dict = {}
    if case in ("bool", "a row all masked"):
        kwargs["attn_mask"] = torch.rand(2, 1, 5, 5, generator=generator) > 0.3
        kwargs["attn_mask"][..., 0] = case == "bool"
        if case == "a row all masked":
            kwargs["attn_mask"][0, 0, 2] = False
    elif case == "float":
        kwargs["attn_mask"] = torch.randn(2, 1, 5, 5, generator=generator)
    elif case == "causal":
        kwargs["is_causal"] = True
    elif case == "scale":
        kwargs["scale"] = 0.3
    else:
        k, v, kwargs["enable_gqa"] = k[:, :2], v[:, :2], True
    expected = keyed_dropout._torch_sdpa(q, k, v, **kwargs)
    with keyed_dropout.keyed(keyed_dropout.run_key(1, 0)):
        got = torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=1e-12, **kwargs)   # keeps all
    assert torch.allclose(got, expected, atol=1e-6)
    if case == "a row all masked":
        assert torch.equal(got[0, :, 2], torch.zeros_like(got[0, :, 2]))


def test_keyed_dropout_masks():
    """A mask entry is a function of (seed, step, site, its coordinates): a padded tensor's mask holds the unpadded
    one's; another seed, step or site draws another mask; the kept fraction is 1 - p; outside keyed() and in eval,
    torch's own dropout."""
    key = keyed_dropout.run_key(3, 10)
    small = keyed_dropout.keep_mask(key, 1, torch.Size([4, 6, 32]), 0.25, "cpu")
    padded = keyed_dropout.keep_mask(key, 1, torch.Size([4, 9, 32]), 0.25, "cpu")
    assert torch.equal(padded[:, :6], small)
    for other in (keyed_dropout.keep_mask(keyed_dropout.run_key(4, 10), 1, small.shape, 0.25, "cpu"),
                  keyed_dropout.keep_mask(keyed_dropout.run_key(3, 11), 1, small.shape, 0.25, "cpu"),
                  keyed_dropout.keep_mask(key, 2, small.shape, 0.25, "cpu")):
        assert 0.5 < (other == small).float().mean() < 0.7       # independent draws agree on ~ 0.75^2 + 0.25^2
    big = keyed_dropout.keep_mask(key, 1, torch.Size([100, 1000]), 0.1, "cpu")
    assert abs(big.float().mean().item() - 0.9) < 0.005
    x = torch.ones(8, 8)
    with keyed_dropout.keyed(key):
        kept = torch.nn.functional.dropout(x, 0.5)
        assert set(kept.unique().tolist()) <= {0.0, 2.0}
        assert torch.equal(torch.nn.functional.dropout(x, 0.5, training=False), x)
        assert torch.equal(kept, keyed_dropout.keep_mask(key, 1, x.shape, 0.5, "cpu").float() * 2)
    assert torch.nn.functional.dropout is keyed_dropout._torch_dropout             # restored on leaving
    with pytest.raises(ValueError, match="between 0 and 1, but got 1.5"), keyed_dropout.keyed(key):
        torch.nn.functional.dropout(x, 1.5)


def test_other_threads_keep_torchs_dropout_while_a_pass_is_keyed():
    """While one thread's pass is keyed, another thread's dropout and attention are torch's own (its generator)."""
    import threading

    x = torch.ones(16, 16)
    torch.manual_seed(5)
    expected = keyed_dropout._torch_dropout(x, 0.5)
    seen = {}

    def other() -> None:
        torch.manual_seed(5)
        seen["dropout"] = torch.nn.functional.dropout(x, 0.5)
        seen["keyed"] = getattr(keyed_dropout._state, "key", None)

    with keyed_dropout.keyed(keyed_dropout.run_key(1, 0)):
        assert torch.nn.functional.dropout is keyed_dropout.dropout
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
    assert torch.equal(seen["dropout"], expected) and seen["keyed"] is None


def test_runs_that_stop_early_release_the_others_even_when_thread_ids_are_reused(tiny_cfg):
    """A group of three: run 0 leaves before any step (a finished run skipped; its thread ends, and the next thread
    often gets its id), run 1 stops after two steps, run 2 takes five: nobody waits for a run that left."""
    import threading

    cfg = tiny_cfg("prototype=lora")
    models = runner_models(cfg, [1, 2, 3])
    group, steps = fused.FusedGroup(3), {0: 0, 1: 0, 2: 0}

    def run(k: int, member) -> None:
        fused.join(member)
        try:
            if k == 0:
                return
            optimizer, scheduler = loop.make_optimizer(models[k], cfg, models[k].head_names(), 10)
            optimization = loop.Optimization(optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False))
            for _ in range(2 if k == 1 else 5):
                loop.train_step(models[k], batches(1, seed=steps[k])[0], optimization, torch.device("cpu"), "fp32", 1.0)
                steps[k] += 1
        finally:
            fused.leave()
            fused.join(None)

    first = threading.Thread(target=run, args=(0, group.member(0)))
    first.start()
    first.join()
    threads = [threading.Thread(target=run, args=(k, group.member(k))) for k in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert steps == {0: 0, 1: 2, 2: 5} and not any(t.is_alive() for t in threads)


def test_the_signal_relay_notes_the_first_signal_and_forgets_it_with_the_next_group():
    with fused.SignalRelay():
        os.kill(os.getpid(), signal.SIGTERM)          # noted for the next fused pass, the process goes on
        time.sleep(0.1)
        assert fused.SignalRelay.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is not None and fused.SignalRelay.signum == signal.SIGTERM
    with fused.SignalRelay():                           # the next group starts without the old signal
        assert fused.SignalRelay.signum is None


# ----------------------------------------------------------------------------- the launcher, end to end


@pytest.fixture(scope="module")
def no_dropout_model_dir(tmp_path_factory) -> str:
    """The tiny text BERT (the embedded model's tokenizer) with dropout off: fused equals alone within rounding."""
    from transformers import BertConfig, BertForSequenceClassification

    from conftest import compose_cfg

    config = BertConfig(vocab_size=30522, hidden_size=TINY["hidden"], num_hidden_layers=TINY["layers"],
                        num_attention_heads=TINY["heads"], intermediate_size=64, max_position_embeddings=512,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-bert-no-dropout")
    BertForSequenceClassification(config).save_pretrained(folder)
    backbone.load_tokenizer(compose_cfg().model).save_pretrained(folder)
    return str(folder)


def sweep(tmp_path: Path, name: str, launcher: str, model_dir: str, glue_dir, *overrides: str, background=False):
    command = [SCRIPT, "-m", f"hydra/launcher={launcher}", f"model.name_or_path={model_dir}", "model.name=tiny",
               f"model.hidden_size={TINY['hidden']}", f"model.num_layers={TINY['layers']}", f"data.dir={glue_dir}",
               "logger.mode=disabled", "trainer.progress=false", "trainer.batch_size=8", "trainer.eval_batch_size=128",
               "task=rte", "data.max_train_examples=48", "trainer.epochs=2", f"hydra.sweep.dir={tmp_path / name}",
               *overrides]
    if background:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                                cwd=tmp_path)
    return subprocess.run(command, capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=900)


def largest_difference(a: Path, b: Path) -> float:
    """Between two sweeps' job folders of the same names: the largest difference of any training loss, test metric
    or checkpoint tensor (the folders' names and files must match)."""
    runs = sorted(p.parent.name for p in a.glob("*/metrics.json"))
    assert runs and runs == sorted(p.parent.name for p in b.glob("*/metrics.json"))
    worst = 0.0
    for run in runs:
        ma, mb = (json.loads((root / run / "metrics.json").read_text()) for root in (a, b))
        assert ma["seed"] == mb["seed"] and len(ma["history"]) == len(mb["history"])
        worst = max([worst, *(abs(x["train_loss"] - y["train_loss"]) for x, y in zip(ma["history"], mb["history"]))])
        worst = max([worst, *(abs(ma["test"][k] - mb["test"][k]) for k in ma["test"])])
        files = sorted(p.relative_to(a / run) for p in (a / run / "checkpoint").rglob("*.safetensors"))
        assert files and files == sorted(p.relative_to(b / run) for p in (b / run / "checkpoint").rglob("*.safetensors"))
        for file in files:
            ta, tb = load_file(a / run / file), load_file(b / run / file)
            assert ta.keys() == tb.keys()
            worst = max([worst, *((ta[k].float() - tb[k].float()).abs().max().item() for k in ta if ta[k].numel())])
    return worst


@pytest.mark.slow
@pytest.mark.parametrize("prototype", ["lora", "adapter", "prefix"])
def test_a_fused_sweep_writes_what_its_runs_write_alone(tmp_path, glue_dir, no_dropout_model_dir, prototype):
    """propetl-train -m hydra/launcher=fused seed=1,2 mask.sparsity=0.5,0.9: one process, the four runs fused (said on
    stderr), each in the folder the basic launcher gives it, with its metrics and checkpoint within 1e-5 of the run
    made alone."""
    args = (no_dropout_model_dir, glue_dir, f"prototype={prototype}", "seed=1,2", "mask.sparsity=0.5,0.9")
    together = sweep(tmp_path, "fused", "fused", *args)
    assert together.returncode == 0, together.stderr[-3000:]
    assert "4 jobs train fused" in together.stdout + together.stderr
    alone = sweep(tmp_path, "basic", "basic", *args)
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert largest_difference(tmp_path / "fused", tmp_path / "basic") < 1e-5
    for log in (tmp_path / "fused").glob("*/train.log"):          # each run's log holds its own lines only
        text = log.read_text()
        seed = json.loads((log.parent / "metrics.json").read_text())["seed"]
        assert f"seed {seed}" in text and sum(f"| seed {s}" in text for s in (1, 2)) == 1


@pytest.mark.slow
def test_jobs_that_cannot_fuse_run_one_after_another(tmp_path, glue_dir, no_dropout_model_dir):
    done = sweep(tmp_path, "ft", "fused", no_dropout_model_dir, glue_dir, "method=finetune", "seed=1,2",
                 "trainer.max_steps=2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 jobs train one after another, not fused: method=finetune" in done.stdout + done.stderr
    assert len(list((tmp_path / "ft").glob("*/metrics.json"))) == 2


@pytest.mark.slow
def test_a_terminated_fused_sweep_resumes_to_the_uninterrupted_results(tmp_path, glue_dir, tiny_text_model_dir):
    """Dropout on: SIGTERM to a fused sweep once its runs have saved mid-epoch state: every run saves at the same step
    (the group's relayed signal) and the sweep exits 143. Then one run's saved state is removed (as a kill that came
    before its save), so run again, one run resumes mid-epoch beside the other starting over: the sweep still ends
    with the metrics and checkpoints of the sweep that was never interrupted (each run's dropout is its own stream)."""
    args = (tiny_text_model_dir, glue_dir, "prototype=lora", "seed=1,2", "trainer.save_steps=4", "trainer.epochs=3")
    whole = sweep(tmp_path, "whole", "fused", *args)
    assert whole.returncode == 0, whole.stderr[-3000:]
    cut = sweep(tmp_path, "cut", "fused", *args, background=True)
    deadline = time.time() + 600
    while len(list((tmp_path / "cut").glob("*/resume/state.json"))) < 2:      # both runs' first checkpoint
        assert cut.poll() is None and time.time() < deadline, cut.communicate()[1][-3000:]
        time.sleep(0.05)
    cut.send_signal(signal.SIGTERM)
    _, stderr = cut.communicate(timeout=300)
    assert cut.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    states = [json.loads(p.read_text()) for p in (tmp_path / "cut").glob("*/resume/state.json")]
    assert len(states) == 2 and states[0]["result"]["steps"] == states[1]["result"]["steps"] < 18
    assert not list((tmp_path / "cut").glob("*/metrics.json"))
    shutil.rmtree(sorted((tmp_path / "cut").glob("*/resume"))[-1])      # the second run: saved nothing
    resumed = sweep(tmp_path, "cut", "fused", *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout + resumed.stderr + "".join(
        p.read_text() for p in (tmp_path / "cut").glob("*/train.log"))
    assert largest_difference(tmp_path / "whole", tmp_path / "cut") < 1e-5


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
