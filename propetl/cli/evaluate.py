"""propetl-eval: score a saved checkpoint on its task, by default after merging the masks away.

    propetl-eval outputs/runs/rte/propetl-lora/<time>/checkpoint              # test split, merged
    propetl-eval CHECKPOINT --split validation --no-merge --data-dir PATH --config-dir my_conf

Merging folds the masks into plain per-layer modules (LoRA: into the frozen weights), so inference costs what plain
PETL costs. A T5 checkpoint (model.family=t5) is scored per task by generation, unmerged. A bad --batch-size or --device (one this machine lacks) is one line before anything loads (exit 2)."""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from torch.utils.data import DataLoader

from propetl import methods
from propetl.configs import ConfigError, ModelConfig, add_config_dir_argument, config_dirs, group_option
from propetl.data import generation_eval, glue, seq2seq
from propetl.data.batches import make_loader
from propetl.models import backbone
from propetl.models.t5 import adds_task_prefix
from propetl.run import loop
from propetl.storage import checkpoint

DEVICES = "cpu, cuda, cuda:N"


def positive_batch_size(text: str) -> int:
    """--batch-size: a positive integer, else a one-line ConfigError."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(f"--batch-size {text} is invalid; allowed: a positive integer")
    return value


def available_device(text: str) -> str:
    """--device: cpu, or cuda / cuda:N where this machine has that CUDA device; else a one-line ConfigError."""
    kind, colon, index = text.partition(":")
    if text == "cpu":
        return text
    if kind != "cuda" or (colon and not (index.isascii() and index.isdigit())):
        raise ConfigError(f"--device {text} is invalid; allowed: {DEVICES}")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ConfigError(f"--device {text}: this machine has no CUDA device; allowed: cpu")
    if colon and int(index) >= count:
        allowed = ", ".join(["cpu", "cuda", *(f"cuda:{i}" for i in range(count))])
        raise ConfigError(f"--device {text}: this machine has {count} CUDA device(s); allowed: {allowed}")
    return text


def evaluate_checkpoint(
    directory, split: str = "test", merge: bool = True, data_dir=None, batch_size: int = 256, device: str = "cpu"
) -> dict:
    config = checkpoint.read_checkpoint_config(directory)
    if ModelConfig.from_config(config["model"]).text_to_text:
        return evaluate_t5(directory, config, split, data_dir, batch_size, device)
    model, saved = checkpoint.load_checkpoint(directory, config)
    if merge and saved.method.name != "finetune":
        methods.merge(model, backbone.encoder_layers(model), saved.prototype.name)
    task = group_option("task", saved.task.name)  # shipped, or on --config-dir (configs.config_dirs)
    splits = glue.load_glue(task, glue.resolve_data_dir(data_dir), saved.data.protocol, saved.data.split_seed)
    tokenizer, regression = backbone.load_tokenizer(saved.model), int(task.num_labels) == 1
    loader = make_loader(splits[split], tokenizer, saved.data.max_length, regression, batch_size)
    device = torch.device(device)  # type: ignore[assignment]  # one name: the argument, as torch reads it
    start = time.perf_counter()
    scores = loop.evaluate(model.to(device), loader, task, device, desc=split, progress=True)
    timing = {"examples": len(splits[split]), "seconds": time.perf_counter() - start}
    return {"checkpoint": str(directory), "task": task.name, "split": split, "merged": merge, **timing, **scores}


def evaluate_t5(directory, config: dict, split: str, data_dir, batch_size: int, device: str) -> dict:
    """A T5 checkpoint (model.family=t5): every task generated with its own masks (unmerged: merging folds one
    task's masks at a time) and scored as the run scores it (generation_eval; GLUE greedy, the yaml's beams else)."""
    model, saved = checkpoint.load_multitask(directory, config=config)
    tokenizer = backbone.load_tokenizer(ModelConfig.from_config(saved["model"]))
    data = saved["data"]
    model.to(torch.device(device))
    start, rows, scores = time.perf_counter(), 0, {}
    for index, name in enumerate(saved["tasks"]):
        task = group_option("task", name)  # shipped, or on --config-dir (configs.config_dirs)
        settings = seq2seq.task_settings(task, tokenizer)
        prefix = adds_task_prefix(saved["method"]["name"])  # the reference's task-name prefix (full fine-tuning)
        text = seq2seq.text_to_text_splits(
            task, glue.resolve_data_dir(data_dir), data["protocol"], data["split_seed"], add_prefix=prefix
        )
        tokens = seq2seq.tokenise(text[split], tokenizer, settings.max_source_length, settings.max_target_length[split])
        loader = DataLoader(tokens, batch_size=batch_size, collate_fn=seq2seq.Seq2SeqCollator(tokenizer))
        texts = generation_eval.generate_texts(  # task=: the model's task index (its masks)
            model, loader, tokenizer, settings.num_beams, settings.max_new_tokens, device, task=index
        )
        scores[name] = generation_eval.score_generations(name, *texts)
        rows += len(tokens)
    timing = {"examples": rows, "seconds": time.perf_counter() - start}
    return {
        "checkpoint": str(directory),
        "tasks": list(saved["tasks"]),
        "split": split,
        "merged": False,
        **timing,
        "per_task": scores,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="propetl-eval", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a run's checkpoint/ folder")
    parser.add_argument("--split", choices=("test", "validation"), default="test")
    parser.add_argument("--no-merge", dest="merge", action="store_false", help="keep the masks (slower)")
    parser.add_argument("--data-dir", default=None, help="GLUE folder (default as propetl-train)")
    parser.add_argument("--batch-size", default="256", help="a positive integer (256)")
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default_device, help=f"{DEVICES} (default: cuda if there is one)")
    add_config_dir_argument(parser)
    args = parser.parse_args(argv)
    try:
        batch_size, device = positive_batch_size(args.batch_size), available_device(args.device)
        with config_dirs(args.config_dir):
            result = evaluate_checkpoint(args.checkpoint, args.split, args.merge, args.data_dir, batch_size, device)
    except (checkpoint.CheckpointError, glue.DataError, backbone.ModelError, ConfigError) as error:
        print(f"propetl-eval: error: {error}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
