"""The aggregator (scripts/make_tables.py, propetl.report) on hand-written metrics.json files."""
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from propetl import masks, report

REPO = Path(__file__).resolve().parents[1]

# One value per GLUE number for a full 8-task run: the 11-number average is checked by hand below.
FULL = {"cola": {"matthews": 0.50}, "sst2": {"accuracy": 0.90}, "mrpc": {"accuracy": 0.80, "f1": 0.86},
        "qqp": {"accuracy": 0.85, "f1": 0.81}, "stsb": {"pearson": 0.88, "spearman": 0.87},
        "mnli": {"accuracy": 0.82}, "qnli": {"accuracy": 0.89}, "rte": {"accuracy": 0.70}}


def write_run(root: Path, name: str, task: str, method: str, prototype: str, seed: int, test: dict,
              sparsity=0.5, kind="learned", file_bytes=1000):
    folder = root / name
    folder.mkdir(parents=True)
    storage = {"backbone_params": 1000, "trainable_params": 10, "stored_params": 5, "mask_entries": 64,
               "storage_bytes": 28, "file_bytes": file_bytes, "storage_percent_of_backbone": 0.5,
               "storage_ratio_to_plain_petl": 0.2 if method == "propetl" else 1.0}
    metrics = {"task": task, "model": "minilm", "method": method, "prototype": prototype, "mask_kind": kind,
               "mask_sparsity": sparsity, "seed": seed, "test": test, "storage": storage, "epochs_run": 2}
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
    save_file({"proto.w": masks.pack_bits(layer_masks)}, str(tmp_path / "masks.safetensors"),
              metadata={"shapes": json.dumps({"proto.w": [3, 4]})})
    distance = report.layer_mask_hamming(tmp_path)
    assert distance.tolist() == [[0.0, 0.5, 0.0], [0.5, 0.0, 0.5], [0.0, 0.5, 0.0]]
    assert report.plot_mask_hamming(tmp_path, tmp_path / "h.png").stat().st_size > 1000


def test_make_tables_script_writes_everything(tmp_path):
    runs = tmp_path / "runs"
    for seed in (1, 2):
        write_run(runs, f"p{seed}", "rte", "petl", "lora", seed, {"accuracy": 0.6 + seed / 100}, file_bytes=5000)
        for s in (0.5, 0.9):
            write_run(runs, f"q{seed}{s}", "rte", "propetl", "lora", seed, {"accuracy": 0.6 + s / 10}, sparsity=s)
    out = tmp_path / "tables"
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "make_tables.py"), str(runs), "--out", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert {p.name for p in out.iterdir()} == {"runs.csv", "table.md", "rows.json", "metric_vs_storage.png",
                                              "sparsity_sweep.png"}
    assert len((out / "runs.csv").read_text().splitlines()) == 1 + 6
    assert "ProPETL-LoRA (s=0.9)" in (out / "table.md").read_text()


def test_make_tables_on_an_empty_folder_fails_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "make_tables.py"), str(tmp_path), "--out",
                           str(tmp_path / "t")], capture_output=True, text=True)
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


def test_collect_results_keeps_metrics_and_mask_bits_only(tmp_path):
    """scripts/collect_results.py: the small evidence of each finished run, renamed folders, tables beside."""
    source = tmp_path / "outputs" / "table1"
    run = write_run(source, "method=propetl,prototype=lora,seed=1,task=rte", "rte", "propetl", "lora", 1,
                    {"accuracy": 0.6})
    write_run(source, "method=petl,prototype=lora,seed=1,task=rte", "rte", "petl", "lora", 1, {"accuracy": 0.5})
    (source / "unfinished").mkdir()
    (source / "unfinished" / "train.log").write_text("cut off")
    (run / "checkpoint").mkdir()
    save_file({"proto.w": masks.pack_bits(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))}, str(run / "checkpoint" / "masks.safetensors"),
              metadata={"shapes": json.dumps({"proto.w": [2, 2]})})
    for name, size in (("propetl.json", 10), ("prototype.safetensors", 5000), ("head.safetensors", 5000)):
        (run / "checkpoint" / name).write_bytes(b"x" * size)
    out = tmp_path / "results"
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "collect_results.py"), "--source",
                           str(tmp_path / "outputs"), "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    kept = {str(p.relative_to(out / "runs")) for p in (out / "runs").rglob("*") if p.is_file()}
    assert kept == {"table1/method-propetl_prototype-lora_seed-1_task-rte/metrics.json",
                    "table1/method-propetl_prototype-lora_seed-1_task-rte/checkpoint/propetl.json",
                    "table1/method-propetl_prototype-lora_seed-1_task-rte/checkpoint/masks.safetensors",
                    "table1/method-petl_prototype-lora_seed-1_task-rte/metrics.json"}
    assert (out / "table.md").is_file() and len((out / "runs.csv").read_text().splitlines()) == 3
    assert (out / "mask_hamming.png").stat().st_size > 1000
    assert str(tmp_path) not in (out / "runs.csv").read_text()          # paths relative to the results folder
