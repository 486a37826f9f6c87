"""Run the paper's experiments for one profile, then build the tables and plots (`make reproduce-tables`).

    python scripts/reproduce.py --profile cpu            # under 2 h on 2 CPU cores (README: what it runs)
    python scripts/reproduce.py --profile gpu --dry-run  # print the sweeps only
    python scripts/reproduce.py --profile gpu --part a1 --deadline-s 510   # one part (scripts/device_reproduce.sh)

Every sweep is a Hydra multirun of an experiment overlay (conf/experiment/) under a profile
(conf/profile/) into outputs/reproduce/<profile>/<experiment>/<overrides>/. Re-running skips the runs
whose metrics.json exists and resumes the one that was cut off, so an interrupted reproduction
continues where it stopped. Tables and plots: outputs/tables/<profile>/ (propetl-report).
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SWEEP_REPORT_ENV = "PROPETL_SWEEP_REPORT"    # propetl/report/command.py's switch of the per-sweep report

# Per profile, the sweeps to run: (experiment overlay, overrides that narrow its grid). A command-line
# value replaces the overlay's list for that key (e.g. seed=42 instead of 42,43,44).
PLANS: dict[str, list[tuple[str, list[str]]]] = {
    # The embedded MiniLM on 2 CPU cores, 1 epoch at batch 32, two single-threaded jobs at a time, on
    # STS-B and SST-2 (6,000-sentence sample); every ProPETL arm at the profile's mask sparsity 0.5.
    # Seed 42 of every Table-1 arm first (a look at it tells whether every arm learns), then seeds 43
    # and 44; then the mask ablation (learned is the table1 run), the sparsity sweep at 0.7 and 0.9
    # (0.5 is the table1 run), fine-tuning (one seed: a reference row, in no paired comparison).
    # 152 runs, the most needed first, should time run out.
    "cpu": [
        ("table1", ["seed=42"]),                                                     # 12 runs
        ("table1", ["method=peft", "prototype=lora", "seed=42"]),                    # 2
        ("table1", ["seed=43,44"]),                                                  # 24
        ("table1", ["method=peft", "prototype=lora", "seed=43,44"]),                 # 4
        ("ablation_masks", ["prototype=lora", "mask.kind=random,none"]),             # 12
        ("sparsity_sweep", ["task=stsb", "mask.sparsity=0.7,0.9"]),                  # 18
        ("table1", ["method=finetune", "prototype=adapter", "seed=42"]),             # 2
        ("sparsity_sweep", ["task=sst2", "mask.sparsity=0.7,0.9"]),                  # 18
        ("frontier", []),                                                            # 48: 8 PEFT tuners
        ("frontier_frozen", []),                                                     # 12: frozen prototypes
    ],
    # The embedded MiniLM on one GPU: the reference's epochs and batch size, every local task, 3 seeds;
    # GPU_PARTS below, in their order (priority first).
    "gpu": [],
    # roberta-base, all eight tasks (QQP, MNLI, QNLI from the hub), the reference's settings.
    "paper": [
        ("table1", []),
        ("table1", ["method=finetune", "prototype=adapter"]),
        ("sparsity_sweep", ["task=rte,mrpc,stsb,cola"]),
        ("ablation_masks", ["task=rte,mrpc,stsb,cola"]),
        ("multitask", ["task=rte"]),
        # Table 2: T5-base (hub), all eight GLUE tasks at once, its three arms (ProPETL-Adapter, the plain shared
        # Adapter, Fine-tune: the overlay's method sweep) x 3 seeds = 9 runs
        ("t5_multitask", ["model=t5-base", "task=rte"]),
    ],
}


# The gpu plan in parts, each sized to end well inside 9 minutes on one H100 (scripts/device_reproduce.sh runs
# them one or several at a time on a lent GPU; its header and README "On a lent GPU" give the sizing).
# Priority order: (a) Table 1 on the four small tasks, one task a part; (b) full fine-tuning; (c) the sparsity
# sweep and the mask ablation on STS-B, and the PEFT tuners' frontier on MRPC and STS-B; (d) SST-2; (e) multi-task
# over the four small tasks; (f) the sweep and the ablation on RTE, last: this model stayed at chance on RTE in every arm of Table 1 (results/gpu_2026-11-27).
SMALL_TASKS = ("rte", "mrpc", "stsb", "cola")
PEFT_ROW = ["method=peft", "prototype=lora"]              # HF PEFT's LoRA beside ours (conf/method/peft.yaml)
FINETUNE_ROW = ["method=finetune", "prototype=adapter"]   # (the prototype is unused by fine-tuning)
# The sweep leaves out each prototype's default sparsity (0.5 adapter, 0.9 LoRA and prefix): that point is the
# table1 run, pooled with the sweep by the report; the ablation likewise leaves out the learned masks.
SWEPT_SPARSITY = {"adapter": "0.1,0.3,0.7,0.9", "lora,prefix": "0.1,0.3,0.5,0.7"}


def _sparsity_sweep(task: str) -> list[tuple[str, list[str]]]:
    return [("sparsity_sweep", [f"prototype={p}", f"mask.sparsity={s}", f"task={task}"]) for p, s in SWEPT_SPARSITY.items()]


GPU_PARTS: dict[str, list[tuple[str, list[str]]]] = {
    **{f"a{i}": [("table1", [f"task={task}"]),                                                # 18 runs
                 ("table1", [*PEFT_ROW, f"task={task}"])]                                     # 3
       for i, task in enumerate(SMALL_TASKS, 1)},
    "b": [("table1", [*FINETUNE_ROW, f"task={','.join(SMALL_TASKS)}"])],                      # 12
    "c1": _sparsity_sweep("stsb"),                                                              # 36
    "c2": [("ablation_masks", ["mask.kind=random,none", "task=stsb"])],                         # 18
    "c3": [("frontier", ["task=mrpc,stsb"]), ("frontier_frozen", ["task=mrpc,stsb"])],         # 48 + 12: issue 25
    **{f"d{i}": [("table1", [f"prototype={prototype}", "task=sst2"])]                           # 6 each
       for i, prototype in enumerate(("adapter", "lora", "prefix"), 1)},
    "d4": [("table1", [*PEFT_ROW, "task=sst2"]), ("table1", [*FINETUNE_ROW, "task=sst2"])],      # 3 + 3
    "e1": [("multitask", ["method=petl", "task=rte"])],                                         # 9
    "e2": [("multitask", ["method=propetl", "task=rte"])],                                      # 9
    # last: on the first loan (2026-11-27) every arm of Table 1 was at chance on RTE after 20 epochs
    "f": [*_sparsity_sweep("rte"), ("ablation_masks", ["mask.kind=random,none", "task=rte"])],   # 36 + 18
}
PLANS["gpu"] = [sweep for sweeps in GPU_PARTS.values() for sweep in sweeps]

# --smoke: every sweep narrowed to its first value of each list (seed 42, LoRA where the grid has prototypes),
# two optimizer steps of 8 examples (one epoch: one pass over the real dev data), on the CPU in fp32, two jobs
# at a time: the whole plan end to end in minutes.
SMOKE = ["trainer.max_steps=2", "data.max_train_examples=16", "trainer.batch_size=8", "trainer.device=cpu",
         "trainer.precision=fp32", "trainer.eval_batch_size=256", "trainer.threads=1", "hydra.launcher.n_jobs=2",
         "logger.mode=disabled"]


def part_names(names: list[str]) -> list[str]:
    """Expand `a` to a1..a4, `all` to every part, in plan order; unknown names raise ValueError."""
    chosen = []
    for name in names:
        matches = list(GPU_PARTS) if name == "all" else [name] if name in GPU_PARTS else \
            [part for part in GPU_PARTS if part.rstrip("0123456789") == name]
        if not matches:
            raise ValueError(f"--part {name!r} is not one of: all, {', '.join(sorted({*GPU_PARTS, *(p[0] for p in GPU_PARTS)}))}")
        chosen += [part for part in matches if part not in chosen]
    return [part for part in GPU_PARTS if part in chosen]


# --smoke's one value of an overlay's own grid key that no sweep overrides (the frontier's tuners)
SMOKE_GRID = {"frontier": (("method", "peft"), ("peft", "vera"))}   # peft= needs method= on the line


def smoke_sweep(experiment: str, overrides: list[str]) -> list[str]:
    """One value of every swept key: the first of each list given, seed 42 and (if not given) LoRA, and the
    overlay's SMOKE_GRID value."""
    narrowed = [f"{key}={value.split(',')[0]}" for key, _, value in (o.partition("=") for o in overrides)]
    keys = {o.partition("=")[0] for o in narrowed}
    defaults = (("seed", "42"), ("prototype", "lora"), *SMOKE_GRID.get(experiment, ()))
    return narrowed + [f"{key}={value}" for key, value in defaults if key not in keys]


def sweep_command(profile: str, experiment: str, overrides: list[str], extra: list[str]) -> list[str]:
    return ["propetl-train", "-m", f"experiment={experiment}", f"profile={profile}", *overrides, *extra]


STOPPED = 75          # the exit code of a reproduction stopped at --deadline-s (EX_TEMPFAIL: run it again)


def run_sweep(command: list[str], env: dict, deadline: float | None) -> int:
    """Run one sweep to its end, or until `deadline` (a time.time() value): then SIGTERM its process group
    (every run writes its resume checkpoint and exits; the next call continues it) and return STOPPED.
    With a deadline the sweep has a process group of its own; a Ctrl-C or SIGTERM of this script stops it too."""
    if deadline is None:
        return subprocess.run(command, cwd=REPO, env=env).returncode
    process = subprocess.Popen(command, cwd=REPO, env=env, preexec_fn=os.setpgrp)
    try:
        return process.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        stop_group(process)
        return STOPPED
    except BaseException:
        stop_group(process)
        raise


def stop_group(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu", help=f"one of: {', '.join(PLANS)}")
    parser.add_argument("--dry-run", action="store_true", help="print the sweeps, run nothing")
    parser.add_argument("--part", action="append", default=[],
                        help=f"gpu only: run these parts of the plan (repeat; {', '.join(GPU_PARTS)}, a letter for all "
                             "its parts, or all); a part whose sweeps all ended well is skipped next time")
    parser.add_argument("--root", type=Path, help="folder of the runs (reproduce.root); default outputs/reproduce")
    parser.add_argument("--tables", type=Path, help="folder of the tables; default outputs/tables/<profile>")
    parser.add_argument("--smoke", action="store_true", help="one run a sweep, two steps each, on the CPU")
    parser.add_argument("--deadline-s", type=float, help="stop (and checkpoint the runs) this many seconds after the start")
    parser.add_argument("--keep-going", action="store_true", help="after a failed sweep, go on with the next")
    parser.add_argument("extra", nargs="*", help="overrides added to every sweep (e.g. logger.mode=disabled)")
    args = parser.parse_args(argv)
    if args.profile not in PLANS:
        print(f"reproduce: --profile {args.profile!r} is not one of: {', '.join(PLANS)}", file=sys.stderr)
        return 2
    if args.part and args.profile != "gpu":
        print("reproduce: --part is for --profile gpu", file=sys.stderr)
        return 2
    try:
        parts = part_names(args.part) if args.part else [None]
    except ValueError as error:
        print(f"reproduce: {error}", file=sys.stderr)
        return 2
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
           "HF_DATASETS_OFFLINE": os.environ.get("HF_DATASETS_OFFLINE", "1"),
           SWEEP_REPORT_ENV: "0"}          # no report a sweep: the tables are built once, at the end
    if args.profile == "paper":      # roberta-base and the large tasks come from the hub
        env.pop("HF_HUB_OFFLINE", None), env.pop("HF_DATASETS_OFFLINE", None)
    root = (args.root or REPO / "outputs" / "reproduce").resolve()
    extra = ([f"reproduce.root={root}"] if args.root else []) + (SMOKE if args.smoke else []) + args.extra
    started = time.time()
    deadline = started + args.deadline_s if args.deadline_s else None
    if deadline is not None:            # SIGTERM (a timeout, a kill) unwinds through run_sweep, which stops the sweep
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    failed = 0
    for part in parts:
        plan = GPU_PARTS[part] if part else PLANS[args.profile]
        sweeps = [(experiment, smoke_sweep(experiment, overrides) if args.smoke else overrides) for experiment, overrides in plan]
        marker = root / args.profile / ".parts" / f"{part}.done"
        plan_text = "".join(shlex.join(sweep_command(args.profile, e, o, [])) + "\n" for e, o in sweeps)
        if part and not args.dry_run and marker.is_file() and marker.read_text() == plan_text:
            print(f"part {part}: done before ({marker}); skipped", flush=True)
            continue
        part_failed, part_started = 0, time.time()
        for number, (experiment, overrides) in enumerate(sweeps, 1):
            command = sweep_command(args.profile, experiment, overrides, extra)
            print(f"[{part + ' ' if part else ''}{number}/{len(sweeps)}] {shlex.join(command)}", flush=True)
            if args.dry_run:
                continue
            code = STOPPED if deadline is not None and time.time() >= deadline else run_sweep(command, env, deadline)
            if code == STOPPED and deadline is not None:
                print(f"reproduce: stopped at the deadline ({args.deadline_s:.0f} s) in sweep {number} ({experiment}); "
                      f"re-run to continue where it stopped", file=sys.stderr)
                failed = part_failed = STOPPED
                break
            if code != 0:
                print(f"reproduce: sweep {number} ({experiment}) failed with exit code {code}; "
                      f"re-run to continue where it stopped", file=sys.stderr)
                if not args.keep_going:
                    return code
                failed, part_failed = failed or code, code
        if part and not part_failed and not args.dry_run:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(plan_text)
        if part and not args.dry_run:
            print(f"part {part}: {'stopped' if part_failed == STOPPED else 'failed' if part_failed else 'done'} after "
                  f"{(time.time() - part_started) / 60:.1f} min", flush=True)
        if failed == STOPPED:
            break
    if args.dry_run:
        return 0
    print(f"sweeps ended in {(time.time() - started) / 60:.1f} min", flush=True)
    tables = [sys.executable, "-m", "propetl.report.command", str(root / args.profile),
              "--out", str(args.tables or REPO / "outputs" / "tables" / args.profile), "--title", f"profile {args.profile}"]
    built = subprocess.run(tables, cwd=REPO).returncode
    return failed or built


if __name__ == "__main__":
    sys.exit(main())
