"""Run the paper's experiments for one profile, then build the tables and plots (`make reproduce-tables`).

    python scripts/reproduce.py --profile cpu            # ~2.5 h on 2 CPU cores (README: what it runs)
    python scripts/reproduce.py --profile gpu --dry-run  # print the sweeps only

Every sweep is a Hydra multirun of an experiment overlay (conf/experiment/) under a profile
(conf/profile/) into outputs/reproduce/<profile>/<experiment>/<overrides>/. Re-running skips the runs
whose metrics.json exists and resumes the one that was cut off, so an interrupted reproduction
continues where it stopped. Tables and plots: outputs/tables/<profile>/ (scripts/make_tables.py).
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Per profile, the sweeps to run: (experiment overlay, overrides that narrow its grid). A command-line
# value replaces the overlay's list for that key (e.g. seed=42 instead of 42,43,44).
PLANS: dict[str, list[tuple[str, list[str]]]] = {
    # The embedded MiniLM on 2 CPU cores, 1 epoch at batch 32, two single-threaded jobs at a time.
    # PETL vs ProPETL x 3 prototypes x 3 seeds on RTE and CoLA (full training sets): 36 runs; fine-tuning
    # on both, seed 42; for ProPETL-LoRA on RTE, seed 42: sparsity 0.1, 0.5, 0.7 and random / no masks
    # (sparsity 0.9 with learned masks is the table1 run); multi-task ProPETL-LoRA on RTE + CoLA, 3 seeds
    # (against table1's single-task ProPETL-LoRA and PETL-LoRA runs of the same seeds).
    "cpu": [
        ("table1", ["task=rte,cola"]),
        ("multitask", ["task=rte", "prototype=lora", "method=propetl"]),
        ("table1", ["task=rte,cola", "method=finetune", "prototype=adapter", "seed=42"]),
        ("sparsity_sweep", ["task=rte", "prototype=lora", "seed=42", "mask.sparsity=0.1,0.5,0.7"]),
        ("ablation_masks", ["task=rte", "prototype=lora", "seed=42", "mask.kind=random,none"]),
    ],
    # The embedded MiniLM on one GPU: the reference's epochs and batch size, every local task, 3 seeds.
    "gpu": [
        ("table1", []),
        ("table1", ["method=finetune", "prototype=adapter"]),
        ("sparsity_sweep", ["task=rte,mrpc,stsb"]),
        ("ablation_masks", ["task=rte,mrpc,stsb"]),
        ("multitask", ["task=rte"]),
    ],
    # roberta-base, all eight tasks (QQP, MNLI, QNLI from the hub), the reference's settings.
    "paper": [
        ("table1", []),
        ("table1", ["method=finetune", "prototype=adapter"]),
        ("sparsity_sweep", ["task=rte,mrpc,stsb,cola"]),
        ("ablation_masks", ["task=rte,mrpc,stsb,cola"]),
        ("multitask", ["task=rte"]),
    ],
}


def sweep_command(profile: str, experiment: str, overrides: list[str], extra: list[str]) -> list[str]:
    return ["propetl-train", "-m", f"experiment={experiment}", f"profile={profile}", *overrides, *extra]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu", help=f"one of: {', '.join(PLANS)}")
    parser.add_argument("--dry-run", action="store_true", help="print the sweeps, run nothing")
    parser.add_argument("extra", nargs="*", help="overrides added to every sweep (e.g. logger.mode=disabled)")
    args = parser.parse_args(argv)
    if args.profile not in PLANS:
        print(f"reproduce: --profile {args.profile!r} is not one of: {', '.join(PLANS)}", file=sys.stderr)
        return 2
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
           "HF_DATASETS_OFFLINE": os.environ.get("HF_DATASETS_OFFLINE", "1")}
    if args.profile == "paper":      # roberta-base and the large tasks come from the hub
        env.pop("HF_HUB_OFFLINE", None), env.pop("HF_DATASETS_OFFLINE", None)
    started = time.time()
    for number, (experiment, overrides) in enumerate(PLANS[args.profile], 1):
        command = sweep_command(args.profile, experiment, overrides, args.extra)
        print(f"[{number}/{len(PLANS[args.profile])}] {shlex.join(command)}", flush=True)
        if args.dry_run:
            continue
        done = subprocess.run(command, cwd=REPO, env=env)
        if done.returncode != 0:
            print(f"reproduce: sweep {number} ({experiment}) failed with exit code {done.returncode}; "
                  f"re-run to continue where it stopped", file=sys.stderr)
            return done.returncode
    if args.dry_run:
        return 0
    print(f"sweeps done in {(time.time() - started) / 60:.1f} min", flush=True)
    tables = [sys.executable, str(REPO / "scripts" / "make_tables.py"), str(REPO / "outputs" / "reproduce" / args.profile),
              "--out", str(REPO / "outputs" / "tables" / args.profile), "--title", f"profile {args.profile}"]
    return subprocess.run(tables, cwd=REPO).returncode


if __name__ == "__main__":
    sys.exit(main())
