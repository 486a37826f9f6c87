"""propetl-eval: score a saved checkpoint on its task, by default after merging the masks away.

    propetl-eval outputs/runs/rte/propetl-lora/<time>/checkpoint              # test split, merged
    propetl-eval CHECKPOINT --split validation --no-merge --data-dir PATH
    propetl-eval CHECKPOINT --config-dir my_conf                              # a run of your own task

Loading rebuilds the masks exactly from their bits; merging folds them into plain per-layer modules
(LoRA: into the frozen weights), so inference costs what plain PETL (or the bare model) costs.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from propetl import checkpoint, data, loop, methods
from propetl import model as backbone
from propetl.batches import make_loader
from propetl.configs import ConfigError, config_dirs, group_option


def evaluate_checkpoint(directory, split: str = "test", merge: bool = True, data_dir=None,
                        batch_size: int = 256, device: str = "cpu") -> dict:
    model, saved = checkpoint.load_checkpoint(directory)
    if merge and saved.method.name != "finetune":
        methods.merge(model, backbone.encoder_layers(model), saved.prototype.name)
    task = group_option("task", saved.task.name)          # shipped, or on --config-dir (configs.config_dirs)
    splits = data.load_glue(task, data.resolve_data_dir(data_dir), saved.data.protocol, saved.data.split_seed)
    loader = make_loader(splits[split], backbone.load_tokenizer(saved.model), saved.data.max_length,
                         int(task.num_labels) == 1, batch_size)
    device = torch.device(device)
    start = time.perf_counter()
    scores = loop.evaluate(model.to(device), loader, task, device, desc=split, progress=True)
    return {"checkpoint": str(directory), "task": task.name, "split": split, "merged": merge,
            "examples": len(splits[split]), "seconds": time.perf_counter() - start, **scores}


def main() -> None:
    parser = argparse.ArgumentParser(prog="propetl-eval", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a run's checkpoint/ folder")
    parser.add_argument("--split", choices=("test", "validation"), default="test")
    parser.add_argument("--no-merge", dest="merge", action="store_false", help="keep the masks (slower)")
    parser.add_argument("--data-dir", default=None, help="GLUE folder (default as propetl-train)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--config-dir", action="append", default=[], metavar="DIR", help="a folder of your own "
                        "task/model/prototype configs, as given to propetl-train (repeatable)")
    args = parser.parse_args()
    try:
        with config_dirs(args.config_dir):
            result = evaluate_checkpoint(args.checkpoint, args.split, args.merge, args.data_dir, args.batch_size,
                                         args.device)
    except (checkpoint.CheckpointError, data.DataError, backbone.ModelError, ConfigError) as error:
        print(f"propetl-eval: error: {error}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
