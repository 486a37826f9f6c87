"""Fused-runs benchmark (issue 28): K ProPETL-LoRA runs trained as one model over the shared frozen backbone,
against the same K runs made one after another, on one device.

    python scripts/bench_fused.py                                   # CPU: K = 1, 3, 9, 18 at batch 32
    python scripts/bench_fused.py --device cuda --batch 128 --ks 1 3 9 18 36 --json results/bench_fused_gpu.json

A fused step concatenates the K runs' batches ([K*B, T] token ids): the frozen backbone's matrix products run once
over all rows, and each run's prototype (A, B per target, shared by its layers), its layer masks (top-k of |scores|,
straight through, propetl.methods.masks.binarize) and its classification head apply to its own rows through batched matrix
products over a run dimension. The loss is the sum of the runs' mean losses, so each run's gradients are its own;
AdamW over the stacked tensors is per-run exact, and gradient clipping is per run.

Baseline: the runner's own model (method=propetl prototype=lora, propetl.models.backbone.build) at batch B: one step of it,
K times over, is what K separate runs cost in one process; a fused K=1 step against it says what the fused code
costs on its own. Printed: seconds a step, steps/s per run, tokens/s in all, speed-up over K separate runs.
A check first: the losses of K=3 fused runs (fp32, dropout off) equal each run's made alone with K=1 (the batched
math is per-run exact). Times only; no assertion on them.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F
from torch import nn

import propetl  # noqa: F401
from propetl.configs import ModelSetup, compose
from propetl.methods.masks import binarize, init_scores
from propetl.models import backbone
from propetl.run.loop import autocast, make_optimizer


class FusedLoRALinear(nn.Module):
    """A frozen nn.Linear plus K runs' masked low-rank updates, run k on rows [k*B, (k+1)*B)."""

    def __init__(self, base: nn.Linear, fused: FusedProPETLLoRA, layer: int, target: str):
        super().__init__()
        self.base, self.layer, self.target = base, layer, target
        object.__setattr__(self, "fused", fused)         # not a child: its parameters are registered once

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.fused.masked(self.layer, self.target)          # [K, r, in], [K, out, r]
        k = a.shape[0]
        rows = x.reshape(k, -1, x.shape[-1])                        # [K, B*T, in]
        update = torch.bmm(torch.bmm(rows, a.transpose(1, 2).to(x.dtype)), b.transpose(1, 2).to(x.dtype))
        return self.base(x) + self.fused.scaling * update.reshape(x.shape[:-1] + (update.shape[-1],))


class FusedProPETLLoRA(nn.Module):
    """K runs of ProPETL-LoRA over one frozen BERT encoder: stacked prototypes, scores and heads."""

    def __init__(self, encoder: nn.Module, k: int, r: int, alpha: float, targets: list[str], sparsity: float,
                 num_labels: int, seeds: list[int]):
        super().__init__()
        self.encoder, self.k, self.sparsity, self.scaling = encoder, k, sparsity, alpha / r
        for p in encoder.parameters():
            p.requires_grad_(False)
        hidden = encoder.config.hidden_size
        layers = encoder.encoder.layer
        self.prototype = nn.ParameterDict()
        self.scores = nn.ParameterDict()
        a, b, s_a, s_b = [], [], [], []
        heads_w, heads_b = [], []
        for seed in seeds:                                     # each run's own initialisation from its own seed
            generator = torch.Generator().manual_seed(seed)
            for index, _ in enumerate(targets):
                bound = (6 / hidden) ** 0.5 / (2 ** 0.5)           # kaiming-uniform(a=sqrt(5)) on [r, hidden]
                a.append(torch.empty(r, hidden).uniform_(-bound, bound, generator=generator))
                b.append(torch.zeros(hidden, r))
                sa, sb = torch.empty(len(layers), r, hidden), torch.empty(len(layers), hidden, r)
                torch.manual_seed(seed * 100 + index)          # each run's scores from its own seed alone
                init_scores(sa), init_scores(sb)
                s_a.append(sa), s_b.append(sb)
            w = torch.empty(num_labels, hidden).normal_(0, 0.02, generator=generator)
            heads_w.append(w.t()), heads_b.append(torch.zeros(num_labels))
        t = len(targets)
        for i, target in enumerate(targets):               # [K, ...] per target
            self.prototype[f"{target}_A"] = nn.Parameter(torch.stack(a[i::t]))
            self.prototype[f"{target}_B"] = nn.Parameter(torch.stack(b[i::t]))
            self.scores[f"{target}_A"] = nn.Parameter(torch.stack(s_a[i::t]))      # [K, L, r, hidden]
            self.scores[f"{target}_B"] = nn.Parameter(torch.stack(s_b[i::t]))
        self.head_w, self.head_b = nn.Parameter(torch.stack(heads_w)), nn.Parameter(torch.stack(heads_b))
        self._masks: dict[str, torch.Tensor] = {}
        for index, layer in enumerate(layers):
            attention = layer.attention.self
            for target in targets:
                setattr(attention, target, FusedLoRALinear(getattr(attention, target), self, index, target))

    def masked(self, layer: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        out = []
        for part in ("A", "B"):
            key = f"{name}_{part}"
            if key not in self._masks:                     # every layer's masks of every run, once a forward
                scores = self.scores[key]
                self._masks[key] = binarize(scores.flatten(0, 1), self.sparsity).view_as(scores)
            out.append(self.prototype[key] * self._masks[key][:, layer])
        return out[0], out[1]

    def forward(self, input_ids, attention_mask, labels):
        self._masks = {}
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]
        first = hidden.reshape(self.k, -1, hidden.shape[-1])                             # [K, B, h]
        logits = torch.baddbmm(self.head_b.unsqueeze(1).to(first.dtype), first, self.head_w.to(first.dtype))
        losses = F.cross_entropy(logits.flatten(0, 1).float(), labels, reduction="none").view(self.k, -1).mean(1)
        return losses                                                                     # [K]: each run's loss


def clip_per_run(params: list[nn.Parameter], k: int, max_norm: float) -> None:
    """torch.nn.utils.clip_grad_norm_ for each run's slice (dim 0) of the stacked parameters."""
    norms = torch.stack([p.grad.reshape(k, -1).float().pow(2).sum(1) for p in params]).sum(0).sqrt()
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for p in params:
        p.grad.mul_(coef.view(-1, *([1] * (p.grad.dim() - 1))).to(p.grad.dtype))


def load_encoder(device):
    cfg = compose(["prototype=lora", "method=propetl", "model=minilm"])
    from transformers import AutoModel
    encoder = AutoModel.from_pretrained(backbone.resolve_model_path(cfg.model.name_or_path), add_pooling_layer=False)
    return cfg, encoder.to(device)


def batch_for(k: int, batch: int, length: int, device, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1000, 30000, (k * batch, length), generator=generator).to(device),
            "attention_mask": torch.ones(k * batch, length, dtype=torch.long, device=device),
            "labels": torch.randint(0, 2, (k * batch,), generator=generator).to(device)}


def fused_step_fn(k: int, args, device, data: dict | None = None, seeds: list[int] | None = None,
                  dropout: bool = True, precision: str | None = None):
    """One optimizer step of K fused runs (seeds 0..K-1 unless given) on `data` (random tokens unless given)."""
    cfg, encoder = load_encoder(device)
    if not dropout:
        for module in encoder.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
    p = cfg.prototype
    model = FusedProPETLLoRA(encoder, k, int(p.r), float(p.alpha), list(p.targets), float(p.mask_sparsity), 2,
                             seeds=seeds if seeds is not None else list(range(k))).to(device)
    weights = [*model.prototype.values(), model.head_w, model.head_b]
    scores = list(model.scores.values())
    optimizer = torch.optim.AdamW([{"params": weights, "lr": float(p.lr), "weight_decay": 0.1},
                                   {"params": scores, "lr": float(p.mask_lr), "weight_decay": 0.0}], foreach=True)
    data = data if data is not None else batch_for(k, args.batch, args.length, device)
    precision = precision or args.precision

    def step() -> torch.Tensor:
        model.train()
        with autocast(device, precision):
            losses = model(**data)
        losses.sum().backward()
        clip_per_run(weights + scores, k, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return losses.detach()
    return step


def runner_step_fn(args, device):
    """One step of the runner's own method=propetl prototype=lora model at batch B (propetl.models.backbone.build)."""
    cfg = compose(["prototype=lora", "method=propetl", "model=minilm"])
    torch.manual_seed(0)
    model = backbone.build(ModelSetup.from_config(cfg), 2).to(device)
    optimizer, _ = make_optimizer(model, cfg, backbone.head_parameter_names(model), total_steps=1000)
    data = batch_for(1, args.batch, args.length, device)

    def step():
        model.train()
        with autocast(device, args.precision):
            loss = model(**data).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


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
    full = batch_for(3, batch, args.length, device)
    fused = fused_step_fn(3, args, device, data=full, dropout=False, precision="fp32")
    together = torch.stack([fused() for _ in range(steps)])                             # [steps, 3]
    worst = 0.0
    for run in range(3):
        rows = {key: value[run * batch:(run + 1) * batch] for key, value in full.items()}
        alone = fused_step_fn(1, args, device, data=rows, seeds=[run], dropout=False, precision="fp32")
        losses = torch.stack([alone() for _ in range(steps)])[:, 0]
        worst = max(worst, float((losses - together[:, run]).abs().max()))
    return worst


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 3, 9, 18])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=64, help="tokens a row (MRPC pairs: ~50)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default=None, help="fp32 | bf16 (default: bf16 on cuda, fp32 on cpu)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    worst = check_exact(args, device)
    print(f"check: 3 fused runs vs each alone, fp32, no dropout, 3 steps: largest loss difference {worst:.2e}",
          flush=True)
    runner = seconds_per_step(runner_step_fn(args, device), device, args.warmup, args.repeats)
    print(f"runner (method=propetl prototype=lora), batch {args.batch} x {args.length}: {runner:.4f} s a step",
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
    print(f"\ndevice {name}, batch {args.batch} x {args.length} tokens a run, {args.precision}, "
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
