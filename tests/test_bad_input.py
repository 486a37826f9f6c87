"""Bad input refused in one line before any work starts (issue 29): seeds, model paths, max_length against the model's
positions, a user's task (metrics, label counts), broken YAML on --config-dir, a base checkpoint without
mode=multitask. The data's own checks (split sizes, label ranges) are in tests/test_data.py."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import compose_cfg

from propetl.cli.command_line import check_command_line
from propetl.configs import CONF_DIR, ConfigError, compose
from propetl.models.backbone import ModelError
from propetl.validate import MAX_SEED, validate


def refusal(cfg, search_path=None, error=ConfigError) -> str:
    with pytest.raises(error) as caught:
        validate(cfg, search_path)
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("key", ["seed", "data.split_seed", "mask.seed"])
@pytest.mark.parametrize("value", [99999999999999999999, MAX_SEED + 1, -1])
def test_seeds_beyond_int64_or_negative_are_refused(key, value):
    message = refusal(compose_cfg([f"{key}={value}"]))
    assert message.startswith(f"{key}={value} is invalid") and str(MAX_SEED) in message
    validate(compose_cfg([f"{key}={MAX_SEED}"]))           # the edges pass
    validate(compose_cfg([f"{key}=0"]))


@pytest.mark.parametrize("path,error", [("pkg://nonexistent", ModelError), ("pkg://propetl/no_such_model", ModelError),
                                        ("/no/such/model", ModelError), ("''", ConfigError)])
def test_a_missing_or_empty_model_path_is_one_line_naming_it(path, error):
    message = refusal(compose_cfg([f"model.name_or_path={path}"]), error=error)
    assert f"model.name_or_path={path.strip(chr(39))!r}" in message and "pkg://package/folder" in message


def test_max_length_beyond_the_models_positions_names_both(tiny_cfg):
    """tiny_model_dir has max_position_embeddings=64: read from its config.json before anything loads."""
    message = refusal(tiny_cfg("data.max_length=65"))
    assert message.startswith("data.max_length=65 is invalid") and "1..64" in message
    validate(tiny_cfg("data.max_length=64"))


def user_task(folder: Path, **changes) -> list[str]:
    """conf/task/rte.yaml as a user's task `mytask` (with `changes`) in folder/task/: its search path."""
    rte = yaml.safe_load((CONF_DIR / "task" / "rte.yaml").read_text())
    task = {**{key: value for key, value in rte.items() if key != "report"}, "name": "mytask", **changes}
    (folder / "task").mkdir(parents=True, exist_ok=True)
    (folder / "task" / "mytask.yaml").write_text(yaml.safe_dump(task))
    return [f"file://{folder}"]


@pytest.mark.parametrize("mode", ["single", "multitask"])
def test_a_user_glue_task_on_t5_is_refused_naming_the_tasks_with_a_text_format(tmp_path, mode):
    search_path = user_task(tmp_path)
    chosen = ["task=mytask"] if mode == "single" else ["mode=multitask", "tasks=[rte,mytask]"]
    message = refusal(compose(["model=t5-small", *chosen], search_path), search_path)
    expected = ("task.name='mytask' is invalid; allowed: a task with a text-to-text format with model.family=t5: "
                "cola, sst2, mrpc, rte, stsb, qqp, mnli, qnli, xsum")
    assert expected in message and (mode == "single" or message.startswith("tasks: mytask: ")), message


@pytest.mark.parametrize("changes,named", [
    ({"metrics": ["accuracy", "bleu"]}, ["task.metrics=['accuracy', 'bleu']", "accuracy, f1, matthews"]),
    ({"metrics": ["pearson"]}, ["task.metrics=['pearson']", "accuracy, f1, matthews"]),        # not for classes
    ({"selection_metric": "bleu"}, ["task.selection_metric='bleu'", "allowed: accuracy"]),
    ({"selection_metric": "combined"}, ["task.selection_metric='combined'", "allowed: accuracy"]),  # one metric
    ({"label_names": ["yes", "no", "maybe"]}, ["task.label_names=", "2 distinct names"]),
    ({"label_range": [0, 5]}, ["task.label_range=[0, 5]", "regression task"]),
    ({"report": "My task"}, ["task.report='My task'", "a mapping"]),
    ({"report": {"order": 0}}, ["task.report.order=0", "a positive integer"]),
    ({"report": {"paper": {"Mine": [60, 70]}}}, ["task.report.paper={'Mine': [60, 70]}", "len(task.metrics)=1 numbers"]),
])
@pytest.mark.parametrize("mode", ["single", "multitask"])
def test_a_user_tasks_unknown_metric_is_refused_naming_the_known_ones(tmp_path, changes, named, mode):
    search_path = user_task(tmp_path, **changes)
    chosen = ["task=mytask"] if mode == "single" else ["mode=multitask", "tasks=[rte,mytask]"]
    message = refusal(compose(chosen, search_path), search_path)
    assert all(part in message for part in named), message
    assert mode == "single" or message.startswith("tasks: mytask: ")
    good = user_task(tmp_path / "good", metrics=["accuracy", "f1"], selection_metric="combined")
    validate(compose(chosen, good), good)


@pytest.mark.parametrize("value", [0, -2, 1.5, "two"])
def test_num_labels_must_be_a_positive_integer(value):
    message = refusal(compose_cfg([f"task.num_labels={value}"]))
    assert message.startswith(f"task.num_labels={value!r} is invalid") and "a positive integer" in message


def broken_yaml(folder: Path) -> Path:
    (folder / "task").mkdir(parents=True)
    path = folder / "task" / "mytask.yaml"
    path.write_text("name: mytask\nnum_labels: [2\nmetrics: {\n")
    return path


def test_broken_yaml_on_the_config_dir_is_one_line_naming_the_file(tmp_path):
    path = broken_yaml(tmp_path / "conf")
    with pytest.raises(ConfigError, match=rf"^{path}, line 3: not valid YAML: expected ',' or ']'"):
        check_command_line(["--config-dir", str(tmp_path / "conf"), "task=mytask"])
    check_command_line(["--config-dir", str(tmp_path / "conf"), "task=rte"])      # a file not chosen is not read


def test_broken_yaml_exits_2_with_one_line_and_no_run_folder(tmp_path):
    """The command line as a user types it: Hydra's traceback never shows."""
    path = broken_yaml(tmp_path / "conf")
    script = shutil.which("propetl-train") or str(Path(sys.executable).parent / "propetl-train")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}
    command = [script, "--config-dir", str(tmp_path / "conf"), "task=mytask", f"hydra.run.dir={tmp_path}/run"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300, env=env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"propetl-train: error: {path}, line 3: not valid YAML: "
                                                  "expected ',' or ']', but got ':'; fix the file"]
    assert not (tmp_path / "run").exists()


def test_a_base_checkpoint_without_multitask_mode_is_refused(tmp_path):
    message = refusal(compose_cfg([f"multitask.base_checkpoint={tmp_path}"]))
    assert message.startswith(f"multitask.base_checkpoint='{tmp_path}' is invalid") and "mode=multitask" in message


def test_multitask_finetuning_is_refused_on_an_encoder_and_taken_on_t5():
    """One backbone for every task, fully fine-tuned: Table 2's Fine-tune arm (T5, text to text); an encoder's multi-task
    model has no such arm, and says so in one line naming the value and the choices."""
    chosen = ["mode=multitask", "tasks=[rte,mrpc]", "method=finetune"]
    message = refusal(compose_cfg(chosen))
    assert message.startswith("method.name='finetune' is invalid; allowed: propetl or petl with mode=multitask")
    assert "finetune with model.family=t5" in message
    validate(compose_cfg(["model=t5-small", *chosen]))
