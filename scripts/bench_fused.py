"""Fused-runs benchmark (issue 28): K runs of one prototype trained as the runner fuses them (hydra/launcher=fused:
propetl/run/fused.py's stacked_forward, one vmap over the shared frozen backbone, each run's keyed dropout, then each
run's own clipping and AdamW step), against the same K runs made one after another, on one device.

    python scripts/bench_fused.py                                   # CPU: K = 1, 3, 9, 18 at batch 32, ProPETL-LoRA
    python scripts/bench_fused.py --prototype adapter --json results/bench_fused_cpu_adapter.json
    python scripts/bench_fused.py --device cuda --batch 128 --ks 1 3 9 18 36 --json results/bench_fused_gpu.json

Every run is the runner's own one-task model (backbone.MultiTaskModel, method=propetl, the prototype's settings), built
from its own seed, with the runner's optimizer (loop.make_optimizer). A fused step: every run's batch of B rows of
random tokens, one stacked_forward over the K runs, the sum of their losses backward, then each run's
loop.Optimization.apply (its clipping and step). Baseline: one run's ordinary step (loop.train_step), K times over, is
what K separate runs cost in one process. Printed: seconds a step, steps/s per run, tokens/s in all, speed-up over K
separate runs. A check first: 3 fused runs (fp32, dropout off) against each run alone: the largest loss difference
over 3 steps. Times only; no assertion on them.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import nn

import propetl  # noqa: F401
from propetl.configs import ModelSetup, compose
from propetl.models import backbone
from propetl.run import fused, keyed_dropout, loop


def overhead_model(folder: str) -> list[str]:
    """A random BERT shaped as MiniLM (6 layers, 12 heads, its vocabulary) but 24 wide, saved in `folder`: a step of
    it does MiniLM's every operation with next to no arithmetic. Returns the overrides that load it."""
    from transformers import BertConfig, BertModel

    config = BertConfig(hidden_size=24, num_hidden_layers=6, num_attention_heads=12, intermediate_size=48)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    return [f"model.name_or_path={folder}", "model.name=overhead", "model.hidden_size=24", "model.num_layers=6"]


def run_models(k: int, args, device, dropout: bool = True, seeds: list[int] | None = None) -> list:
    """K one-task runner models (seeds 0..K-1 unless given) with their optimizers: [(model, Optimization)]."""
    cfg = compose([f"prototype={args.prototype}", "method=propetl", "model=minilm", *getattr(args, "model_overrides", [])])
    out = []
    for seed in seeds if seeds is not None else range(k):
        torch.manual_seed(seed)
        model = backbone.MultiTaskModel(ModelSetup.from_config(cfg), ["bench"], [2], task_masks=False).to(device)
        if not dropout:
            for module in model.modules():
                if isinstance(module, nn.Dropout):
                    module.p = 0.0
        model.train()
        optimizer, scheduler = loop.make_optimizer(model, cfg, model.head_names(), total_steps=1000)
        out.append((model, loop.Optimization(optimizer, scheduler, torch.amp.GradScaler(device.type, enabled=False))))
    return out


def batch_for(batch: int, length: int, device, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1000, 30000, (batch, length), generator=generator).to(device),
            "attention_mask": torch.ones(batch, length, dtype=torch.long, device=device),
            "labels": torch.randint(0, 2, (batch,), generator=generator).to(device)}


def fused_step_fn(k: int, args, device, batches: list[dict] | None = None, seeds=None, dropout=True, precision=None):
    """One optimizer step of K fused runs, each on its own batch (random tokens unless given)."""
    runs = run_models(k, args, device, dropout, seeds)
    models = [model for model, _ in runs]
    varying = fused.varying_names(models) if k > 1 else None
    batches = batches or [batch_for(args.batch, args.length, device, seed=i) for i in range(k)]

    steps = [0]

    def step() -> torch.Tensor:
        keys = [keyed_dropout.run_key(seed, steps[0]) for seed in (seeds if seeds is not None else range(k))]
        steps[0] += 1
        losses, _ = fused.stacked_forward(
            models, batches, varying, lambda: loop.autocast(device, precision or args.precision), keys
        )
        losses.sum().backward()
        for _, optimization in runs:
            optimization.apply(1.0)
        return losses.detach()
    return step


def runner_step_fn(args, device):
    """One run's ordinary step (loop.train_step) at batch B."""
    ((model, optimization),) = run_models(1, args, device)
    data = batch_for(args.batch, args.length, device)
    return lambda: loop.train_step(model, data, optimization, device, args.precision, 1.0)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def seconds_per_step(step, device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def check_exact(args, device, steps: int = 3, batch: int = 8) -> float:
    """Largest |loss difference| over `steps` steps between 3 fused runs and each run alone (fp32, no dropout)."""
    batches = [batch_for(batch, args.length, device, seed=i) for i in range(3)]
    together_step = fused_step_fn(3, args, device, batches, seeds=[0, 1, 2], dropout=False, precision="fp32")
    together = torch.stack([together_step() for _ in range(steps)])                     # [steps, 3]
    worst = 0.0
    for run in range(3):
        alone = fused_step_fn(1, args, device, [batches[run]], seeds=[run], dropout=False, precision="fp32")
        losses = torch.stack([alone() for _ in range(steps)])[:, 0]
        worst = max(worst, float((losses - together[:, run]).abs().max()))
    return worst


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 3, 9, 18])
    parser.add_argument("--prototype", default="lora", help="lora | adapter | prefix")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=64, help="tokens a row (MRPC pairs: ~50)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default=None, help="fp32 | bf16 (default: bf16 on cuda, fp32 on cpu)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--overhead", action="store_true",
                        help="MiniLM's structure 24 wide (overhead_model): what a step costs besides its arithmetic, "
                             "Python, dispatch and vmap (use a small --batch and --length)")
    args = parser.parse_args()
    args.model_overrides = []
    if args.overhead:
        import tempfile

        args.model_overrides = overhead_model(tempfile.mkdtemp(prefix="bench-overhead-"))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    worst = check_exact(args, device)
    print(f"check: 3 fused runs vs each alone, fp32, no dropout, 3 steps: largest loss difference {worst:.2e}",
          flush=True)
    runner = seconds_per_step(runner_step_fn(args, device), device, args.warmup, args.repeats)
    print(f"runner (method=propetl prototype={args.prototype}), batch {args.batch} x {args.length}: {runner:.4f} s a step",
          flush=True)
    rows = []
    for k in args.ks:
        seconds = seconds_per_step(fused_step_fn(k, args, device), device, args.warmup, args.repeats)
        row = {"k": k, "fused_step_s": seconds, "steps_per_s_per_run": 1 / seconds,
               "tokens_per_s": k * args.batch * args.length / seconds,
               "separate_s": k * runner, "speedup_vs_separate": k * runner / seconds}
        rows.append(row)
        print(f"K={k:>3}: fused step {seconds:.4f} s, {row['steps_per_s_per_run']:.1f} steps/s per run, "
              f"{row['tokens_per_s']:,.0f} tokens/s in all, {row['speedup_vs_separate']:.2f}x K separate runs",
              flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    model = "MiniLM's structure, 24 wide (--overhead)" if args.overhead else "MiniLM"
    print(f"\n{model}, prototype {args.prototype}, device {name}, batch {args.batch} x {args.length} tokens a run, {args.precision}, "
          f"median of {args.repeats} steps after {args.warmup}")
    print(f"{'K':>4}{'fused step s':>14}{'steps/s a run':>15}{'tokens/s':>12}{'K separate s':>14}{'speed-up':>10}")
    for r in rows:
        print(f"{r['k']:>4}{r['fused_step_s']:>14.4f}{r['steps_per_s_per_run']:>15.1f}{r['tokens_per_s']:>12,.0f}"
              f"{r['separate_s']:>14.4f}{r['speedup_vs_separate']:>10.2f}")
    if args.json:
        from pathlib import Path

        from propetl.storage.files import atomic_write_text
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(args.json), json.dumps({
            "args": vars(args), "device": name, "check_max_loss_difference": worst,
            "runner_step_s": runner, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
