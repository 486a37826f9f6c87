"""model=t5-* through the runner (issue 24): a tiny random T5 folder (conftest.tiny_t5_dir) trained text to text on real
RTE + MRPC rows; its checkpoint reloads (checkpoint.load_multitask, load_propetl, propetl-eval) and generates the same
tokens; a killed run resumes to the same metrics; the storage figures equal a hand count; T5 settings and refusals."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_T5, compose_cfg, tiny_t5_overrides, write_mnli
from torch.utils.data import DataLoader

from propetl import methods
from propetl.configs import ConfigError, ModelSetup
from propetl.data import seq2seq
from propetl.models.t5 import TextToTextModel, adds_task_prefix
from propetl.run import log, loop
from propetl.storage import checkpoint
from propetl.validate import validate

REPO = Path(__file__).resolve().parent.parent
TASKS = ["rte", "mrpc"]
# 24 rows a task at batch 8, 6 steps, evaluation (an "epoch") every 3 steps, a resume checkpoint every 2 steps
RUN = ["mode=multitask", f"tasks=[{','.join(TASKS)}]", "data.max_train_examples=24", "trainer.max_steps=6",
       "trainer.eval_every_steps=3", "trainer.warmup_steps=2", "trainer.save_steps=2", "trainer.lr=0.01"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
       "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
TIMING_KEYS = ("train_seconds", "wall_seconds", "host")


def comparable(metrics: dict) -> dict:
    out = {k: v for k, v in metrics.items() if k not in TIMING_KEYS}
    out["history"] = [{k: v for k, v in record.items() if k != "epoch_seconds"} for record in metrics["history"]]
    return out


def start(run_dir: Path, overrides: list[str]) -> subprocess.Popen:
    """This checkout's propetl-train (python -m: the installed console script may be another checkout's)."""
    return subprocess.Popen([sys.executable, "-m", "propetl.cli.train", *overrides, f"hydra.run.dir={run_dir}"],
                            env=ENV, cwd=run_dir.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(run_dir: Path, overrides: list[str]) -> dict:
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    process = start(run_dir, overrides)
    _, stderr = process.communicate(timeout=900)
    assert process.returncode == 0, stderr[-3000:]
    return json.loads((run_dir / "metrics.json").read_text())


# --- config: what model=t5-* brings, what it accepts and refuses --------------------------------------------------

def test_t5_models_bring_the_reference_settings_and_encoders_keep_theirs():
    cfg = compose_cfg(["model=t5-base", "mode=multitask", "tasks=[rte,mrpc,stsb,cola,sst2]", "prototype=adapter"])
    assert (cfg.model.family, cfg.model.hidden_size, cfg.model.num_layers) == ("t5", 768, 12)
    assert (cfg.prototype.non_linearity, cfg.prototype.init_std, cfg.prototype.bottleneck) == ("gelu_new", 0.01, 64)
    assert (cfg.trainer.lr, cfg.trainer.weight_decay, cfg.mask.weight_decay) == (3e-4, 0.0, 0.0)
    assert (cfg.trainer.mask_lr_ratio, cfg.trainer.label_smoothing, cfg.trainer.warmup_steps) == (10, 0.1, 500)
    validate(cfg)
    encoder = compose_cfg([])
    assert encoder.get("model").get("family", "encoder") == "encoder"
    assert (encoder.trainer.mask_lr_ratio, encoder.trainer.label_smoothing, encoder.prototype.non_linearity) == (
        None, 0.0, "relu")
    assert encoder.trainer.warmup_steps is None
    experiment = compose_cfg(["model=t5-base", "experiment=t5_multitask"])
    assert (experiment.trainer.max_steps, experiment.trainer.eval_every_steps, experiment.trainer.warmup_steps) == (
        20000, 2000, 500)
    assert (experiment.mask.sparsity, experiment.trainer.batch_size, experiment.multitask.temperature) == (0.7, 128, 10)
    # Table 2's eight GLUE tasks in the reference's order (propetl-t5/configs/glue/propetl_adapter_reduction12.json)
    assert list(experiment.tasks) == ["rte", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "cola"]
    validate(experiment)


def test_qnli_qqp_mnli_are_t5_tasks():
    validate(compose_cfg(["model=t5-small", "mode=multitask", "tasks=[qnli,qqp,mnli,rte]", "prototype=adapter"]))
    for task in ("qnli", "qqp", "mnli"):
        validate(compose_cfg(["model=t5-small", f"task={task}"]))


def test_a_tiny_t5_trains_mnli_from_local_files(tmp_path, tiny_t5_dir):
    """MNLI text to text end to end (2 steps): train.tsv to train, dev_mismatched.tsv to select, dev_matched.tsv to
    report (paper.md §5.3), with 3 classes scored on the exact label strings."""
    folder = write_mnli(tmp_path / "glue", {"train.tsv": 16, "dev_matched.tsv": 6, "dev_mismatched.tsv": 4})
    cfg = compose_cfg([*tiny_t5_overrides(tiny_t5_dir, folder), "mode=multitask", "tasks=[mnli]", "data.allow_hub=false",
                       "trainer.max_steps=2", "trainer.eval_every_steps=2", "trainer.warmup_steps=1"])
    validate(cfg)
    metrics, _ = train_recorded(cfg, tmp_path / "run")
    assert metrics["tasks"] == ["mnli"] and metrics["steps"] == 2
    assert set(metrics["per_task"]["mnli"]["test"]) == {"accuracy"}
    assert set(metrics["per_task"]["mnli"]["selection"]) == {"accuracy"}
    predictions, labels = log.read_predictions(tmp_path / "run" / "predictions.npz")["mnli"]
    assert labels.tolist() == [0, 1, 2, 0, 1, 2] and len(predictions) == 6  # the test split: dev_matched.tsv's rows


def test_generation_tasks_need_a_t5_and_t5_refuses_other_prototypes_in_one_line():
    for task in ("xsum", "wmt16_ro_en"):
        with pytest.raises(ConfigError, match="needs a text-to-text model"):
            validate(compose_cfg([f"task={task}"]))
        validate(compose_cfg(["model=t5-small", f"task={task}"]))
    validate(compose_cfg(["model=t5-small", "task=rte"]))
    with pytest.raises(ConfigError, match="tasks: xsum: task=xsum needs a text-to-text model") as refused:
        validate(compose_cfg(["mode=multitask", "tasks=[rte,xsum]"]))
    assert "\n" not in str(refused.value)
    for prototype in ("lora", "prefix"):
        with pytest.raises(ConfigError, match=f"prototype={prototype} is not supported on T5") as refused:
            validate(compose_cfg(["model=t5-small", f"prototype={prototype}"]))
        assert "\n" not in str(refused.value)


def test_mask_lr_ratio_makes_the_mask_lr_ten_times_the_prototypes_current_lr(tiny_t5_dir, glue_dir):
    cfg = compose_cfg([*tiny_t5_overrides(tiny_t5_dir, glue_dir), *RUN])
    model = TextToTextModel(ModelSetup.from_config(cfg), TASKS)
    optimizer, scheduler = loop.make_optimizer(model, cfg, model.head_names(), total_steps=10)
    groups = {g["name"]: g for g in optimizer.param_groups}
    for _ in range(6):
        assert groups["masks"]["lr"] == pytest.approx(10 * groups["weights"]["lr"])
        assert groups["masks"]["weight_decay"] == 0.0
        optimizer.step()
        scheduler.step()
    assert loop.warmup_steps(cfg, 10) == 2


# --- a run: train, save, reload, generate the same ------------------------------------------------------------------

def train_recorded(cfg, out: Path) -> tuple[dict, TextToTextModel]:
    """train(cfg, out) in this process: (metrics, the trained model as the run leaves it: its best evaluation's)."""
    from propetl.run import train as train_module

    models = []

    class Recorded(TextToTextModel):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            models.append(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module, "TextToTextModel", Recorded)
        metrics = train_module.train(cfg, out)
    return metrics, models[0]


@pytest.fixture(scope="module")
def t5_run(tmp_path_factory, tiny_t5_dir, glue_dir):
    """A multi-task tiny-T5 run (RTE + MRPC) and its trained model."""
    cfg = compose_cfg([*tiny_t5_overrides(tiny_t5_dir, glue_dir), *RUN])
    out = tmp_path_factory.mktemp("t5-run")
    metrics, model = train_recorded(cfg, out)
    return cfg, out, metrics, model


def test_metrics_have_the_encoder_runs_shape(t5_run):
    _, out, metrics, _ = t5_run
    assert metrics["mode"] == "multitask" and metrics["tasks"] == TASKS and metrics["steps"] == 6
    assert metrics["model_family"] == "t5"  # the report's Table 2 (report.runs.table2_runs)
    assert metrics["epochs_run"] == 2 and [r["step"] for r in metrics["history"]] == [3, 6]
    assert set(metrics["per_task"]["rte"]["test"]) == {"accuracy"}
    assert set(metrics["per_task"]["mrpc"]["test"]) == {"accuracy", "f1", "combined"}
    assert set(metrics["selection"]) == {"rte/accuracy", "mrpc/accuracy", "mrpc/f1", "mrpc/combined", "mean"}
    assert all(0 <= t["glue_score"] <= 1 for t in metrics["per_task"].values())
    assert all(0 <= record["train/rte/accuracy"] <= 1 for record in metrics["history"] if "train/rte/accuracy" in record)
    assert (out / "checkpoint" / "shared" / "prototype.safetensors").exists()
    assert {p.name for p in (out / "checkpoint" / "tasks").iterdir()} == set(TASKS)


def test_storage_figures_equal_a_hand_count(t5_run):
    """4 sites (2 encoder + 2 decoder blocks), one prototype d x b down, b x d up (+ biases), a layer mask per site
    and a task mask per task over the two weight matrices; plain PETL: one adapter per site."""
    cfg, _, metrics, _ = t5_run
    d, b, sites, tasks = TINY_T5["d_model"], int(cfg.prototype.bottleneck), 2 * TINY_T5["layers"], len(TASKS)
    prototype, masked = d * b + b + b * d + d, 2 * d * b
    storage = metrics["storage"]
    assert (storage["tasks"], storage["shared_params"]) == (tasks, prototype)
    assert storage["layer_mask_entries"] == sites * masked
    assert storage["task_mask_entries_per_task"] == masked
    assert storage["shared_bytes"] == 4 * prototype + sites * masked // 8
    assert storage["task_mask_bytes_per_task"] == masked // 8
    assert storage["total_bytes"] == 4 * prototype + sites * masked // 8 + tasks * masked // 8
    assert storage["plain_petl_bytes_per_task"] == 4 * sites * prototype
    assert storage["amortised_ratio_to_plain_petl"] == pytest.approx(storage["total_bytes"] / tasks / (4 * sites * prototype))
    assert storage["head_params"] == dict.fromkeys(TASKS, 0)


def generated_ids(model, cfg, glue_dir, tasks=TASKS) -> dict[str, list[torch.Tensor]]:
    """Token ids of each task's test split, generated greedily with the task's masks (as the run scores them)."""
    from propetl.data.multitask import task_configs
    from propetl.models.backbone import load_tokenizer

    tokenizer = load_tokenizer(ModelSetup.from_config(cfg).model)
    out = {}
    for index, task in enumerate(task_configs(tasks)):
        settings = seq2seq.task_settings(task, tokenizer)
        prefix = adds_task_prefix(cfg.method.name)  # the task-name prefix, as the run
        text = seq2seq.text_to_text_splits(task, glue_dir, cfg.data.protocol, cfg.data.split_seed, add_prefix=prefix)
        rows = seq2seq.tokenise(text["test"], tokenizer, settings.max_source_length, settings.max_target_length["test"])
        loader = DataLoader(rows, batch_size=64, collate_fn=seq2seq.Seq2SeqCollator(tokenizer))
        model.eval()
        out[task.name] = [model.generate(b["input_ids"], b["attention_mask"], task=index, num_beams=1,
                                         max_new_tokens=settings.max_new_tokens) for b in loader]
    return out


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(len(a[k]) == len(b[k]) and all(map(torch.equal, a[k], b[k])) for k in a)


def test_a_saved_t5_run_reloads_and_generates_identically(t5_run, tiny_t5_dir, glue_dir):
    from transformers import T5ForConditionalGeneration

    from propetl import load_propetl

    cfg, out, _, trained = t5_run
    expected = generated_ids(trained, cfg, glue_dir)
    loaded, saved = checkpoint.load_multitask(out / "checkpoint")
    assert isinstance(loaded, TextToTextModel) and saved["tasks"] == TASKS and saved["model"]["family"] == "t5"
    assert same(generated_ids(loaded, cfg, glue_dir), expected)
    store, trained_store = methods.petl_weights(loaded), methods.petl_weights(trained)
    for name, tensor in trained_store.binary_masks().items():
        assert torch.equal(store.binary_masks()[name], tensor), name
    api = load_propetl(T5ForConditionalGeneration.from_pretrained(tiny_t5_dir), out / "checkpoint")
    assert isinstance(api, TextToTextModel) and not api.training
    assert same(generated_ids(api, cfg, glue_dir), expected)


def test_export_refuses_a_t5_checkpoint_in_one_line(t5_run, tmp_path):
    from propetl.cli.export import ExportError, export

    _, out, _, _ = t5_run
    with pytest.raises(ExportError, match="cannot be merged into T5's weights") as refused:
        export(out / "checkpoint", tmp_path / "hf", "hf")
    assert "\n" not in str(refused.value) and not (tmp_path / "hf").exists()


def test_propetl_eval_scores_a_t5_checkpoint_as_the_run_did(t5_run, glue_dir):
    from propetl.cli.evaluate import evaluate_checkpoint

    _, out, metrics, _ = t5_run
    result = evaluate_checkpoint(out / "checkpoint", data_dir=str(glue_dir), batch_size=64)
    assert result["per_task"] == {name: t["test"] for name, t in metrics["per_task"].items()}


def test_an_encoder_checkpoint_is_not_loaded_into_a_t5(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="not loaded into a T5"):
        checkpoint.build_model(ModelSetup.from_config(compose_cfg([])), ["rte"], [2], False, False, t5=torch.nn.Linear(1, 1))


# --- kill and resume ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_killed_t5_run_resumes_to_identical_metrics(tmp_path, tiny_t5_dir, glue_dir):
    """SIGKILL after the first resume checkpoint (step 2 of 6, mid-"epoch"), the same command again: the same
    metrics.json (losses, selection, test, storage) and the same prototype as a run never interrupted."""
    overrides = [*tiny_t5_overrides(tiny_t5_dir, glue_dir), *RUN]
    expected = finish(tmp_path / "straight" / "run", overrides)
    run_dir = tmp_path / "killed" / "run"
    run_dir.parent.mkdir()
    process = start(run_dir, overrides)
    deadline = time.time() + 300
    while not (run_dir / "resume" / "state.json").exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=300)
    assert not (run_dir / "metrics.json").exists()
    resumed = start(run_dir, overrides)
    stdout, stderr = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, stderr[-3000:]
    assert "resuming from" in stdout + stderr
    assert comparable(json.loads((run_dir / "metrics.json").read_text())) == comparable(expected)
    saved = [checkpoint.read_safetensors(d / "checkpoint" / "shared" / "prototype.safetensors")[0]
             for d in (tmp_path / "straight" / "run", run_dir)]
    assert saved[0].keys() == saved[1].keys() and all(torch.equal(saved[0][k], saved[1][k]) for k in saved[0])


@pytest.mark.parametrize("method", ["petl", "finetune"])
def test_plain_adapters_and_full_finetuning_on_t5_save_and_reload(method, tmp_path, tiny_t5_dir, glue_dir):
    """method=petl (one adapter per site) and finetune (every T5 weight but lm_head and the LayerNorms) on task=rte:
    the checkpoint loads back and generates the same tokens."""
    cfg = compose_cfg([*tiny_t5_overrides(tiny_t5_dir, glue_dir), f"method={method}", "task=rte",
                       "data.max_train_examples=16", "trainer.max_steps=2", "trainer.warmup_steps=1",
                       "trainer.lr=0.01"])
    metrics, trained = train_recorded(cfg, tmp_path)
    assert metrics["method"] == method and metrics["steps"] == 2
    loaded, saved = checkpoint.load_multitask(tmp_path / "checkpoint")
    assert saved["method"]["name"] == method and saved["tasks"] == ["rte"]
    assert same(generated_ids(loaded, cfg, glue_dir, ["rte"]), generated_ids(trained, cfg, glue_dir, ["rte"]))


@pytest.mark.parametrize("method", ["petl", "finetune"])
def test_table2s_plain_arms_train_every_task_at_once_and_reload(method, tmp_path, tiny_t5_dir, glue_dir, monkeypatch):
    """experiment=t5_multitask's baselines as multi-task runs (RTE + MRPC): petl, one adapter per site shared by both
    tasks; finetune, every T5 weight, the only arm whose sources start with the task name. metrics.json per task, the
    trainable count, and the checkpoint loads back and generates the same tokens."""
    import inspect

    real, prefixes = seq2seq.text_to_text_splits, []

    def recorded(*args, **kwargs):
        prefixes.append(inspect.signature(real).bind(*args, **kwargs).arguments.get("add_prefix", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(seq2seq, "text_to_text_splits", recorded)
    cfg = compose_cfg([*tiny_t5_overrides(tiny_t5_dir, glue_dir), *RUN, f"method={method}"])
    metrics, trained = train_recorded(cfg, tmp_path)
    assert (metrics["mode"], metrics["method"], list(metrics["per_task"])) == ("multitask", method, TASKS)
    assert prefixes == [method == "finetune"] * len(TASKS)
    trainable = sum(p.numel() for p in trained.parameters() if p.requires_grad)
    sites, d, b = 2 * TINY_T5["layers"], TINY_T5["d_model"], int(cfg.prototype.bottleneck)
    assert metrics["storage"]["trainable_params"] == trainable == (
        sites * (2 * d * b + b + d) if method == "petl" else metrics["storage"]["backbone_params"])
    loaded, saved = checkpoint.load_multitask(tmp_path / "checkpoint")
    assert saved["method"]["name"] == method and saved["tasks"] == TASKS
    assert same(generated_ids(loaded, cfg, glue_dir), generated_ids(trained, cfg, glue_dir))


def test_single_task_t5_run_on_one_task(tmp_path, tiny_t5_dir, glue_dir):
    """task=rte alone: the one-task case (layer masks only), metrics.json of a single-task run with its trivial
    baseline."""
    from propetl.run.train import train

    cfg = compose_cfg([*tiny_t5_overrides(tiny_t5_dir, glue_dir), "task=rte", "data.max_train_examples=16",
                       "trainer.max_steps=2", "trainer.eval_every_steps=2", "trainer.warmup_steps=1"])
    metrics = train(cfg, tmp_path)
    assert metrics["task"] == "rte" and set(metrics["test"]) == {"accuracy"} and metrics["steps"] == 2
    assert metrics["trivial"] is not None and "task_mask_entries_per_task" not in metrics["storage"]
    assert metrics["storage"]["mask_entries"] == 2 * TINY_T5["layers"] * 2 * TINY_T5["d_model"] * int(cfg.prototype.bottleneck)


def test_a_t5_run_trains_xsum_from_local_jsonl_and_reports_rouge(tmp_path, tiny_t5_dir):
    """task=xsum on the tiny T5 from the shipped fixture rows (as train, validation and test): ROUGE on test and
    selection, no trivial baseline (a generation task has no labels), the data's files in the fingerprint."""
    from propetl.run.train import train

    fixture = Path(__file__).parent / "fixtures" / "xsum_tiny.jsonl"
    (tmp_path / "data" / "xsum").mkdir(parents=True)
    for split in ("train", "validation", "test"):
        (tmp_path / "data" / "xsum" / f"{split}.jsonl").write_text(fixture.read_text())
    cfg = compose_cfg([*tiny_t5_overrides(tiny_t5_dir, tmp_path / "data"), "task=xsum", "trainer.batch_size=4",
                       "trainer.max_steps=2", "trainer.eval_every_steps=2", "trainer.warmup_steps=1",
                       "task.max_new_tokens=8"])
    metrics = train(cfg, tmp_path / "run")
    assert metrics["task"] == "xsum" and metrics["steps"] == 2 and "trivial" not in metrics
    assert set(metrics["test"]) == set(metrics["selection"]) == {"rouge1", "rouge2", "rougeL", "rougeLsum", "combined"}
    hub = hashlib.sha256(b"hub:xsum\n").hexdigest()  # what the fingerprint would hold had the files been missed
    assert metrics["data_sha256"] != hub and (tmp_path / "run" / "checkpoint").is_dir()


def test_t5_base_offline_is_one_line_naming_the_fix(monkeypatch):
    from propetl.configs import ModelConfig
    from propetl.models.backbone import ModelError, load_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = ModelConfig.from_config(compose_cfg(["model=t5-base"]).model)
    with pytest.raises(ModelError, match="set model.name_or_path=FOLDER") as refused:
        load_tokenizer(model)
    assert "\n" not in str(refused.value)
