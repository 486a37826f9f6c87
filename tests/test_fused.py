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
from propetl.run import fused, loop

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
    """One pass over runs at sparsity 0.5 and 0.9 with learned, random and all-ones masks: each run's masks are its
    own store's, so losses and every gradient equal each run's alone."""
    settings = [("0.5", "learned"), ("0.9", "learned"), ("0.5", "random"), ("0.9", "none")]
    models = [runner_models(tiny_cfg("prototype=lora", f"mask.sparsity={s}", f"mask.kind={k}"), [seed])[0]
              for seed, (s, k) in enumerate(settings, start=1)]
    _, together = fused_then_alone(models, batches(len(models)))
    assert all(any("scores" in n for n in grads) for grads in together[:2])      # learned masks get their gradient


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


def test_each_fused_run_draws_its_own_dropout(tiny_cfg):
    """Two runs identical in every tensor and batch: fused with dropout on, their losses differ (their own draws);
    with dropout off they are equal."""
    cfg = tiny_cfg("prototype=lora")
    for dropout, differ in ((0.3, True), (0.0, False)):
        models = runner_models(cfg, [1, 1], dropout)
        data = batches(1) * 2
        losses, _ = fused.stacked_forward(models, data, fused.varying_names(models))
        assert (abs(losses[0].item() - losses[1].item()) > 1e-6) == differ


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
    (the group's relayed signal) and the sweep exits 143; run again, it ends with the metrics and checkpoints of the
    sweep that was never interrupted."""
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
    resumed = sweep(tmp_path, "cut", "fused", *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout + resumed.stderr + "".join(
        p.read_text() for p in (tmp_path / "cut").glob("*/train.log"))
    assert largest_difference(tmp_path / "whole", tmp_path / "cut") < 1e-6


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
