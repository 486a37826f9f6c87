"""Issue 24's learning demonstration: a tiny T5 learns a task by full fine-tuning, then, FROZEN, learns a second task
through a ProPETL adapter alone (one prototype for every encoder and decoder site, a binary mask per site).

    python scripts/t5_learns.py                      # writes results/t5_learns/result.{json,md}
    python scripts/t5_learns.py --quick --out DIR    # a shortened run (tests/test_t5_model.py's slow test)

No weights, no data, no network: the T5 is random-initialised from a T5Config (d_model 64, 2 + 2 blocks) over a
digit vocabulary (0 pad / decoder start, 1 end, 2..11 the digits 0..9). Task 1 (copy): "3 1 4 1" -> "3 1 4 1";
task 2 (shift): each digit + 1 mod 10, "3 1 4 1" -> "4 2 5 2". Strings of 4..8 digits; the held-out strings of each
evaluation never occur in training. Score: exact match of the greedy generation (chance: 10^-length, about 0).
Stage 1 trains every weight on copy and saves the model (safetensors); stage 2 loads it through TextToTextModel:
the stage-1 model untrained on shift (baseline: it copies, so 0 on shift), ProPETL (method=propetl) and the plain adapter
(method=petl, one adapter per site), each for the same steps, the backbone frozen. The optimiser follows paper.md §2.4
for T5: AdamW, linear decay after a warmup, the mask scores' lr = 10 x the prototype's current lr at every step.
A multi-task arm (paper.md §2.3) trains shift and shift3 (+3) at once on the frozen model, no task name in the input:
one prototype, a task mask OR a site mask, each task generating with its own masks (and, as a check, the other's).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Set as AbstractSet
from pathlib import Path

import torch
from transformers import T5Config, T5ForConditionalGeneration
from transformers.utils import logging as hf_logging

from propetl import methods
from propetl.configs import ModelSetup, StorageConfig
from propetl.models.t5 import IGNORE_INDEX, TextToTextModel
from propetl.storage.files import atomic_write_text

PAD, EOS, DIGIT0 = 0, 1, 2  # token ids; digit d is DIGIT0 + d
MIN_LEN, MAX_LEN = 4, 8
TASKS = {
    "copy": lambda digits: digits,
    "shift": lambda digits: [(d + 1) % 10 for d in digits],
    "shift3": lambda digits: [(d + 3) % 10 for d in digits],
}
D_MODEL = 64


def tiny_t5(seed: int) -> T5ForConditionalGeneration:
    config = T5Config(
        vocab_size=16,
        d_model=D_MODEL,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        dropout_rate=0.0,
        decoder_start_token_id=PAD,
        pad_token_id=PAD,
        eos_token_id=EOS,
    )
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(config)


def draw(
    n: int, generator: torch.Generator, exclude: AbstractSet[tuple[int, ...]] = frozenset()
) -> list[tuple[int, ...]]:
    out = []
    while len(out) < n:
        length = int(torch.randint(MIN_LEN, MAX_LEN + 1, (1,), generator=generator))
        digits = tuple(torch.randint(0, 10, (length,), generator=generator).tolist())
        if digits not in exclude:
            out.append(digits)
    return out


def encode(strings: list[tuple[int, ...]], task: str) -> dict[str, torch.Tensor]:
    """input_ids / attention_mask (digits + end, padded) and labels (the task's answer + end, -100 padded)."""
    width = MAX_LEN + 1
    input_ids = torch.full((len(strings), width), PAD)
    labels = torch.full((len(strings), width), IGNORE_INDEX)
    for i, digits in enumerate(strings):
        source, target = [DIGIT0 + d for d in digits] + [EOS], [DIGIT0 + d for d in TASKS[task](list(digits))] + [EOS]
        input_ids[i, : len(source)] = torch.tensor(source)
        labels[i, : len(target)] = torch.tensor(target)
    return {"input_ids": input_ids, "attention_mask": (input_ids != PAD).long(), "labels": labels}


def setup(method: str, folder: str, sparsity: float, bottleneck: int, init_std: float) -> ModelSetup:
    saved = {
        "model": {"name": "tiny-t5", "name_or_path": folder, "hidden_size": D_MODEL, "num_layers": 2},
        "prototype": {
            "name": "adapter",
            "reduction_factor": D_MODEL // bottleneck,
            "bottleneck": bottleneck,
            "non_linearity": "gelu_new",
            "init_std": init_std,
            "lr": 1e-3,
            "mask_sparsity": sparsity,
            "mask_lr": 1e-2,
            "freeze": False,
            "seed": 0,
        },
        "method": {"name": method},
        "mask": {"kind": "learned", "sparsity": sparsity, "lr": 1e-2, "weight_decay": 0.0, "seed": 0, "combine": "or"},
    }
    return ModelSetup(saved, StorageConfig("packed", "float32"))


def train(
    model: torch.nn.Module, tasks: list[str], steps: int, lr: float, batch_size: int, seed: int, exclude: set
) -> list[float]:
    """AdamW, warmup 10% then linear decay; mask scores (if any) at 10x the prototype's current lr (§2.4).
    Several tasks: single-task batches in turn, each with its task index (its task masks)."""
    store = methods.petl_weights(model)
    scores = {id(p) for p in store.score_parameters()} if store is not None else set()
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if id(p) not in scores], "lr": lr}]
    if scores:
        groups.append({"params": [p for p in trainable if id(p) in scores], "lr": 10 * lr})
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    generator, losses = torch.Generator().manual_seed(seed), []
    model.train()
    for step in range(steps):
        current = lr * min((step + 1) / warmup, max(0.0, (steps - step) / (steps - warmup)))
        optimizer.param_groups[0]["lr"] = current
        if scores:
            optimizer.param_groups[1]["lr"] = 10 * current  # mask lr = 10 x the prototype's current lr
        index = step % len(tasks)
        batch = encode(draw(batch_size, generator, exclude), tasks[index])
        loss = model(**batch, task=torch.full((batch_size,), index)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


@torch.no_grad()
def exact_match(model: TextToTextModel, task: str, strings: list[tuple[int, ...]], index: int = 0) -> float:
    """Exact match on `task`'s answers of greedy generation with task `index`'s masks."""
    model.eval()
    batch = encode(strings, task)
    generated = model.generate(batch["input_ids"], batch["attention_mask"], task=index, max_new_tokens=MAX_LEN + 1)
    generated = generated[:, 1:]
    hits = 0
    for row, labels in zip(generated.tolist(), batch["labels"].tolist()):
        target = [t for t in labels if t != IGNORE_INDEX]
        hits += row[: len(target)] == target
    return hits / len(strings)


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    started = time.time()
    load = os.getloadavg()
    held_out = draw(args.eval_size, torch.Generator().manual_seed(args.seed + 100))
    exclude = set(held_out)
    result: dict = {"command": args.command, "settings": {k: v for k, v in vars(args).items() if k != "command"}}
    with tempfile.TemporaryDirectory() as folder:
        stage = time.time()
        full = TextToTextModel(setup("finetune", folder, 0.0, 1, 0.0), ["copy"], tiny_t5(args.seed), task_masks=False)
        losses = train(full, ["copy"], args.copy_steps, args.copy_lr, args.batch_size, args.seed, exclude)
        result["copy_full_finetune"] = {
            "steps": args.copy_steps,
            "final_loss": round(sum(losses[-20:]) / 20, 4),
            "exact_match_copy": exact_match(full, "copy", held_out),
            "seconds": round(time.time() - stage, 1),
        }
        hf_logging.disable_progress_bar()
        full.t5.save_pretrained(folder)  # the "pre-trained" backbone the second task starts from
        hf_logging.enable_progress_bar()
        del full
        arms = {"frozen_untrained": None, "propetl": "propetl", "petl": "petl"}
        for arm, method in arms.items():
            stage = time.time()
            torch.manual_seed(args.seed + 1)
            model = TextToTextModel(  # the baseline: the stage-1 model as loaded, nothing attached, nothing trained
                setup(method or "finetune", folder, args.sparsity, args.bottleneck, args.init_std),
                ["shift"],
                task_masks=False,
            )
            frozen = [p for p in model.t5.parameters()]
            assert not method or not any(p.requires_grad for p in frozen)
            before = [p.detach().clone() for p in frozen]
            losses = (
                train(model, ["shift"], args.shift_steps, args.lr, args.batch_size, args.seed + 2, exclude)
                if method
                else []
            )
            assert all(torch.equal(a, b) for a, b in zip(before, model.t5.parameters())), "the backbone moved"
            store = methods.petl_weights(model)
            entry = {
                "steps": len(losses),
                "final_loss": round(sum(losses[-20:]) / 20, 4) if losses else None,
                "exact_match_shift": exact_match(model, "shift", held_out),
                "exact_match_copy": exact_match(model, "copy", held_out),
                "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad) if method else 0,
                "sites": store.num_layers if store is not None else None,
                "seconds": round(time.time() - stage, 1),
            }
            if store is not None:  # what the task stores: dense fp32 tensors + 1 bit a mask entry (paper.md §3)
                masks = store.binary_masks()
                dense = sum(t.numel() for t in store.weights.values())
                entry["stored_fp32_equivalent"] = dense + sum(m.numel() for m in masks.values()) / 32
                if masks:
                    entry["prototype_params"] = dense
                    entry["mask_density"] = {k: round(float(v.mean()), 4) for k, v in masks.items()}
            result[f"shift_{arm}"] = entry
        if args.multitask_steps:
            result["multitask_propetl"] = multitask(args, folder, held_out, exclude)
    result["chance"] = f"exact match of a {MIN_LEN}..{MAX_LEN}-digit string by guessing: <= 1e-4"
    result["machine"] = {
        "cpus": os.cpu_count(),
        "torch_threads": args.threads,
        "load_avg_at_start": [round(x, 2) for x in load],
        "load_avg_at_end": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    result["total_seconds"] = round(time.time() - started, 1)
    return result


def multitask(args: argparse.Namespace, folder: str, held_out: list, exclude: set) -> dict:
    """Two tasks at once on the frozen model (paper.md §2.3, multi-task T5): shift (+1) and shift3 (+3), no task
    name in the input; one prototype, a mask per task shared by all sites OR a mask per site shared by both tasks."""
    stage, tasks = time.time(), ["shift", "shift3"]
    torch.manual_seed(args.seed + 1)
    model = TextToTextModel(
        setup("propetl", folder, args.multitask_sparsity, args.bottleneck, args.init_std), tasks, task_masks=True
    )
    losses = train(model, tasks, args.multitask_steps, args.lr, args.batch_size, args.seed + 3, exclude)
    store = methods.petl_weights(model)
    assert store is not None
    return {
        "steps": len(losses),
        "final_loss": round(sum(losses[-20:]) / 20, 4),
        "mask_sparsity": args.multitask_sparsity,
        # task i's answers generated with task j's masks: the diagonal is what each task learnt
        "exact_match": {
            f"{t}@{m}_masks": exact_match(model, t, held_out, tasks.index(m)) for t in tasks for m in tasks
        },
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "mask_density": {k: round(float(v.mean()), 4) for k, v in store.binary_masks().items()},
        "seconds": round(time.time() - stage, 1),
    }


def markdown(result: dict) -> str:
    s = result["settings"]
    rows = [
        ("copy, full fine-tuning (stage 1)", result["copy_full_finetune"], "exact_match_copy"),
        ("shift, frozen, untrained (baseline)", result["shift_frozen_untrained"], "exact_match_shift"),
        ("shift, frozen + ProPETL adapter", result["shift_propetl"], "exact_match_shift"),
        ("shift, frozen + plain adapter (petl)", result["shift_petl"], "exact_match_shift"),
    ]
    lines = [
        "# A tiny T5 learns: full fine-tuning, then a second task through a ProPETL adapter alone",
        "",
        f"Command: `{result['command']}`",
        "",
        (
            f"Tiny random T5 (d_model {D_MODEL}, 2 encoder + 2 decoder blocks), digit strings of {MIN_LEN}..{MAX_LEN}, "
            f"{s['eval_size']} held-out strings, greedy generation, exact match. ProPETL: one adapter prototype "
            f"(bottleneck {s['bottleneck']}, gelu_new) for all {result['shift_propetl']['sites']} sites, "
            f"mask.sparsity {s['sparsity']} per site, mask lr = 10 x prototype lr."
        ),
        "",
        "| stage | steps | trainable params | stored (fp32-equivalent) | final loss | exact match (held out) | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, entry, key in rows:
        trainable = entry.get("trainable_params", "all")
        stored = entry.get("stored_fp32_equivalent", "-")
        lines.append(
            f"| {name} | {entry['steps']} | {trainable} | {stored} | {entry['final_loss']} | {entry[key]:.3f} "
            f"| {entry['seconds']} |"
        )
    if "multitask_propetl" in result:
        mt = result["multitask_propetl"]
        em = mt["exact_match"]
        lines += [
            "",
            (
                f"Multi-task, frozen: shift (+1) and shift3 (+3) together, {mt['steps']} steps (single-task batches in "
                f"turn), one prototype, task mask OR site mask, each at mask.sparsity {mt['mask_sparsity']} "
                "(paper.md §2.3), no task name in the input: exact match of each task's answers generated with each "
                "task's masks."
            ),
            "",
            "| answers \\ masks | shift | shift3 |",
            "|---|---|---|",
            f"| shift | {em['shift@shift_masks']:.3f} | {em['shift@shift3_masks']:.3f} |",
            f"| shift3 | {em['shift3@shift_masks']:.3f} | {em['shift3@shift3_masks']:.3f} |",
        ]
    m = result["machine"]
    lines += [
        "",
        (
            f"Chance: {result['chance']}. The baseline copies (its copy accuracy: "
            f"{result['shift_frozen_untrained']['exact_match_copy']:.3f}). After the shift adapters, copy accuracy: "
            f"ProPETL {result['shift_propetl']['exact_match_copy']:.3f}, plain {result['shift_petl']['exact_match_copy']:.3f} "
            "(the adapter is on: it now shifts)."
        ),
        "",
        (
            f"Total {result['total_seconds']} s on {m['cpus']} CPU cores ({m['torch_threads']} torch threads), "
            f"load average {m['load_avg_at_start']} at start, {m['load_avg_at_end']} at end; torch {m['torch']}."
        ),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/t5_learns")
    parser.add_argument("--quick", action="store_true", help="shortened: fewer steps and held-out strings")
    parser.add_argument("--copy-steps", type=int, default=None)
    parser.add_argument("--shift-steps", type=int, default=None)
    parser.add_argument("--copy-lr", type=float, default=3e-3)
    parser.add_argument("--lr", type=float, default=3e-3, help="prototype (adapter) lr; mask lr is 10x")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--eval-size", type=int, default=None)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--multitask-steps", type=int, default=None, help="0: no multi-task arm")
    parser.add_argument("--multitask-sparsity", type=float, default=0.7, help="each of task and site mask (§5.2)")
    parser.add_argument("--bottleneck", type=int, default=D_MODEL)
    parser.add_argument("--init-std", type=float, default=0.01)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: on shared cores 2 threads ran 40x slower)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.command = " ".join(["python scripts/t5_learns.py", *(sys.argv[1:] if argv is None else argv)])
    args.copy_steps = args.copy_steps or (600 if args.quick else 1200)
    args.shift_steps = args.shift_steps or (200 if args.quick else 500)
    if args.multitask_steps is None:
        args.multitask_steps = 300 if args.quick else 1000
    args.eval_size = args.eval_size or (200 if args.quick else 1000)
    result = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "result.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(out / "result.md", markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
