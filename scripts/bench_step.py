"""Step-time benchmark: one training step of method=propetl against method=petl for each prototype,
on the same model and the same batch, in one process; then inference after merging.

    python scripts/bench_step.py                       # embedded MiniLM, batch 32 x 128 tokens, CPU
    python scripts/bench_step.py --batch 128 --device cuda --json results/bench.json

Both models are built first and timed in alternation (petl step, propetl step, ...), so load on a
shared machine falls on both arms. Prints a table of median times and the propetl/petl ratios.
Times only; no assertion on them.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import propetl  # noqa: E402,F401
from propetl import methods  # noqa: E402
from propetl.configs import ModelSetup, compose  # noqa: E402
from propetl.models import backbone  # noqa: E402
from propetl.run.loop import make_optimizer  # noqa: E402


def make_batch(cfg, batch: int, length: int, device) -> dict:
    generator = torch.Generator().manual_seed(0)
    vocab = 30000
    return {"input_ids": torch.randint(1000, vocab, (batch, length), generator=generator).to(device),
            "attention_mask": torch.ones(batch, length, dtype=torch.long, device=device),
            "labels": torch.randint(0, 2, (batch,), generator=generator).to(device)}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_pair(fns, device, warmup: int, repeats: int) -> list[float]:
    """Median seconds of each function, timed in alternation (a, b, a, b, ...) so that a change in
    machine load during the benchmark falls on both arms alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    sync(device)
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times):
            start = time.perf_counter()
            fn()
            sync(device)
            out.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def build(prototype: str, method: str, args, device):
    """(model, train_step(), merge_and_infer_fn()) for one method on the shared batch."""
    cfg = compose([f"prototype={prototype}", f"method={method}", f"model={args.model}"])
    torch.manual_seed(0)
    model = backbone.build(ModelSetup.from_config(cfg), 2).to(device)
    heads = backbone.head_parameter_names(model)
    optimizer, _ = make_optimizer(model, cfg, heads, total_steps=1000)
    batch = make_batch(cfg, args.batch, args.length, device)

    def train_step():
        model.train()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def merged_inference():
        methods.merge(model, backbone.encoder_layers(model), prototype)
        model.eval()
        inputs = {k: v for k, v in batch.items() if k != "labels"}

        def infer():
            with torch.no_grad():
                model(**inputs)
        return infer

    return train_step, merged_inference


def bench(prototype: str, args, device) -> dict:
    """petl and propetl of one prototype: training steps, then inference after merging, interleaved."""
    petl_step, petl_merge = build(prototype, "petl", args, device)
    pro_step, pro_merge = build(prototype, "propetl", args, device)
    petl_s, pro_s = time_pair([petl_step, pro_step], device, args.warmup, args.repeats)
    petl_i, pro_i = time_pair([petl_merge(), pro_merge()], device, args.warmup, args.repeats)
    return {"prototype": prototype,
            "petl": {"train_step_s": petl_s, "inference_merged_s": petl_i},
            "propetl": {"train_step_s": pro_s, "inference_merged_s": pro_i},
            "train_step_ratio": pro_s / petl_s, "inference_ratio": pro_i / petl_i}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    for prototype in ("adapter", "lora", "prefix"):
        rows.append(bench(prototype, args, device))
    print(f"model {args.model}, batch {args.batch} x {args.length} tokens, device {device}, "
          f"threads {torch.get_num_threads()}, median of {args.repeats}, petl and propetl timed in alternation")
    print(f"{'prototype':<10}{'petl step s':>13}{'propetl step s':>16}{'ratio':>8}"
          f"{'petl infer s':>14}{'propetl infer s':>17}{'ratio':>8}")
    for r in rows:
        print(f"{r['prototype']:<10}{r['petl']['train_step_s']:>13.3f}{r['propetl']['train_step_s']:>16.3f}"
              f"{r['train_step_ratio']:>8.3f}{r['petl']['inference_merged_s']:>14.3f}"
              f"{r['propetl']['inference_merged_s']:>17.3f}{r['inference_ratio']:>8.3f}")
    if args.json:
        from pathlib import Path

        from propetl.storage.files import atomic_write_text
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(args.json), json.dumps({"args": vars(args), "device": str(device),
                                                       "threads": torch.get_num_threads(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
