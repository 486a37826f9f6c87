"""One schema of storage figures (propetl/storage/figures.py): the accounting computes every figure under its key, and
the summary table, the W&B summary and the report (runs.csv, table.md) show exactly the schema's; a run's checkpoint
and its accounting share what it keeps, its masks coded once per coding."""
from __future__ import annotations

import csv
import io
import json

import pytest
import torch

from propetl import report
from propetl.configs import ModelSetup
from propetl.models import backbone
from propetl.run import log
from propetl.storage import accounting, checkpoint, figures, mask_coding


def run_figures(model, cfg, folder, head_names, share=True):
    """The figures as train.py computes them: what the model keeps worked out once, for the accounting and the
    checkpoint (share=False: each works it out on its own)."""
    keep = accounting.kept(model, cfg.method.name) if share else None
    out = accounting.account(model, ModelSetup.from_config(cfg), accounting.backbone_params(model, head_names), keep)
    checkpoint.save_checkpoint(model, ModelSetup.from_config(cfg), folder, keep)
    return {**out, **checkpoint.file_figures(folder, out)}


def one_task(tiny_cfg, folder, share=True):
    cfg = tiny_cfg("method=propetl", "prototype=lora", "prototype.r=4")
    torch.manual_seed(0)
    model = backbone.build(ModelSetup.from_config(cfg), 2)
    return run_figures(model, cfg, folder, backbone.head_parameter_names(model), share)


def several_tasks(tiny_cfg, folder, share=True):
    cfg = tiny_cfg("mode=multitask", "tasks=[rte,stsb]", "prototype=lora", "prototype.r=4")
    torch.manual_seed(0)
    model = backbone.MultiTaskModel(ModelSetup.from_config(cfg), ["rte", "stsb"], [2, 1], task_masks=True)
    return run_figures(model, cfg, folder, model.head_names(), share)


@pytest.mark.parametrize(
    "make,shown,as_written",
    [(one_task, figures.ONE_TASK, figures.AS_WRITTEN), (several_tasks, figures.SEVERAL_TASKS, figures.SEVERAL_AS_WRITTEN)],
)
def test_the_accounting_the_summary_table_and_wandb_read_the_schema(tiny_cfg, tmp_path, make, shown, as_written):
    storage = make(tiny_cfg, tmp_path / "checkpoint")
    keys = [f.key for f in (*shown, *as_written)] + [f.with_head for f in shown if f.with_head] + list(figures.WRITTEN_AS)
    assert [k for k in keys if k not in storage] == []                   # the accounting names its figures as the schema
    assert {f"storage/{k}" for k in keys} <= set(log.wandb_storage(storage))
    table = log.storage_lines(storage)
    rows = table[2 : 2 + len(shown)]                                     # the summary's rows, in the schema's order
    assert [(r[:28].strip(), r[28:42].strip()) for r in rows] == [(f.label, log._fmt(storage[f.key])) for f in shown]
    assert [r[42:].strip() for r in rows] == [log._fmt(storage[f.with_head]) if f.with_head else "" for f in shown]
    written = table[len(shown) + 4 :]                                    # after "as written: ..."
    assert [(r[:42].strip(), r[42:].strip()) for r in written] == [(f.label, log._fmt(storage[f.key])) for f in as_written]


def test_the_report_reads_the_schema(tiny_cfg, tmp_path):
    storage = one_task(tiny_cfg, tmp_path / "checkpoint")
    metrics = {"task": "rte", "model": "tiny", "method": "propetl", "prototype": "lora", "mask_kind": "learned",
               "mask_sparsity": 0.5, "seed": 1, "test": {"accuracy": 0.5}, "glue_score": 0.5, "storage": storage}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    runs = report.load_runs([tmp_path])
    header, row = list(csv.reader(io.StringIO(report.runs_csv(runs, tmp_path))))
    columns = header[header.index(figures.RUNS_CSV[0]) : header.index(figures.RUNS_CSV[-1]) + 1]
    assert columns == list(figures.RUNS_CSV)
    assert [f.key for f in figures.ONE_TASK] == columns[: len(figures.ONE_TASK)]
    assert row[header.index("storage_bytes")] == str(storage["storage_bytes"])
    coding_header = report.coding_table(runs).splitlines()[0].strip("|").split("|")
    assert [c.strip() for c in coding_header[5:-1]] == [f.column for f in figures.AS_WRITTEN]


def test_a_figure_added_to_the_schema_shows_in_the_summary(tiny_cfg, tmp_path, monkeypatch):
    storage = one_task(tiny_cfg, tmp_path / "checkpoint")
    monkeypatch.setattr(figures, "ONE_TASK", (*figures.ONE_TASK, figures.Figure("mask_ones", "mask ones")))
    (row,) = [line for line in log.storage_lines(storage) if line.startswith("mask ones")]
    assert row.split() == ["mask", "ones", f"{storage['mask_ones']:,}"]


def test_a_run_codes_each_masks_file_once_per_coding(tiny_cfg, tmp_path, monkeypatch):
    """The accounting counts every coding's bytes and the checkpoint writes storage.mask_coding's: one encode per
    masks file and coding, and the same files as a checkpoint that works out what to keep on its own."""
    several_tasks(tiny_cfg, tmp_path / "alone", share=False)             # shared/ + two tasks' mask rows: 3 files
    calls = []
    encode = mask_coding.encode
    monkeypatch.setattr(mask_coding, "encode", lambda masks, coding: calls.append(coding) or encode(masks, coding))
    several_tasks(tiny_cfg, tmp_path / "run")
    assert sorted(calls) == sorted(mask_coding.CODINGS * 3)
    written = lambda folder: {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*.safetensors"))}
    assert written(tmp_path / "run") == written(tmp_path / "alone")
