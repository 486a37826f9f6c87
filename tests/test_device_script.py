"""scripts/device_reproduce.sh, the gpu reproduction in parts for a lent GPU: its plan (scripts/reproduce.py),
the archive that brings the runs back (scripts/pack_runs.py), the deadline, and the whole script on the CPU
(--smoke: every part, one run a sweep, two steps a run)."""
from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


reproduce = load_script("reproduce")


def test_gpu_parts_cover_the_priorities_in_order():
    parts = reproduce.GPU_PARTS
    assert list(parts) == ["a1", "a2", "a3", "a4", "b", "c1", "c2", "c3", "d1", "d2", "d3", "d4", "e1", "e2", "f"]
    # the plan is the parts' sweeps in that order: 2 a part of a, 1 b, 2 c1, 1 c2, 2 c3, 1 each d1-d3, 2 d4, 1 e1,
    # 1 e2, 3 f (stated by hand, so that a plan built another way fails here)
    assert len(reproduce.PLANS["gpu"]) == 8 + 1 + 2 + 1 + 2 + 3 + 2 + 1 + 1 + 3
    assert reproduce.PLANS["gpu"][0] == ("table1", ["task=rte"])
    assert reproduce.PLANS["gpu"][8] == ("table1", ["method=finetune", "prototype=adapter", "task=rte,mrpc,stsb,cola"])
    assert reproduce.PLANS["gpu"][-1] == ("ablation_masks", ["mask.kind=random,none", "task=rte"])
    for number, task in enumerate(reproduce.SMALL_TASKS, 1):       # (a) Table 1, a task a part, with the PEFT row
        assert parts[f"a{number}"][0] == ("table1", [f"task={task}"])
        if (REPO / "conf" / "method" / "peft.yaml").is_file():
            assert ("table1", ["method=peft", "prototype=lora", f"task={task}"]) in parts[f"a{number}"]
    assert reproduce.part_names(["a"]) == ["a1", "a2", "a3", "a4"]
    assert reproduce.part_names(["all"]) == list(parts)
    assert reproduce.part_names(["e2", "b", "a1"]) == ["a1", "b", "e2"]          # plan order, once each
    with pytest.raises(ValueError, match="not one of"):
        reproduce.part_names(["z"])
    order = [part[0] for part in parts]
    assert order == sorted(order)                                                 # a, b, c, d, e


def test_the_bundle_brings_every_dependency_the_gpu_image_lacks():
    """A loan once lost every ProPETL run to `No module named 'constriction'`: a dependency added to pyproject.toml
    but not to scripts/device_bundle.sh. Every dependency (and what the bundled packages need) is bundled, in the
    image (IMAGE_HAS), or wandb (a stand-in there)."""
    def name(requirement: str) -> str:
        return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.\-]+", requirement).group(0)).lower()

    script = (REPO / "scripts" / "device_bundle.sh").read_text()
    lists = {key: set(shlex.split(value)) for key, value in re.findall(r'^(BUNDLED|IMAGE_HAS)="([^"]*)"', script, re.M)}
    bundled, image = lists["BUNDLED"], lists["IMAGE_HAS"]
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    needed = {name(r) for r in pyproject["dependencies"] + pyproject["optional-dependencies"]["peers"]}
    for package in bundled:
        needed |= {name(r) for r in importlib.metadata.requires(package) or []
                   if Requirement(r).marker is None or Requirement(r).marker.evaluate({"extra": ""})}
    missing = needed - bundled - image - {"wandb", "antlr4-python3-runtime"}
    assert not missing, f"add to BUNDLED or IMAGE_HAS in scripts/device_bundle.sh: {sorted(missing)}"
    assert "import constriction" in (REPO / "scripts" / "device_reproduce.sh").read_text()


def test_sparsity_sweep_leaves_the_table1_points_out():
    sweeps = [o for e, o in reproduce.PLANS["gpu"] if e == "sparsity_sweep"]
    for overrides in sweeps:
        values = dict(o.split("=", 1) for o in overrides)
        default = "0.5" if values["prototype"] == "adapter" else "0.9"           # conf/prototype/*.yaml
        assert default not in values["mask.sparsity"].split(",") and values["task"] in ("rte", "stsb")
    ablations = [o for e, o in reproduce.PLANS["gpu"] if e == "ablation_masks"]
    assert all("mask.kind=random,none" in o for o in ablations)


@functools.cache
def sweeper_grid(experiment: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """hydra.sweeper.params of an overlay under the gpu profile: key -> its values."""
    from conftest import compose_cfg  # noqa: F401 (sets the offline environment)

    from propetl.configs import compose

    hydra_cfg = compose([f"experiment={experiment}", "profile=gpu"], with_hydra=True)
    return tuple((str(k), tuple(str(v).split(","))) for k, v in hydra_cfg.hydra.sweeper.params.items())


def expand_sweep(experiment: str, overrides: list[str]) -> list[list[str]]:
    """The runs of one sweep, as Hydra's basic sweeper makes them: the overlay's and the profile's grid
    (hydra.sweeper.params) with the sweep's own overrides replacing the keys they name."""
    grid = dict(sweeper_grid(experiment))
    grid.update({k: tuple(v.split(",")) for k, _, v in (o.partition("=") for o in overrides)})
    return [[f"{k}={v}" for k, v in zip(grid, values)] for values in itertools.product(*grid.values())]


def covering_runs(runs: list[list[str]]) -> list[list[str]]:
    """Runs of a grid that hold every value of every key at least once (the first run, then one run per other
    value): a config error comes from one override value, so these fail wherever the whole grid would."""
    chosen, seen = [], set()
    for run in runs:
        if not seen.issuperset(run):
            chosen.append(run)
            seen.update(run)
    return chosen


def test_every_run_of_every_part_composes_and_validates():
    """The whole gpu plan (306 runs) is made of valid configs: a typo in a part fails here, not on a loan."""
    from conftest import compose_cfg

    from propetl.validate import validate
    total = 0
    for part, sweeps in reproduce.GPU_PARTS.items():
        for experiment, overrides in sweeps:
            runs = expand_sweep(experiment, overrides)
            total += len(runs)
            for run in covering_runs([[o for o in run if not o.startswith("seed=")] for run in runs]):  # seeds: one config
                cfg = compose_cfg([f"experiment={experiment}", "profile=gpu", *run])
                validate(cfg)
                assert cfg.trainer.device == "cuda" and cfg.trainer.precision == "bf16", (part, run)
    assert total == 306                       # the sizing table in scripts/device_reproduce.sh and the README


def test_covering_runs_hold_every_value():
    runs = expand_sweep("table1", ["task=rte"])
    chosen = covering_runs(runs)
    assert len(runs) == 18 and len(chosen) < len(runs)
    assert {o for run in chosen for o in run} == {o for run in runs for o in run}


def test_smoke_narrows_every_sweep_to_one_value_a_key():
    assert reproduce.smoke_sweep("table1", ["task=rte,mrpc"]) == ["task=rte", "seed=42", "prototype=lora"]
    assert reproduce.smoke_sweep("sparsity_sweep", ["prototype=lora,prefix", "mask.sparsity=0.1,0.3"]) == \
        ["prototype=lora", "mask.sparsity=0.1", "seed=42"]
    assert reproduce.smoke_sweep("frontier", ["task=mrpc,stsb"]) == ["task=mrpc", "seed=42", "prototype=lora", "method=peft",
                                                                     "peft=vera"]
    done = subprocess.run([sys.executable, "scripts/reproduce.py", "--profile", "gpu", "--part", "d4", "--smoke", "--dry-run"],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 2 and all("trainer.max_steps=2" in line and "trainer.device=cpu" in line for line in lines)
    refused = subprocess.run([sys.executable, "scripts/reproduce.py", "--profile", "cpu", "--part", "a1", "--dry-run"],
                             cwd=REPO, capture_output=True, text=True)
    assert refused.returncode == 2 and "--part is for --profile gpu" in refused.stderr


def test_deadline_stops_the_whole_sweep_process_group(tmp_path):
    child = tmp_path / "child.pid"
    started = time.time()
    code = reproduce.run_sweep(["bash", "-c", f"sleep 60 & echo $! > {child}; wait"], dict(os.environ), time.time() + 1)
    assert code == reproduce.STOPPED and time.time() - started < 30
    pid = int(child.read_text())
    time.sleep(0.2)
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


def test_pack_keeps_the_small_evidence_and_unpacks_where_runs_are_skipped(tmp_path):
    pack_runs = load_script("pack_runs")
    runs = tmp_path / "outputs" / "reproduce" / "gpu"
    run = runs / "table1" / "method=propetl,prototype=lora,seed=42,task=rte"
    for name, text in [("metrics.json", "{}"), ("train.log", "log"), (".hydra/overrides.yaml", "- task=rte"),
                       ("checkpoint/propetl.json", "{}"), ("checkpoint/masks.safetensors", "bits"),
                       ("checkpoint/prototype.safetensors", "big weights"), ("resume/state.pt", "big state")]:
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text(text)
    unfinished = runs / "table1" / "method=petl,prototype=lora,seed=42,task=rte"
    (unfinished / "resume").mkdir(parents=True)
    (runs / ".parts").mkdir()
    (runs / ".parts" / "a1.done").write_text("plan\n")
    tables = tmp_path / "outputs" / "tables" / "gpu"
    tables.mkdir(parents=True)
    (tables / "table.md").write_text("# table\n")
    archive = tmp_path / "out" / "gpu-runs.tar.gz"
    assert pack_runs.pack(runs, tables, archive) == 1
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
    base = "reproduce/gpu/table1/method=propetl,prototype=lora,seed=42,task=rte"
    assert {f"{base}/metrics.json", f"{base}/train.log", f"{base}/.hydra/overrides.yaml", f"{base}/checkpoint/propetl.json",
            f"{base}/checkpoint/masks.safetensors", "reproduce/gpu/.parts/a1.done", "tables/gpu/table.md"} == names
    assert pack_runs.unpack(archive, tmp_path / "back") == 1
    assert (tmp_path / "back" / base / "metrics.json").read_text() == "{}"


def metrics_files(folder: Path) -> dict[Path, int]:
    return {path: path.stat().st_mtime_ns for path in folder.rglob("metrics.json")}


@pytest.mark.slow
def test_bench_alone_runs_the_fused_benchmark_and_no_part(tmp_path):
    """`device_reproduce.sh bench` (here with --smoke, on the CPU): scripts/bench_fused.py's figures and exactness
    check come back in $OUT/bench_fused.json, and no part runs."""
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    done = subprocess.run(["bash", "scripts/device_reproduce.sh", "bench", "--smoke"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    figures = json.loads((out / "bench_fused.json").read_text())
    assert [row["k"] for row in figures["rows"]] == [1, 3] and figures["check_max_loss_difference"] < 1e-5
    assert all(row["fused_step_s"] > 0 for row in figures["rows"]) and not (out / "reproduce").exists()


@pytest.mark.slow
def test_compare_runs_a_part_fused_then_by_jobs_in_fresh_folders(tmp_path):
    """`device_reproduce.sh compare c2` (here with --smoke): the part twice, the fused launcher then the joblib one, each
    in its own fresh folder (nothing skipped), a line a half in $OUT/compare.txt; with --fused it is refused."""
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    env.pop("DEADLINE_S", None)
    stale = out / "compare" / "jobs.earlier" / "reproduce" / "gpu" / ".parts"
    stale.mkdir(parents=True)
    (stale / "c2.done").write_text("")                       # an earlier compare's marker: not a skip, and kept
    done = subprocess.run(["bash", "scripts/device_reproduce.sh", "compare", "c2", "--smoke"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    folders = {how: [f for f in (out / "compare").glob(f"{how}.*") if f.name != "jobs.earlier"] for how in ("jobs", "fused")}
    assert all(len(made) == 1 for made in folders.values()), folders
    runs = {how: sorted(p.parent.name for p in made[0].rglob("metrics.json")) for how, made in folders.items()}
    assert runs["jobs"] and runs["jobs"] == runs["fused"]
    assert (stale / "c2.done").exists()
    assert "hydra/launcher=fused" in (out / "device.log").read_text()
    lines = (out / "compare.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in lines] == ["parts c2, fused", "parts c2, jobs"], lines
    assert all(re.fullmatch(r"parts c2, \w+: \d+ s, [1-9]\d* runs finished, exit 0", line) for line in lines), lines
    refused = subprocess.run(["bash", "scripts/device_reproduce.sh", "compare", "c2", "--fused", "--smoke"], cwd=REPO,
                             env=env, capture_output=True, text=True, timeout=60, check=False)
    assert refused.returncode == 2 and "leave out --fused" in refused.stderr


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("PROPETL_DEVICE_SMOKE") != "1",
                    reason="the whole device smoke (every part, 30 runs) is beyond make test's 10-minute budget: "
                           "`make test-device-smoke` (PROPETL_DEVICE_SMOKE=1) runs it, and .ci/run does")
def test_smoke_runs_every_part_then_skips_what_is_finished(tmp_path, glue_dir):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    for name in ("BASE", "DEADLINE_S", "JOBS"):
        env.pop(name, None)

    def script(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "scripts/device_reproduce.sh", *args, "--smoke"], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=3600)

    started = time.time()
    done = script("all")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    print(f"smoke of every part: {(time.time() - started) / 60:.1f} min wall")      # `make test-device-smoke` shows it (-rP)
    print("".join(line + "\n" for line in done.stdout.splitlines() if line.startswith("part ")))
    finished = metrics_files(out / "reproduce" / "gpu")
    # one run a sweep, two (petl and propetl) where the overlay's method grid is left whole
    expected = sum(2 if e in ("table1", "multitask") and not any(o.startswith("method=") for o in overrides) else 1
                   for e, overrides in reproduce.PLANS["gpu"])
    assert len(finished) == expected
    assert {path.parent.parent.name for path in finished} == {"table1", "sparsity_sweep", "ablation_masks", "multitask",
                                                                  "frontier"}
    assert {p.stem for p in (out / "reproduce" / "gpu" / ".parts").glob("*.done")} == set(reproduce.GPU_PARTS)
    assert (out / "table.md").is_file() and (out / "device.log").is_file()
    with tarfile.open(out / "gpu-runs.tar.gz") as tar:
        assert sum(name.endswith("/metrics.json") for name in tar.getnames()) == len(finished)

    again = script("all")                                                # every part is done: skipped whole
    assert again.returncode == 0 and again.stdout.count("done before") == len(reproduce.GPU_PARTS)
    assert metrics_files(out / "reproduce" / "gpu") == finished

    (out / "reproduce" / "gpu" / ".parts" / "a1.done").unlink()          # without its marker: run by run
    again = script("a1")
    assert again.returncode == 0 and "metrics.json exists): skipped" in again.stdout + again.stderr
    assert metrics_files(out / "reproduce" / "gpu") == finished

    back = tmp_path / "here"                                             # the archive, back on this machine
    subprocess.run([sys.executable, "scripts/pack_runs.py", "unpack", str(out / "gpu-runs.tar.gz"), str(back)], cwd=REPO, check=True)
    collected = subprocess.run([sys.executable, "scripts/collect_results.py", "--profile", "gpu",
                                "--source", str(back / "reproduce" / "gpu"), "--out", str(tmp_path / "results")],
                               cwd=REPO, capture_output=True, text=True)
    assert collected.returncode == 0, collected.stderr
    assert (tmp_path / "results" / "table.md").is_file()
    assert len(list((tmp_path / "results" / "runs").rglob("metrics.json"))) == len(finished)
