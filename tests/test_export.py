"""propetl-export: runner checkpoints of the tiny random BERT written as `hf` (plain transformers) and `peft`
(a PEFT LoRA adapter) folders, loaded back by those libraries with the same logits (atol 1e-5); adapters
and prefixes refused in one line with nothing written."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from test_methods import build, logits, train_steps
from transformers import AutoModelForSequenceClassification

from propetl.cli import export
from propetl.configs import ModelSetup
from propetl.models import backbone
from propetl.storage import checkpoint

ATOL = 1e-5


def runner_checkpoint(tiny_cfg, tmp_path, method: str, prototype: str = "lora"):
    """A trained run's checkpoint/ folder, as propetl-train writes it, and the logits it must reproduce."""
    sizes = ["prototype.r=4"] if prototype == "lora" else []
    model, cfg = build(tiny_cfg, method, prototype, *sizes, "mask.sparsity=0.5")
    train_steps(model)
    folder = checkpoint.save_checkpoint(model, ModelSetup.from_config(cfg), tmp_path / "checkpoint")
    return folder, logits(model)


def run_export(*arguments: str) -> None:
    export.main([str(a) for a in arguments])


@pytest.mark.parametrize("method", ["propetl", "petl", "peft", "finetune"])
def test_hf_export_loads_in_plain_transformers_with_the_same_logits(tiny_cfg, tiny_model_dir, tmp_path, method):
    if method == "peft":
        pytest.importorskip("peft")
    checkpoint_dir, expected = runner_checkpoint(tiny_cfg, tmp_path, method)
    run_export(checkpoint_dir, tmp_path / "hf", "--format", "hf")
    exported = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf")
    assert type(exported).__name__ == "BertForSequenceClassification"
    torch.testing.assert_close(logits(exported), expected, atol=ATOL, rtol=0)
    bare = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir).eval()
    assert not torch.allclose(logits(bare), expected, atol=1e-3)          # the trained weights made the difference
    assert (tmp_path / "hf" / "model.safetensors").exists()


@pytest.mark.parametrize("method", ["propetl", "petl", "peft"])
def test_peft_export_loads_in_peft_with_the_same_logits(tiny_cfg, tiny_model_dir, tmp_path, method):
    peft = pytest.importorskip("peft")
    checkpoint_dir, expected = runner_checkpoint(tiny_cfg, tmp_path, method)
    run_export(checkpoint_dir, tmp_path / "peft", "--format", "peft")
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "peft")
    torch.testing.assert_close(logits(adapted), expected, atol=ATOL, rtol=0)
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 6)
    assert set(config["target_modules"]) == {"query", "value"}
    assert {"classifier", "bert.pooler"} <= set(config["modules_to_save"])


@pytest.mark.parametrize("output_format", export.FORMATS)
@pytest.mark.parametrize("prototype", ["adapter", "prefix"])
def test_adapters_and_prefixes_are_refused_in_one_line_with_nothing_written(tiny_cfg, tmp_path, capsys, prototype,
                                                                          output_format):
    checkpoint_dir, _ = runner_checkpoint(tiny_cfg, tmp_path, "propetl", prototype)
    before = set(tmp_path.iterdir())
    with pytest.raises(SystemExit) as stop:
        run_export(checkpoint_dir, tmp_path / "out", "--format", output_format)
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and f"prototype={prototype} cannot be folded into BERT's weights" in error
    assert set(tmp_path.iterdir()) == before                                # no OUT, no temporary folder


def test_finetune_to_peft_is_refused_an_empty_out_used_and_a_previous_export_kept(tiny_cfg, tmp_path, capsys):
    checkpoint_dir, _ = runner_checkpoint(tiny_cfg, tmp_path, "finetune")
    with pytest.raises(SystemExit) as stop:
        run_export(checkpoint_dir, tmp_path / "out", "--format", "peft")
    assert stop.value.code == 2 and "use --format hf" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    (tmp_path / "out").mkdir()                                              # an empty folder holds nothing to lose
    run_export(checkpoint_dir, tmp_path / "out", "--format", "hf")
    assert (tmp_path / "out" / "model.safetensors").exists()
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run_export(checkpoint_dir, tmp_path / "out", "--format", "hf")
    assert "exists (a previous export or save); choose another OUT or pass --overwrite" in capsys.readouterr().err


def test_the_command_line_answers_help_without_loading_torch():
    code = "import sys; from propetl.cli import export; sys.argv = ['propetl-export', '--help']\n" \
           "try:\n    export.main()\nexcept SystemExit:\n    print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "--format {hf,peft}" in result.stdout and result.stdout.strip().endswith("False")
