"""The configs ship inside the package, and Hydra's config search path adds a user's own: the wheel holds
every config, and a task, model or prototype in a --config-dir folder is an option like the shipped ones."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import tiny_text_overrides
from omegaconf import OmegaConf
from test_cli import propetl_train

from propetl.cli.command_line import check_command_line
from propetl.cli.evaluate import evaluate_checkpoint
from propetl.configs import CONF_DIR, ConfigError, compose, config_dirs, group_choices, group_option
from propetl.storage.checkpoint import CheckpointError
from propetl.validate import validate

REPO = Path(__file__).resolve().parents[1]


def user_option(folder: Path, group: str, name: str, copy_of: str) -> Path:
    """A user's config folder with `group`/`name`.yaml, a copy of a shipped option (a task named after itself)."""
    cfg = OmegaConf.load(CONF_DIR / group / f"{copy_of}.yaml")
    if group == "task":
        cfg.name = name
    (folder / group).mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, folder / group / f"{name}.yaml")
    return folder


def test_the_repos_conf_is_the_packaged_tree():
    """Users and the README point at conf/; installs read propetl/conf; they are the same files."""
    assert CONF_DIR == REPO / "propetl" / "conf"
    assert (REPO / "conf").is_symlink() and (REPO / "conf").resolve() == CONF_DIR


@pytest.mark.parametrize("group,copy_of", [("task", "rte"), ("model", "minilm"), ("prototype", "lora")])
def test_a_user_option_on_the_search_path_is_accepted(tmp_path, group, copy_of):
    folder = user_option(tmp_path / "conf", group, f"my{group}", copy_of)
    assert f"my{group}" in group_choices(group, [f"file://{folder}"]) and f"my{group}" not in group_choices(group)
    check_command_line(["--config-dir", str(folder), f"{group}=my{group}"])
    check_command_line(["-m", f"hydra.searchpath=[file://{folder}]", f"{group}=my{group},{copy_of}"])
    with pytest.raises(ConfigError, match=f"^{group}=my{group} is not a known {group}; choose one of: .*{copy_of}"):
        check_command_line([f"{group}=my{group}"])


def test_a_user_task_composes_validates_and_its_keys_are_known(tmp_path):
    folder = user_option(tmp_path / "conf", "task", "mytask", "rte")
    search_path = [f"file://{folder}"]
    cfg = compose(["task=mytask"], search_path)
    assert cfg.task.name == "mytask" and cfg.task.local.folder == "RTE"
    validate(cfg, search_path)
    with pytest.raises(ConfigError, match="^task.name='mytask' is invalid; allowed: cola, "):
        validate(cfg, [])                                  # without the user's folder the task is unknown
    assert group_option("task", "mytask", search_path).local.folder == "RTE"
    with pytest.raises(ConfigError, match="^task=mytask is not a known task; choose one of: cola, "):
        group_option("task", "mytask", [])                 # propetl-eval of a user's task without its folder
    check_command_line(["--config-dir", str(folder), "task=mytask", "task.epochs=2"])
    with pytest.raises(ConfigError, match="did you mean task.epochs"):
        check_command_line(["--config-dir", str(folder), "task=mytask", "task.epoch=2"])
    validate(compose(["mode=multitask", "tasks=[mytask,rte]"], search_path), search_path)


def test_a_missing_config_dir_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"^--config-dir \S*nope: no such folder$"):
        check_command_line(["--config-dir", str(tmp_path / "nope"), "task=rte"])


@pytest.mark.slow
def test_a_user_task_trains_through_config_dir(tmp_path, glue_dir, tiny_text_model_dir):
    folder = user_option(tmp_path / "conf", "task", "mytask", "rte")
    result = propetl_train(tmp_path, "--config-dir", str(folder), "task=mytask", "trainer.max_steps=2",
                           *tiny_text_overrides(tiny_text_model_dir, glue_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert (metrics["task"], metrics["steps"]) == ("mytask", 2) and 0 <= metrics["glue_score"] <= 1
    # propetl-eval (and propetl-export) read the run's checkpoint with the same --config-dir, and only with it
    with pytest.raises(CheckpointError, match="tasks='mytask' is invalid; allowed: cola, "):
        evaluate_checkpoint(tmp_path / "run" / "checkpoint", "test", data_dir=glue_dir)
    with config_dirs([str(folder)]):
        scored = evaluate_checkpoint(tmp_path / "run" / "checkpoint", "test", merge=False, data_dir=glue_dir)
    assert scored["accuracy"] == pytest.approx(metrics["test"]["accuracy"])


def test_the_wheel_holds_every_config_and_the_light_entry(tmp_path):
    """Built from a copy of the sources (no build/ left in the checkout); scripts/check_wheel.sh installs and runs it."""
    source = tmp_path / "src"
    for package in ("propetl", "hydra_plugins"):  # hydra_plugins: hydra/launcher=fused
        shutil.copytree(REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(tmp_path / "dist"), str(source)], check=True, capture_output=True, timeout=600)
    (wheel,) = (tmp_path / "dist").glob("propetl-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"propetl/conf/{p.relative_to(CONF_DIR).as_posix()}" for p in CONF_DIR.rglob("*.yaml")}
    assert len(shipped) >= 30 and shipped <= names, sorted(shipped - names)
    assert "hydra_plugins/propetl_fused_launcher/fused_launcher.py" in names
    entry_points = next(zipfile.Path(wheel, n) for n in names if n.endswith(".dist-info/entry_points.txt")).read_text()
    assert "propetl-train = propetl.cli.train:main" in entry_points
