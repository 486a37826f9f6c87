"""The aggregator (propetl-report, propetl.report) on hand-written metrics.json files."""
import csv
import io
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import format1_packed_masks
from safetensors.torch import save_file

from propetl import report
from propetl.report import command
from propetl.report.plots import pairwise_hamming
from propetl.run import log

REPO = Path(__file__).resolve().parents[1]

# One value per GLUE number for a full 8-task run: the 11-number average is checked by hand below.
FULL = {"cola": {"matthews": 0.50}, "sst2": {"accuracy": 0.90}, "mrpc": {"accuracy": 0.80, "f1": 0.86},
        "qqp": {"accuracy": 0.85, "f1": 0.81}, "stsb": {"pearson": 0.88, "spearman": 0.87},
        "mnli": {"accuracy": 0.82}, "qnli": {"accuracy": 0.89}, "rte": {"accuracy": 0.70}}


def write_run(root: Path, name: str, task: str, method: str, prototype: str, seed: int, test: dict,
              sparsity=0.5, kind="learned", file_bytes=1000, trivial=None):
    folder = root / name
    folder.mkdir(parents=True)
    storage = {"backbone_params": 1000, "trainable_params": 10, "stored_params": 5, "mask_entries": 64,
               "storage_bytes": 28, "file_bytes": file_bytes, "storage_percent_of_backbone": 0.1 if method == "propetl" else 0.5,
               "storage_ratio_to_plain_petl": 0.2 if method == "propetl" else 1.0}
    metrics = {"task": task, "model": "minilm", "method": method, "prototype": prototype, "mask_kind": kind,
               "mask_sparsity": sparsity, "seed": seed, "test": test, "storage": storage, "epochs_run": 2}
    if trivial:
        metrics["trivial"] = trivial
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def test_means_and_sample_stds_over_seeds(tmp_path):
    for seed, acc in zip((1, 2, 3), (0.60, 0.70, 0.65)):
        write_run(tmp_path, f"p{seed}", "rte", "petl", "lora", seed, {"accuracy": acc})
    for seed, (acc, f1) in zip((1, 2), ((0.80, 0.90), (0.70, 0.80))):
        write_run(tmp_path, f"m{seed}", "mrpc", "petl", "lora", seed, {"accuracy": acc, "f1": f1})
    rows = report.summarise(report.load_runs([tmp_path]))
    assert [r["label"] for r in rows] == ["LoRA"]
    rte = rows[0]["tasks"]["rte"]["accuracy"]
    assert rte["mean"] == pytest.approx(65.0)
    assert rte["std"] == pytest.approx(statistics.stdev([60.0, 70.0, 65.0]))   # sample std: 5.0
    assert rte["std"] == pytest.approx(5.0) and rte["n"] == 3
    mrpc = rows[0]["tasks"]["mrpc"]
    assert mrpc["accuracy"]["mean"] == pytest.approx(75.0) and mrpc["f1"]["mean"] == pytest.approx(85.0)
    assert mrpc["f1"]["std"] == pytest.approx(7.0710678, rel=1e-6)
    # the average of the numbers present: rte 65, mrpc acc 75 and f1 85 -> 75 over 3 numbers
    assert rows[0]["average"] == pytest.approx(75.0) and rows[0]["average_numbers"] == 3
    table = report.markdown_table(rows)
    assert "65.00±5.00" in table and "75.00±7.07/85.00±7.07" in table and "(3 of 11)" in table


def test_eleven_number_glue_average(tmp_path):
    for task, test in FULL.items():
        write_run(tmp_path, f"{task}", task, "propetl", "adapter", 42, test)
    rows = report.summarise(report.load_runs([tmp_path]))
    numbers = [v for test in FULL.values() for v in test.values()]
    assert len(numbers) == 11
    assert rows[0]["label"] == "ProPETL-Adapter"
    assert rows[0]["average"] == pytest.approx(100 * sum(numbers) / 11)
    assert rows[0]["average_numbers"] == 11
    line = next(l for l in report.markdown_table(rows).splitlines() if l.startswith("| ProPETL-Adapter |"))
    assert f"{100 * sum(numbers) / 11:.2f} |" in line and "of 11" not in line


def test_rows_split_by_method_prototype_and_sweep(tmp_path):
    write_run(tmp_path, "a", "rte", "finetune", "adapter", 1, {"accuracy": 0.7})
    write_run(tmp_path, "b", "rte", "petl", "adapter", 1, {"accuracy": 0.6})
    write_run(tmp_path, "c", "rte", "propetl", "adapter", 1, {"accuracy": 0.65}, sparsity=0.5)
    write_run(tmp_path, "d", "rte", "propetl", "adapter", 1, {"accuracy": 0.55}, sparsity=0.9)
    write_run(tmp_path, "e", "rte", "propetl", "adapter", 1, {"accuracy": 0.50}, sparsity=0.5, kind="random")
    labels = [r["label"] for r in report.summarise(report.load_runs([tmp_path]))]
    assert labels == ["Fine-tune", "Adapter", "ProPETL-Adapter (s=0.5)", "ProPETL-Adapter (s=0.9)",
                      "ProPETL-Adapter (random)"]


def test_comparison_gives_propetl_minus_petl(tmp_path):
    write_run(tmp_path, "a", "rte", "petl", "prefix", 1, {"accuracy": 0.60})
    write_run(tmp_path, "b", "rte", "propetl", "prefix", 1, {"accuracy": 0.625})
    table = report.comparison_table(report.summarise(report.load_runs([tmp_path])))
    assert "| Prefix | +2.50 | 0.200 |" in table


def test_hamming_heat_map_from_bit_packed_masks(tmp_path):
    layer_masks = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 0]], dtype=torch.float32)
    save_file({"proto.w": format1_packed_masks(layer_masks)}, str(tmp_path / "masks.safetensors"),
              metadata={"shapes": json.dumps({"proto.w": [3, 4]})})
    distance = report.layer_mask_hamming(tmp_path)
    assert distance.tolist() == [[0.0, 0.5, 0.0], [0.5, 0.0, 0.5], [0.0, 0.5, 0.0]]
    assert report.plot_mask_hamming(tmp_path, tmp_path / "h.png").stat().st_size > 1000


def test_propetl_report_writes_everything(tmp_path):
    runs = tmp_path / "runs"
    for seed in (1, 2):
        write_run(runs, f"p{seed}", "rte", "petl", "lora", seed, {"accuracy": 0.6 + seed / 100}, file_bytes=5000)
        for s in (0.5, 0.9):
            write_run(runs, f"q{seed}{s}", "rte", "propetl", "lora", seed, {"accuracy": 0.6 + s / 10}, sparsity=s)
    out = tmp_path / "tables"
    done = subprocess.run(["propetl-report", str(runs), "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert {p.name for p in out.iterdir()} == {"runs.csv", "table.md", "rows.json", "paired.csv", "jobs.md",
                                              "metric_vs_storage.png", "frontier.png", "sparsity_sweep.png"}
    assert len((out / "runs.csv").read_text().splitlines()) == 1 + 6
    assert "ProPETL-LoRA (s=0.9)" in (out / "table.md").read_text()


def test_propetl_report_on_an_empty_folder_fails_in_one_line(tmp_path):
    done = subprocess.run(["propetl-report", str(tmp_path), "--out", str(tmp_path / "t")], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "no metrics.json" in done.stderr
    assert not (tmp_path / "t").exists()


def test_a_multitask_run_becomes_one_row_per_task(tmp_path):
    folder = tmp_path / "mt"
    folder.mkdir()
    metrics = {"mode": "multitask", "tasks": ["rte", "stsb"], "model": "minilm", "method": "propetl", "prototype": "lora",
               "mask_kind": "learned", "mask_sparsity": 0.9, "seed": 1,
               "per_task": {"rte": {"test": {"accuracy": 0.6}, "glue_score": 0.6},
                            "stsb": {"test": {"pearson": 0.8, "spearman": 0.7, "combined": 0.75}, "glue_score": 0.75}},
               "storage": {"amortised_bytes_per_task": 300.0, "amortised_ratio_to_plain_petl": 0.1,
                           "amortised_percent_of_backbone": 0.01, "backbone_params": 1000}}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    write_run(tmp_path, "single", "rte", "propetl", "lora", 1, {"accuracy": 0.5})
    rows = {r["label"]: r for r in report.summarise(report.load_runs([tmp_path]))}
    assert set(rows) == {"ProPETL-LoRA", "ProPETL-LoRA (multi-task)"}
    multi = rows["ProPETL-LoRA (multi-task)"]
    assert multi["tasks"]["rte"]["accuracy"]["mean"] == pytest.approx(60.0)
    assert multi["tasks"]["stsb"]["pearson"]["mean"] == pytest.approx(80.0)
    assert multi["average"] == pytest.approx((60 + 80 + 70) / 3) and multi["storage_bytes"] == 300.0


def test_a_one_task_multitask_run_reports_its_own_storage(tmp_path):
    """mode=multitask tasks=[rte] is counted as task=rte is (accounting.account): its row takes the one-task figures."""
    (tmp_path / "mt").mkdir()
    metrics = {"mode": "multitask", "tasks": ["rte"], "model": "minilm", "method": "propetl", "prototype": "lora",
               "mask_kind": "learned", "mask_sparsity": 0.9, "seed": 1,
               "per_task": {"rte": {"test": {"accuracy": 0.6}, "glue_score": 0.6}},
               "storage": {"storage_bytes": 280, "storage_ratio_to_plain_petl": 0.1, "storage_percent_of_backbone": 0.01,
                           "backbone_params": 1000}}
    (tmp_path / "mt" / "metrics.json").write_text(json.dumps(metrics))
    (row,) = report.summarise(report.load_runs([tmp_path]))
    assert row["label"] == "ProPETL-LoRA (multi-task)" and row["storage_bytes"] == 280


T5_TASKS = {"cola": ("matthews",), "sst2": ("accuracy",), "mrpc": ("accuracy", "f1"), "stsb": ("pearson", "spearman"),
            "rte": ("accuracy",)}
# per arm: its score offset, trainable params, amortised bytes a task, % of the backbone, ratio to plain PETL a task
T5_ARMS = {"finetune": (0.00, 1000, 800.0, 20.0, 0.2), "petl": (0.05, 24, 19.2, 0.48, 0.2),
           "propetl": (0.10, 40, 2.4, 0.06, 0.025)}


def write_t5_multitask_run(root: Path, method: str, seed: int, family: str | None = "t5", experiment=None) -> None:
    """A fake metrics.json of a T5 multi-task GLUE run (experiment=t5_multitask): task numbers 0.5 + the arm's offset
    + seed / 100 (x100: 50 + 100 * offset + seed)."""
    offset, trainable, per_task, percent, ratio = T5_ARMS[method]
    value = 0.5 + offset + seed / 100
    per_task_results = {task: {"test": {n: value for n in numbers}, "glue_score": value} for task, numbers in T5_TASKS.items()}
    storage = {"tasks": 5, "backbone_params": 1000, "trainable_params": trainable, "amortised_bytes_per_task": per_task,
               "amortised_percent_of_backbone": percent, "amortised_ratio_to_plain_petl": ratio}
    metrics = {"mode": "multitask", "tasks": list(T5_TASKS), "model": "t5-base", "method": method,
               "prototype": "adapter", "mask_kind": "learned", "mask_sparsity": 0.7, "seed": seed,
               "per_task": per_task_results, "storage": storage}
    metrics |= {"model_family": family} if family else {}
    folder = root / (experiment or ".") / f"method={method},seed={seed}"
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(metrics))


def test_t5_multitask_runs_are_table_2_one_row_per_method(tmp_path):
    runs = tmp_path / "runs"
    for method in T5_ARMS:
        for seed in (1, 2, 3):
            write_t5_multitask_run(runs, method, seed)
    # runs written before metrics.json named the model family: their folder names the experiment
    write_t5_multitask_run(runs, "propetl", 4, family=None, experiment="t5_multitask")
    write_run(runs, "single", "rte", "propetl", "adapter", 1, {"accuracy": 0.6})      # Table 1's
    encoder = json.loads((runs / "method=propetl,seed=1" / "metrics.json").read_text()) | {
        "model": "minilm", "model_family": "encoder", "seed": 9}
    (runs / "encoder").mkdir()
    (runs / "encoder" / "metrics.json").write_text(json.dumps(encoder))           # an encoder's multi-task run: Table 1
    report.build([runs], tmp_path / "out")
    table = (tmp_path / "out" / "table.md").read_text()
    table1, table2 = table.split("## Paired")[0].split("## Table 2 (T5 multi-task GLUE)")
    for label in ("ProPETL-Adapter", "ProPETL-Adapter (multi-task)"):   # the single-task run, the encoder's multi-task
        assert _table_row(table1, label).endswith("| 1 |")
    assert "t5-base" not in table1 and "Fine-tune" not in table1
    assert "not retrieved" in table2 and "(paper)" not in table2
    header = _table_row(table2, "Method")
    assert header == ("| Method | % params | % storage | bytes/task | ratio to PETL | CoLA | SST-2 | MRPC acc/F1 | STS-B P/S "
                      "| RTE | Avg | runs |")
    labels = [line.split(" | ")[0][2:] for line in table2.splitlines() if line.startswith("| ") and "---" not in line]
    assert labels == ["Method", "Fine-tune", "Adapter", "ProPETL-Adapter"]
    # seeds 1, 2, 3: mean 52 + 100 * offset, sample std 1; ProPETL also seed 4 (the folder-named run): 62.5 ± 1.29
    assert _table_row(table2, "Fine-tune") == ("| Fine-tune | 100.000 | 20.000 | 800 B | 0.200 | 52.00±1.00 | 52.00±1.00 "
                                               "| 52.00±1.00/52.00±1.00 | 52.00±1.00/52.00±1.00 | 52.00±1.00 "
                                               "| 52.00 (7 of 11) | 3 |")
    assert _table_row(table2, "Adapter").startswith("| Adapter | 2.400 | 0.480 | 19 B | 0.200 | 57.00±1.00 |")
    pro = _table_row(table2, "ProPETL-Adapter")
    assert pro.startswith("| ProPETL-Adapter | 4.000 | 0.060 | 2 B | 0.025 | 62.50±1.29 |")
    assert pro.endswith("| 62.50±1.29 | 62.50 (7 of 11) | 4 |")


def test_collect_results_keeps_metrics_and_mask_bits_only(tmp_path):
    """scripts/collect_results.py: the small evidence of each finished run, renamed folders, tables beside."""
    source = tmp_path / "outputs" / "table1"
    run = write_run(source, "method=propetl,prototype=lora,seed=1,task=rte", "rte", "propetl", "lora", 1,
                    {"accuracy": 0.6})
    write_run(source, "method=petl,prototype=lora,seed=1,task=rte", "rte", "petl", "lora", 1, {"accuracy": 0.5})
    write_run(tmp_path / "outputs" / "ablation_masks", "mask.kind=random,prototype=lora,seed=1,task=rte", "rte", "propetl",
              "lora", 1, {"accuracy": 0.55}, kind="random")
    (source / "unfinished").mkdir()
    (source / "unfinished" / "train.log").write_text("cut off")
    log.write_predictions(run / "predictions.npz", {"rte": (np.array([0, 1, 1]), np.array([0, 1, 0]))}, {"rte": 2})
    (run / "checkpoint").mkdir()
    save_file({"proto.w": format1_packed_masks(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))}, str(run / "checkpoint" / "masks.safetensors"),
              metadata={"shapes": json.dumps({"proto.w": [2, 2]})})
    for name, size in (("propetl.json", 10), ("prototype.safetensors", 5000), ("head.safetensors", 5000)):
        (run / "checkpoint" / name).write_bytes(b"x" * size)
    out = tmp_path / "results"
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "collect_results.py"), "--source",
                           str(tmp_path / "outputs"), "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    kept = {str(p.relative_to(out / "runs")) for p in (out / "runs").rglob("*") if p.is_file()}
    assert kept == {"table1/method-propetl_prototype-lora_seed-1_task-rte/metrics.json",
                    "table1/method-propetl_prototype-lora_seed-1_task-rte/predictions.npz",
                    "table1/method-propetl_prototype-lora_seed-1_task-rte/checkpoint/propetl.json",
                    "table1/method-propetl_prototype-lora_seed-1_task-rte/checkpoint/masks.safetensors",
                    "table1/method-petl_prototype-lora_seed-1_task-rte/metrics.json",
                    "ablation_masks/mask.kind-random_prototype-lora_seed-1_task-rte/metrics.json"}
    assert (out / "table.md").is_file() and len((out / "runs.csv").read_text().splitlines()) == 4
    paired = (out / "paired.csv").read_text()                     # paired statistics and the new plots carried
    assert "ProPETL − PETL,minilm,rte,lora" in paired and "learned − random,minilm,rte,lora" in paired
    assert (out / "mask_ablation.png").stat().st_size > 1000
    assert (out / "mask_hamming.png").stat().st_size > 1000
    assert str(tmp_path) not in (out / "runs.csv").read_text()          # paths relative to the results folder


def write_predictions(folder: Path, task: str, predictions, labels, num_labels: int) -> None:
    log.write_predictions(folder / "predictions.npz", {task: (np.asarray(predictions), np.asarray(labels))},
                          {task: num_labels})


def test_the_report_flags_a_constant_predictor_and_only_it(tmp_path):
    """One class in >= 99% of the test predictions (classification) or a prediction std < 5% of the labels'
    (regression) is flagged in runs.csv and table.md; a run that kept no predictions.npz is not checked."""
    labels = np.array([0, 1] * 100)
    rng = np.random.default_rng(0)
    scores = rng.uniform(0, 5, 200).astype(np.float32)
    cases = {          # name: (task, predictions, labels, num labels, runs.csv's mark)
        "constant": ("rte", np.r_[np.zeros(198, int), 1, 1], labels, 2, "yes"),            # 99.0% class 0
        "varied": ("rte", np.r_[np.zeros(197, int), 1, 1, 1], labels, 2, "no"),            # 98.5%
        "flat": ("stsb", 2.5 + 0.04 * (scores - scores.mean()), scores, 1, "yes"),         # std ratio 0.04
        "graded": ("stsb", 2.5 + 0.06 * (scores - scores.mean()), scores, 1, "no"),
    }
    for seed, (name, (task, predictions, truth, num_labels, _)) in enumerate(cases.items()):
        test = {"accuracy": 0.5} if task == "rte" else {"pearson": 0.5, "spearman": 0.5}
        write_predictions(write_run(tmp_path, name, task, "petl", "lora", seed, test), task, predictions, truth,
                          num_labels)
    write_run(tmp_path, "old", "rte", "petl", "lora", 9, {"accuracy": 0.5})         # before runs kept predictions
    written = report.build([tmp_path], tmp_path / "out")
    with written["csv"].open() as f:
        rows = {Path(r["path"]).parent.name: r for r in csv.DictReader(f)}
    assert {name: rows[name]["constant_predictions"] for name in rows} == {
        **{name: case[-1] for name, case in cases.items()}, "old": "no predictions kept"}
    assert float(rows["constant"]["majority_prediction_share"]) == pytest.approx(0.99)
    assert float(rows["flat"]["prediction_std_ratio"]) == pytest.approx(0.04, rel=1e-4)
    assert rows["old"]["majority_prediction_share"] == rows["old"]["prediction_std_ratio"] == ""
    table = written["table"].read_text()
    assert "4 of 5 runs kept their test predictions" in table and "the other 1: no predictions kept" in table
    assert "Flagged (2): RTE petl LoRA seed 0 (no experiment); STS-B P/S petl LoRA seed 2 (no experiment)." in table


@pytest.mark.parametrize("content", ["garbage", "cut off", "one array"])
def test_an_unreadable_predictions_file_is_one_line(tmp_path, content):
    folder = write_run(tmp_path, "a", "rte", "petl", "lora", 1, {"accuracy": 0.5})
    write_predictions(folder, "rte", [0, 1], [0, 1], 2)
    written = (folder / "predictions.npz").read_bytes()
    one_array = io.BytesIO()
    np.save(one_array, np.arange(3))
    (folder / "predictions.npz").write_bytes({"garbage": b"garbage", "cut off": written[:100],
                                              "one array": one_array.getvalue()}[content])
    with pytest.raises(ValueError, match="cannot read .*predictions.npz") as error:
        report.build([tmp_path], tmp_path / "out")
    assert "\n" not in str(error.value)


def test_runs_without_predictions_are_not_checked_and_varied_ones_not_flagged(tmp_path):
    write_run(tmp_path, "a", "rte", "petl", "lora", 1, {"accuracy": 0.5})
    table = report.build([tmp_path], tmp_path / "out")["table"].read_text()
    assert "Flagged: none; no run here kept its predictions, so none could be checked." in table
    write_predictions(write_run(tmp_path, "b", "rte", "petl", "lora", 2, {"accuracy": 0.5}), "rte", [0, 1], [0, 1], 2)
    assert "\nFlagged: none.\n" in report.build([tmp_path], tmp_path / "out")["table"].read_text()


# ----------------------------------------------------------------------------- trustworthy tables

def test_paired_t_interval_over_seeds_has_the_known_answer():
    """Differences [1, 2, 3]: mean 2, sd 1, n 3, t(0.975, 2) = 4.302653 -> 2 ± 2.484, which includes 0."""
    result = report.paired_interval([1.0, 2.0, 3.0])
    assert result["n"] == 3 and result["mean_diff"] == pytest.approx(2.0) and result["sd_diff"] == pytest.approx(1.0)
    assert result["t_crit"] == pytest.approx(4.302653, abs=1e-6)
    assert result["half_width"] == pytest.approx(2.484, abs=1e-3)
    assert (result["ci_low"], result["ci_high"]) == (pytest.approx(-0.484, abs=1e-3), pytest.approx(4.484, abs=1e-3))
    assert result["excludes_zero"] is False
    shifted = report.paired_interval([2.0, 3.0, 4.0])                          # 3 ± 2.484: [0.516, 5.484]
    assert shifted["ci_low"] == pytest.approx(0.516, abs=1e-3) and shifted["excludes_zero"] is True
    assert report.paired_interval([-4.0, -3.0, -2.0])["excludes_zero"] is True
    one = report.paired_interval([1.5])                                        # n < 2: the mean, no interval
    assert one["mean_diff"] == 1.5 and one["ci_low"] is None and one["excludes_zero"] is None


def test_pairs_are_made_by_seed(tmp_path):
    """A seed present on one side only is left out; the differences are taken seed by seed, not sorted."""
    for seed, (plain, pro) in {42: (0.80, 0.81), 43: (0.70, 0.72), 44: (0.90, 0.93)}.items():
        write_run(tmp_path, f"p{seed}", "sst2", "petl", "lora", seed, {"accuracy": plain})
        write_run(tmp_path, f"q{seed}", "sst2", "propetl", "lora", seed, {"accuracy": pro}, sparsity=0.9)
    write_run(tmp_path, "p45", "sst2", "petl", "lora", 45, {"accuracy": 0.10})
    runs = report.load_runs([tmp_path])
    [result] = report.paired_comparisons(runs, runs)
    assert result["comparison"] == "ProPETL − PETL" and result["seeds"] == [42, 43, 44] and result["n"] == 3
    assert result["mean_diff"] == pytest.approx(2.0) and result["half_width"] == pytest.approx(2.484, abs=1e-3)
    assert result["mean_b"] == pytest.approx(80.0)                              # seed 45 not in the mean either


SEEDS = (42, 43, 44)
TRIVIAL = {"sst2": {"rule": "majority class 1 of train (55.8%)", "test": {"accuracy": 0.5092}, "glue_score": 0.5092},
           "stsb": {"rule": "mean train score 2.700", "test": {"pearson": 0.0, "spearman": 0.0, "combined": 0.0},
                    "glue_score": 0.0}}


def _test_numbers(task: str, value: float) -> dict:
    return {"accuracy": value} if task == "sst2" else {"pearson": value, "spearman": value - 0.02}


def write_reproduction(root: Path) -> Path:
    """A cpu-profile-shaped reproduction on SST-2 and STS-B, 3 seeds: table1 (PETL, ProPETL x LoRA and
    adapter, HF PEFT LoRA, fine-tuning), a sparsity sweep of ProPETL-LoRA at 0.5/0.7 whose 0.9 point is
    table1's (plus one stray duplicate of a table1 run), a mask ablation (random, none) at 0.9."""
    for task in ("sst2", "stsb"):
        common = {"trivial": TRIVIAL[task]}
        for i, seed in enumerate(SEEDS):
            name = f"seed-{seed}_task-{task}"
            write_run(root / "table1", f"petl-lora_{name}", task, "petl", "lora", seed, _test_numbers(task, 0.80 + i / 100), **common)
            write_run(root / "table1", f"propetl-lora_{name}", task, "propetl", "lora", seed,   # differences 1, 2, 3
                      _test_numbers(task, 0.81 + 2 * i / 100), sparsity=0.9, **common)
            write_run(root / "table1", f"petl-adapter_{name}", task, "petl", "adapter", seed, _test_numbers(task, 0.80), **common)
            write_run(root / "table1", f"propetl-adapter_{name}", task, "propetl", "adapter", seed,   # 2, 3, 4
                      _test_numbers(task, 0.82 + i / 100), **common)
            write_run(root / "table1", f"peft-lora_{name}", task, "peft", "lora", seed, _test_numbers(task, 0.79 + i / 100), **common)
            for s in (0.5, 0.7):
                write_run(root / "sparsity_sweep", f"s-{s}_{name}", task, "propetl", "lora", seed,
                          _test_numbers(task, 0.70 + s / 10), sparsity=s, **common)
            for kind, value in (("random", 0.75), ("none", 0.60)):
                write_run(root / "ablation_masks", f"{kind}_{name}", task, "propetl", "lora", seed,
                          _test_numbers(task, value + i / 100), sparsity=0.9, kind=kind, **common)
        write_run(root / "table1", f"finetune_{task}", task, "finetune", "adapter", 42, _test_numbers(task, 0.9), **common)
    # the sweep repeating table1's ProPETL-LoRA sst2 seed 42 at 0.9 (a stray extra run): counted once, table1's copy
    write_run(root / "sparsity_sweep", "s-0.9_seed-42_task-sst2", "sst2", "propetl", "lora", 42, {"accuracy": 0.10},
              sparsity=0.9, trivial=TRIVIAL["sst2"])
    return root


def _table_row(table: str, label: str) -> str:
    return next(line for line in table.splitlines() if line.startswith(f"| {label} |"))


def _paired_rows(out: Path) -> list[dict]:
    return list(csv.DictReader((out / "paired.csv").open()))


def test_report_of_a_reproduction_trivial_peft_paired_sweep_and_plots(tmp_path):
    out = tmp_path / "tables"
    written = report.build([write_reproduction(tmp_path / "runs")], out, "cpu")
    table = (out / "table.md").read_text()
    table1 = table.split("## Paired")[0]
    # the trivial baseline: computed from `trivial`, no run counted, its rule stated
    trivial = _table_row(table1, "Trivial baseline (majority / mean)")
    assert "| 50.92 | 0.00/0.00 |" in trivial and trivial.endswith("| computed |")
    assert "majority class 1 of train (55.8%)" in table1 and "mean train score 2.700" in table1
    # HF PEFT's LoRA right after our LoRA; Table 1 holds table1's runs only (no sweep, no ablation rows)
    labels = [line.split(" | ")[0][2:] for line in table1.splitlines() if line.startswith("| ") and "---" not in line]
    assert labels.index("LoRA (HF PEFT)") == labels.index("LoRA") + 1
    assert _table_row(table1, "ProPETL-LoRA").split(" | ")[-1] == "6 |"
    assert not any("s=" in label or "random" in label or "none" in label for label in labels)
    # *paper* rows kept: the task yamls' numbers, their average over all 11
    assert _table_row(table1, "*ProPETL-LoRA (paper)*").endswith("| 94.00 | 90.48/90.47 | 84.53 (11) | 3 seeds |")
    # paired: ProPETL − PETL differences 1, 2, 3 (LoRA: no) and 2, 3, 4 (adapter: yes), HF PEFT, the ablation
    rows = {(r["comparison"], r["task"], r["prototype"], r["metric"]): r for r in _paired_rows(out)}
    lora = rows[("ProPETL − PETL", "sst2", "lora", "glue_score")]
    assert (lora["n"], lora["seeds"], lora["excludes_zero"]) == ("3", "42 43 44", "no")
    assert float(lora["mean_diff"]) == pytest.approx(2.0, abs=1e-3) and float(lora["ci_low"]) == pytest.approx(-0.484, abs=1e-3)
    assert float(lora["ci_high"]) == pytest.approx(4.484, abs=1e-3)
    adapter = rows[("ProPETL − PETL", "sst2", "adapter", "glue_score")]
    assert float(adapter["ci_low"]) == pytest.approx(0.516, abs=1e-3) and adapter["excludes_zero"] == "yes"
    assert float(rows[("LoRA (HF PEFT) − LoRA", "sst2", "lora", "glue_score")]["mean_diff"]) == pytest.approx(-1.0)
    assert float(rows[("learned − random", "sst2", "lora", "glue_score")]["mean_diff"]) == pytest.approx(83.0 - 76.0)
    assert rows[("learned − none", "stsb", "lora", "glue_score")]["n"] == "3"
    assert {m for (_, task, _, m) in rows if task == "stsb"} == {"glue_score", "pearson", "spearman"}
    assert "paired t-interval over seeds" in table
    assert "| ProPETL − PETL | SST-2 | LoRA | 0.9 | GLUE score | 3 | 42 43 44 | 83.00 | 81.00 | +2.00 | 2.48 | [-0.48, +4.48] | no |" in table
    # the sweep pools table1's ProPETL-LoRA at 0.9 (3 seeds, the stray sweep duplicate counted once, table1's kept)
    sweep = table.split("## Sparsity sweep")[1].split("## Mask ablation")[0]
    assert "| SST-2 | ProPETL-LoRA | 75.00±0.00 (n=3) | 77.00±0.00 (n=3) | 83.00±2.00 (n=3) | 81.00±1.00 (n=3) |" in sweep
    assert "1 repeating" in table.splitlines()[2]
    ablation = table.split("## Mask ablation")[1]
    assert "| SST-2 | ProPETL-LoRA | 0.9 | 83.00±2.00 (n=3) | 76.00±1.00 (n=3) | 61.00±1.00 (n=3) |" in ablation
    # plots
    for name in ("metric_vs_storage", "sparsity_sweep", "mask_ablation"):
        assert written[name].stat().st_size > 1000
    assert len((out / "runs.csv").read_text().splitlines()) == 1 + 2 * (3 * 9 + 1) + 1


def test_a_sweep_sharing_table1_runs_keeps_the_lora_comparison(tmp_path):
    """Regression: with sweep runs at other sparsities beside table1's ProPETL-LoRA, Table 1's row used to
    become 'ProPETL-LoRA (s=0.9)' and the ProPETL − PETL table lost its LoRA line."""
    runs = tmp_path / "runs"
    for seed in SEEDS:
        write_run(runs / "table1", f"petl_{seed}", "sst2", "petl", "lora", seed, {"accuracy": 0.80})
        write_run(runs / "table1", f"propetl_{seed}", "sst2", "propetl", "lora", seed, {"accuracy": 0.82}, sparsity=0.9)
        write_run(runs / "sparsity_sweep", f"s05_{seed}", "sst2", "propetl", "lora", seed, {"accuracy": 0.7}, sparsity=0.5)
        write_run(runs / "ablation_masks", f"random_{seed}", "sst2", "propetl", "lora", seed, {"accuracy": 0.7},
                  sparsity=0.9, kind="random")
    report.build([runs], tmp_path / "out")
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| LoRA | +2.00 | 0.200 |" in table
    assert _table_row(table, "ProPETL-LoRA").endswith("| 3 |")
    assert "ProPETL-LoRA (s=" not in table.split("## Paired")[0]
    assert (tmp_path / "out" / "sparsity_sweep.png").is_file() and (tmp_path / "out" / "mask_ablation.png").is_file()


def test_distinct_runs_keep_table1s_copy(tmp_path):
    write_run(tmp_path / "sparsity_sweep", "a", "sst2", "propetl", "lora", 42, {"accuracy": 0.1}, sparsity=0.9)
    write_run(tmp_path / "table1", "b", "sst2", "propetl", "lora", 42, {"accuracy": 0.8}, sparsity=0.9)
    write_run(tmp_path / "table1", "c", "sst2", "propetl", "lora", 43, {"accuracy": 0.8}, sparsity=0.9)
    runs = report.load_runs([tmp_path])
    assert sorted(r["experiment"] for r in runs) == ["sparsity_sweep", "table1", "table1"]
    kept = report.distinct_runs(runs)
    assert len(kept) == 2 and {r["experiment"] for r in kept} == {"table1"}


def test_experiment_from_the_composed_config(tmp_path):
    folder = write_run(tmp_path / "elsewhere", "x", "sst2", "propetl", "lora", 42, {"accuracy": 0.5})
    (folder / ".hydra").mkdir()
    (folder / ".hydra" / "config.yaml").write_text("reproduce:\n  experiment: sparsity_sweep\n  profile: cpu\n")
    assert report.load_runs([tmp_path])[0]["experiment"] == "sparsity_sweep"


def test_a_task_of_your_own_is_a_yaml_away(tmp_path):
    """A task yaml in propetl-report's --config-dir, and no code, gives the task its column: the yaml's title, at its
    order; without report.paper it stays out of the paper's average. Without the folder it is still there, by name,
    after the shipped tasks."""
    rte = (REPO / "propetl" / "conf" / "task" / "rte.yaml").read_text()
    mine = re.sub(r"\n  paper: [^\n]*", "", rte.replace("name: rte", "name: mytask"))
    (tmp_path / "conf" / "task").mkdir(parents=True)
    (tmp_path / "conf" / "task" / "mytask.yaml").write_text(mine.replace("title: RTE", "title: My Task").replace(
        "order: 8", "order: 6"))                                                    # beside MNLI's 6: after it by name
    runs = tmp_path / "runs"
    for seed in (1, 2):
        write_run(runs, f"m{seed}", "mytask", "petl", "lora", seed, {"accuracy": 0.5 + seed / 10})
        write_run(runs, f"r{seed}", "rte", "petl", "lora", seed, {"accuracy": 0.6})
        write_run(runs, f"s{seed}", "stsb", "petl", "lora", seed, {"pearson": 0.8, "spearman": 0.7})

    def table(*config_dir: str) -> list[str]:
        assert command.main([str(runs), "--out", str(tmp_path / "out"), *config_dir]) == 0
        text = (tmp_path / "out" / "table.md").read_text().split("## Paired")[0]
        return [_table_row(text, "Method"), _table_row(text, "LoRA"), _table_row(text, "*ProPETL-LoRA (paper)*")]

    header, lora, paper = table("--config-dir", str(tmp_path / "conf"))
    assert header.endswith("| STS-B P/S | My Task | RTE | Avg | runs |")
    assert lora.endswith("| 80.00±0.00/70.00±0.00 | 65.00±7.07 | 60.00±0.00 | 70.00 (3 of 11) | 6 |")
    assert paper.endswith("| 90.48/90.47 | – | 63.79 | 84.53 (11) | 3 seeds |")
    assert table()[0].endswith("| STS-B P/S | RTE | mytask | Avg | runs |")


@pytest.mark.parametrize("block, message", [
    ("{title: [My, Task]}", "task mytask: report.title = ['My', 'Task'] is not a string"),
    ("{order: first}", "task mytask: report.order = first is not a number"),
    ("{paper: [1, 2]}", "task mytask: report.paper = [1, 2] is not a mapping of row label -> [numbers]"),
    ("{paper: {ProPETL-LoRA: [high]}}", "task mytask: report.paper = {'ProPETL-LoRA': ['high']} is not a mapping"),
    ("a title", "task mytask: report = a title is not a mapping of title, order, paper"),
])
def test_a_bad_report_block_is_one_line_naming_task_key_and_value(tmp_path, capsys, block, message):
    (tmp_path / "conf" / "task").mkdir(parents=True)
    (tmp_path / "conf" / "task" / "mytask.yaml").write_text(f"name: mytask\nmetrics: [accuracy]\nreport: {block}\n")
    write_run(tmp_path / "runs", "r1", "rte", "petl", "lora", 1, {"accuracy": 0.6})
    assert command.main([str(tmp_path / "runs"), "--config-dir", str(tmp_path / "conf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"propetl-report: {message}") and err.count("\n") == 1


def test_hamming_distance():
    a = np.array([[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    assert pairwise_hamming(a).tolist() == [[0.0, 0.5, 0.0], [0.5, 0.0, 0.5], [0.0, 0.5, 0.0]]


def test_reports_import_neither_torch_nor_transformers():
    """make tables runs where torch is not installed: the report package reads masks as numpy."""
    code = "import sys, propetl.report; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
