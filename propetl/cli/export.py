"""propetl-export CHECKPOINT OUT --format hf|peft: a run's checkpoint as a folder plain transformers or PEFT loads.
  hf    LoRA updates (ProPETL: masked per layer) folded into W_q / W_v, save_pretrained plus tokenizer; also petl,
        finetune and peft (merged by PEFT).
  peft  a PEFT adapter with the head as modules_to_save: method=peft's tuner, or propetl / petl LoRA's (masked) A, B.
Adapters and prefixes are refused in one line (exit 2), and so is every T5 checkpoint (model.family=t5). OUT is written by files.write_output_folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

FORMATS = ("hf", "peft")
RUN_SIGNS = ("metrics.json", ".hydra", "train.log", "resume")  # a checkpoint's parent holding one is its run folder


class ExportError(Exception):
    """One-line, user-facing error about an export."""


def refusal(config: dict, output_format: str) -> str | None:
    """Why a checkpoint (its propetl.json) cannot be written in `output_format` without changing its logits."""
    from propetl import methods

    method, prototype = config["method"]["name"], config["prototype"]["name"]
    if config["model"].get("family") == "t5":
        return (
            "a T5 checkpoint (model.family=t5): its adapters sit after the feed-forward sub-layers with a nonlinearity "
            "between their two projections, so they cannot be merged into T5's weights, and no transformers or PEFT "
            "format holds ProPETL's masks; load it with propetl.load_propetl(T5ForConditionalGeneration, folder)"
        )
    if method == "peft":  # PEFT merges its tuner (hf) and writes its own adapter (peft): every tuner
        return None  # of conf/peft/ merges (tests/test_peft_zoo.py)
    if method == "finetune":
        why = "method=finetune changed every backbone weight, which a LoRA adapter cannot hold; use --format hf"
        return None if output_format == "hf" else why
    reason = methods.not_foldable(prototype)
    return f"{reason}; --format {output_format} would give other logits" if reason else None


def lora_pairs(model, cfg) -> dict[tuple[int, str], tuple]:
    """(layer, target) -> that layer's (A [r, in], B [out, r]) as our LoRA computes with them (ProPETL: masked)."""
    from propetl import methods
    from propetl.models.backbone import encoder_layers

    layers, targets = encoder_layers(model), list(cfg.prototype.targets)
    weights = methods.petl_weights(model)
    assert weights is not None  # method propetl or petl: the only ones that reach here (peft, finetune: above)
    per_layer = weights.per_layer()  # name -> [L, *shape]
    return {(i, t): (per_layer[f"{t}_A"][i], per_layer[f"{t}_B"][i]) for i in range(len(layers)) for t in targets}


def write_hf(model, cfg, folder: Path) -> None:
    from propetl import methods
    from propetl.models.backbone import encoder_layers, load_tokenizer

    methods.merge(model, encoder_layers(model), cfg.prototype.name)
    model.to_transformers(cfg.model).save_pretrained(folder)
    try:
        load_tokenizer(cfg.model).save_pretrained(folder)
    except (OSError, ValueError):  # a backbone folder without a tokenizer: the weights alone
        pass


def write_peft(model, cfg, folder: Path) -> None:
    import peft
    import torch

    from propetl import methods
    from propetl.configs import PeftGroup
    from propetl.models.backbone import encoder_layers, head_module_names, head_parameter_names, load_backbone

    base = load_backbone(cfg.model, int(cfg.task.num_labels))
    trained = {model.transformers_name(n): p for n, p in model.named_parameters()}
    head = head_parameter_names(base)
    with torch.no_grad():  # the head first: modules_to_save copies it when wrapping
        for name, parameter in base.named_parameters():
            if name in head:
                parameter.copy_(trained[name])
    if methods.uses_peft(model):  # the run's own tuner, its keys moved from the encoder to the model
        tuners = methods.peft_module()
        config = tuners.make_config(PeftGroup.from_config(cfg.peft))
        inner, outer = "base_model.model.", f"base_model.model.{base.base_model_prefix}."
        state = {
            outer + k[len(inner) :] if k.startswith(inner) else k: t
            for k, t in peft.get_peft_model_state_dict(tuners.peft_model(model)).items()
        }
    else:
        p = cfg.prototype
        config = peft.LoraConfig(r=int(p.r), lora_alpha=p.alpha, lora_dropout=0.0, target_modules=list(p.targets))
    config.task_type, config.modules_to_save = "SEQ_CLS", head_module_names(base)
    adapted = peft.get_peft_model(base, config)
    if methods.uses_peft(model):  # the head's entries as wrapped (copied from the trained head above)
        peft.set_peft_model_state_dict(adapted, {**peft.get_peft_model_state_dict(adapted), **state})
    else:
        layers = encoder_layers(adapted.get_base_model())
        with torch.no_grad():
            for (index, target), (a, b) in lora_pairs(model, cfg).items():
                block: Any = layers[index]  # a transformers encoder block
                module = getattr(block.attention.self, target)
                module.lora_A["default"].weight.copy_(a)
                module.lora_B["default"].weight.copy_(b)
    adapted.save_pretrained(folder)


def export(checkpoint_dir, out, output_format: str, overwrite: bool = False) -> Path:
    """Write `checkpoint_dir` (a run's checkpoint/ folder) as `output_format` into `out`; ExportError when it cannot."""
    from propetl import methods
    from propetl.storage import checkpoint, files

    checkpoint_dir, out = Path(checkpoint_dir), Path(out)
    if output_format not in FORMATS:
        raise ExportError(f"--format {output_format} is invalid; allowed: {', '.join(FORMATS)}")
    config = checkpoint.read_checkpoint_config(checkpoint_dir)
    t5 = config["model"].get("family") == "t5"  # refused whatever its tasks (refusal)
    reason = refusal(config if t5 else checkpoint.single_task_config(config, checkpoint_dir), output_format)
    if reason:
        raise ExportError(f"{checkpoint_dir}: {reason}; nothing written")
    if output_format == "peft" and (missing := methods.peft_missing()):
        raise ExportError(missing.replace("method=peft", "--format peft"))
    source = checkpoint_dir.resolve()
    protected = {"the checkpoint": source}
    if any((source.parent / sign).exists() for sign in RUN_SIGNS):
        protected["its run folder"] = source.parent
    write = {"hf": write_hf, "peft": write_peft}[output_format]

    def build(folder: Path) -> None:  # OUT is checked before the model is loaded
        write(*checkpoint.load_checkpoint(checkpoint_dir, config), folder)

    command = f"propetl-export --format {output_format} {source}"
    return files.write_output_folder(out, build, command, protected, overwrite)


def main(argv: list[str] | None = None) -> None:
    from propetl.configs import add_config_dir_argument

    parser = argparse.ArgumentParser(
        prog="propetl-export",
        description="Write a run's checkpoint as a folder that transformers or PEFT loads.",
        epilog="example: propetl-export outputs/runs/rte/propetl-lora/<time>/checkpoint rte-hf --format hf",
    )
    checkpoint_help = "a run's checkpoint/ folder (or a save_propetl folder)"
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help=checkpoint_help)
    parser.add_argument("out", metavar="OUT", help="the folder to write")
    format_help = "hf: LoRA merged, for AutoModelForSequenceClassification; peft: a PEFT adapter"
    parser.add_argument("--format", choices=FORMATS, required=True, dest="output_format", help=format_help)
    overwrite_help = "replace OUT if it is a previous export or save (never a folder propetl did not write)"
    parser.add_argument("--overwrite", action="store_true", help=overwrite_help)
    add_config_dir_argument(parser)
    args = parser.parse_args(argv)

    from propetl.configs import ConfigError, config_dirs
    from propetl.models.backbone import ModelError
    from propetl.storage.files import CheckpointError, OutputError, WriteError

    try:
        with config_dirs(args.config_dir):
            written = export(args.checkpoint, args.out, args.output_format, args.overwrite)
    except (ExportError, CheckpointError, ModelError, OutputError, WriteError, ConfigError) as error:
        print(f"propetl-export: error: {error}", file=sys.stderr)
        sys.exit(2)
    print(written)


if __name__ == "__main__":
    main()
