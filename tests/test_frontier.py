"""The storage–accuracy frontier (propetl/report/frontier.py, issue 25): points cheapest first, Pareto flags, the ratio
to plain LoRA's bytes, paired differences to ProPETL-Adapter by seed, PEFT tuners under their papers' names, and the
section and plot `report.build` writes; experiment=frontier composes every tuner beside Table 1."""
from __future__ import annotations

import pytest
from test_report import write_run

from propetl import report
from propetl.report.frontier import frontier_points, frontier_table, pareto
from propetl.report.runs import load_runs

# (method, prototype) -> (bytes without head, per-seed STS-B Pearson = Spearman)
METHODS = {("petl", "lora"): (600_000, [0.80, 0.82, 0.84]),
           ("propetl", "adapter"): (120_000, [0.83, 0.84, 0.88]),
           ("peft", "vera"): (47_000, [0.78, 0.81, 0.81]),
           ("peft", "fourierft"): (14_000, [0.70, 0.71, 0.75]),
           ("peft", "loha"): (300_000, [0.79, 0.80, 0.81])}


def write_frontier(root):
    for (method, prototype), (size, scores) in METHODS.items():
        for seed, score in zip((42, 43, 44), scores):
            folder = write_run(root / ("frontier" if method == "peft" else "table1"),
                               f"{method}-{prototype}-{seed}", "stsb", method, prototype, seed,
                               {"pearson": score, "spearman": score}, file_bytes=size)
            metrics = folder / "metrics.json"
            text = metrics.read_text().replace('"storage_bytes": 28', f'"storage_bytes": {size}, '
                                               f'"storage_bytes_with_head": {size + 593_000}')
            if method == "peft":              # the checkpoint keeps more than PEFT's least-storing save: not counted
                text = text.replace(f'"file_bytes": {size}', f'"file_bytes": {5 * size}')
            metrics.write_text(text.replace('"file_bytes": ', f'"file_bytes_with_head": {size + 593_000}, "file_bytes": '))
    return root


def test_pareto_keeps_the_points_nothing_beats():
    points = [(1, 5), (2, 4), (2, 6), (3, 6), (0.5, 1), (2, 6)]
    assert pareto(points) == {0, 2, 4, 5}          # (2,4) loses to (1,5), (3,6) to (2,6); equal twins both stay


def test_points_cheapest_first_with_ratios_paired_differences_and_the_front(tmp_path):
    points = frontier_points(load_runs([write_frontier(tmp_path / "runs")]))["stsb"]
    assert [p["label"] for p in points] == ["FourierFT (HF PEFT)", "VeRA (HF PEFT)", "ProPETL-Adapter",
                                            "LoHa (HF PEFT)", "LoRA"]
    assert [p["pareto"] for p in points] == [True, True, True, False, False]
    by = {p["label"]: p for p in points}
    assert by["VeRA (HF PEFT)"]["ratio_to_lora"] == pytest.approx(47_000 / 600_000)
    assert by["VeRA (HF PEFT)"]["bytes_with_head"] == pytest.approx(47_000 + 593_000)
    assert by["ProPETL-Adapter"]["score"]["mean"] == pytest.approx(85.0)
    vera = by["VeRA (HF PEFT)"]["vs_reference"]                 # differences -5, -3, -7 (x100), by seed
    assert vera["seeds"] == [42, 43, 44] and vera["mean_diff"] == pytest.approx(-5.0)
    assert vera["ci_high"] < 0 and by["ProPETL-Adapter"]["vs_reference"] is None
    table = frontier_table({"stsb": points})
    assert "| VeRA (HF PEFT) | 47.0 kB | 640.0 kB | 0.078 | 80.00±1.73 (n=3) | -5.00 [" in table
    assert "| ProPETL-Adapter | 120.0 kB | 713.0 kB | 0.200 | 85.00±2.65 (n=3) | (reference) | ◆ |" in table


def test_build_writes_the_frontier_section_and_plot(tmp_path):
    out = tmp_path / "tables"
    written = report.build([write_frontier(tmp_path / "runs")], out, "frontier")
    assert written["frontier"] == out / "frontier.png" and (out / "frontier.png").stat().st_size > 10_000
    table = (out / "table.md").read_text()
    assert "## Storage–accuracy frontier" in table and "| VeRA (HF PEFT) |" in table.split("## Paired")[0]


def test_the_frontier_experiment_sweeps_every_storage_efficient_tuner():
    from conftest import compose_cfg
    cfg = compose_cfg(["experiment=frontier", "profile=cpu"])
    from propetl.configs import compose
    grid = compose(["experiment=frontier", "profile=cpu"], with_hydra=True).hydra.sweeper.params
    assert grid["peft"].split(",") == ["vera", "vblora", "fourierft", "unilora", "ia3", "tinylora", "loha", "lokr"]
    assert grid["seed"] == "42,43,44" and grid["task"] == "stsb,sst2"
    assert cfg.method.name == "peft" and cfg.reproduce.experiment == "frontier" and cfg.trainer.head_lr == 1e-3
