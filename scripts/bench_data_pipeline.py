"""Data-pipeline benchmark: what tokenising each split once (batches.tokenise, datasets.map) saves.

    python scripts/bench_data_pipeline.py --json results/bench_data_pipeline.json

1. the pipeline alone: build STS-B's training batches (multitask.MultiTaskBatches of one task, as every run;
   batch 32, length-grouped as the cpu profile) and iterate them for `--epochs` epochs without a model;
   seconds to build, seconds an epoch;
2. a short real training run (embedded MiniLM, `--steps` steps, one thread, no selection/test cost
   counted): train_tokens / train_seconds of its metrics.json, and its wall time.
Times only; run it on the code before and after a change, on the same machine, and compare.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402

import propetl  # noqa: E402,F401
from propetl.configs import compose  # noqa: E402
from propetl.data import glue  # noqa: E402
from propetl.data.batches import PadCollator, token_lengths, tokenise  # noqa: E402
from propetl.data.multitask import MultiTaskBatches, TaskCollator  # noqa: E402
from propetl.models import backbone  # noqa: E402


def pipeline_seconds(cfg, epochs: int) -> dict:
    splits = glue.load_glue(cfg.task, glue.resolve_data_dir(cfg.data.dir), cfg.data.protocol, cfg.data.split_seed, False)
    tokenizer = backbone.load_tokenizer(cfg.model)
    started = time.perf_counter()
    tokenised = tokenise(splits["train"], tokenizer, cfg.data.max_length)
    loader = MultiTaskBatches([tokenised], [TaskCollator(PadCollator(tokenizer, True), 0)], 32, 10.0, 0,
                              [token_lengths(tokenised)])
    built = time.perf_counter() - started
    epoch_seconds, tokens = [], 0
    for _ in range(epochs):
        started = time.perf_counter()
        for batch in loader:
            tokens += int(batch["attention_mask"].sum())
        epoch_seconds.append(time.perf_counter() - started)
    return {"examples": len(splits["train"]), "batches": len(loader), "build_s": built, "epoch_s": epoch_seconds,
            "tokens_per_epoch": tokens // epochs}


def training_tokens_per_second(cfg_overrides: list[str], steps: int) -> dict:
    from propetl.run.train import train

    with tempfile.TemporaryDirectory() as folder:
        cfg = compose([*cfg_overrides, f"trainer.max_steps={steps}", "trainer.threads=1", "trainer.batch_size=32",
                       "trainer.eval_batch_size=256", "trainer.save_weights=false", "trainer.progress=false",
                       "logger.mode=disabled", "data.group_by_length=true"])
        started = time.perf_counter()
        metrics = train(cfg, Path(folder) / "run")
        wall = time.perf_counter() - started
    return {"steps": metrics["steps"], "train_tokens": metrics["train_tokens"], "train_seconds": metrics["train_seconds"],
            "tokens_per_s": metrics["train_tokens"] / metrics["train_seconds"], "run_wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="stsb")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    overrides = [f"task={args.task}", *([f"data.dir={args.data_dir}"] if args.data_dir else [])]
    result = {"args": vars(args), "pipeline": pipeline_seconds(compose(overrides), args.epochs),
              "training": training_tokens_per_second(overrides, args.steps)}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
