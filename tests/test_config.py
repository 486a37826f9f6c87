"""Config composition of every group (Hydra compose API), the scaled defaults, and validation."""
from __future__ import annotations

import pytest
from conftest import compose_cfg
from omegaconf import OmegaConf

from propetl.cli.command_line import check_command_line, parse, search_path_of
from propetl.configs import ConfigError, compose, group_choices
from propetl.validate import validate

GLUE = ["cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb"]


def test_defaults_compose_and_validate():
    cfg = compose_cfg()
    validate(cfg)
    assert (cfg.model.name, cfg.task.name, cfg.prototype.name, cfg.method.name) == ("minilm", "rte", "adapter", "propetl")
    assert cfg.logger.mode == "offline"
    assert cfg.trainer.epochs == 20 and cfg.trainer.batch_size == 128          # the reference's settings


@pytest.mark.parametrize("group,choices", [
    ("task", GLUE), ("model", ["bert-base-uncased", "minilm", "roberta-base"]),
    ("prototype", ["adapter", "lora", "prefix"]), ("method", ["finetune", "peft", "petl", "propetl"]),
    ("mask", ["default"]), ("trainer", ["default"]), ("logger", ["wandb"]), ("data", ["glue"]),
])
def test_every_group_option_composes(group, choices):
    assert set(choices) <= set(group_choices(group))
    for choice in choices:
        needs = ["prototype=lora"] if (group, choice) == ("method", "peft") else []     # PEFT's LoRA only
        cfg = compose_cfg([f"{group}={choice}", *needs])
        OmegaConf.to_container(cfg, resolve=True)
        validate(cfg)


@pytest.mark.parametrize("task", GLUE)
def test_task_configs_are_complete(task):
    t = compose_cfg([f"task={task}"]).task
    assert t.name == task and t.num_labels in (1, 2, 3) and t.metrics and t.size in ("small", "large")
    assert t.selection_metric in (*t.metrics, "combined")
    assert "text_a" in t.local.columns and "label" in t.local.columns and t.hub.config
    assert t.epochs == (20 if t.size == "small" else 10)


@pytest.mark.parametrize("model,bottleneck,r,length", [("minilm", 32, 16, 32), ("roberta-base", 64, 32, 64)])
def test_prototype_sizes_scale_with_hidden_size(model, bottleneck, r, length):
    """The reference's sizes on 768-wide models, scaled for MiniLM's 384."""
    assert compose_cfg([f"model={model}", "prototype=adapter"]).prototype.bottleneck == bottleneck
    lora = compose_cfg([f"model={model}", "prototype=lora"]).prototype
    assert (lora.r, lora.alpha / lora.r) == (r, 1.5)
    assert compose_cfg([f"model={model}", "prototype=prefix"]).prototype.length == length


@pytest.mark.parametrize("prototype,sparsity,mask_lr", [("adapter", 0.5, 3e-3), ("lora", 0.9, 3e-2), ("prefix", 0.9, 1e-4)])
def test_mask_defaults_translate_the_reference(prototype, sparsity, mask_lr):
    """The reference's `sparsity` is the fraction KEPT (0.5 adapter, 0.1 LoRA/prefix); ours counts zeros."""
    mask = compose_cfg([f"prototype={prototype}"]).mask
    assert (mask.sparsity, mask.lr) == (sparsity, mask_lr)
    assert compose_cfg([f"prototype={prototype}", "mask.sparsity=0.7"]).mask.sparsity == 0.7


def test_overrides_from_the_brief():
    cfg = compose_cfg(["seed=43", "trainer.epochs=3", "trainer.max_steps=50", "logger.mode=disabled",
                       "data.dir=/somewhere", "model=roberta-base"])
    validate(cfg)
    assert (cfg.seed, cfg.trainer.epochs, cfg.trainer.max_steps, cfg.logger.mode, cfg.data.dir) == \
        (43, 3, 50, "disabled", "/somewhere")


@pytest.mark.parametrize("override,key", [
    ("mask.sparsity=1.0", "mask.sparsity"), ("mask.sparsity=-0.1", "mask.sparsity"), ("mask.kind=sometimes", "mask.kind"),
    ("trainer.epochs=0", "trainer.epochs"), ("trainer.batch_size=-8", "trainer.batch_size"),
    ("trainer.lr=0", "trainer.lr"), ("trainer.precision=fp8", "trainer.precision"),
    ("data.protocol=dev", "data.protocol"), ("logger.mode=maybe", "logger.mode"),
    ("trainer.max_steps=0", "trainer.max_steps"), ("trainer.warmup_ratio=1.5", "trainer.warmup_ratio"),
    ("data.group_by_length=maybe", "data.group_by_length"),
    ("seed=true", "seed"), ("data.split_seed=false", "data.split_seed"), ("mask.seed=true", "mask.seed"),
    ("trainer.threads=???", "trainer.threads"), ("data.max_train_examples=???", "data.max_train_examples"),  # not null
])
def test_invalid_values_give_one_line_naming_the_key(override, key):
    with pytest.raises(ConfigError) as error:
        validate(compose_cfg([override]))
    message = str(error.value)
    assert "\n" not in message and key in message and "allowed" in message


@pytest.mark.parametrize("argument,choices", [("task=nope", "cola"), ("prototype=nope", "adapter, lora, prefix"),
                                              ("method=nope", "finetune, peft, petl, propetl"), ("task=rte,nope", "rte")])
def test_unknown_group_options_are_caught_before_hydra(argument, choices):
    with pytest.raises(ConfigError) as error:
        check_command_line([argument])
    assert "nope" in str(error.value) and choices in str(error.value)
    check_command_line(["task=rte,mrpc", "seed=1,2", "trainer.max_steps=10"])       # sweeps of valid values pass


@pytest.mark.parametrize("argument,nearest", [
    ("+trainer.max_step=3", "trainer.max_steps"), ("trainer.max_step=3", "trainer.max_steps"),
    ("++mask.sparsty=0.5", "mask.sparsity"), ("-m task=rte,mrpc +trainer.eval_batchsize=8", "trainer.eval_batch_size"),
    ("prototype=lora prototype.alfa=2", "prototype.alpha"), ("~trainer.warmup", "trainer.warmup_steps"),
])
def test_unknown_keys_are_refused_with_the_nearest_known_key(argument, nearest):
    with pytest.raises(ConfigError) as error:
        check_command_line(argument.split())
    message = str(error.value)
    assert "\n" not in message and argument.split()[-1] in message and f"did you mean {nearest}?" in message


def test_search_path_is_hydra_searchpaths_list_only():
    """A hydra.searchpath that is not a list is Hydra's to refuse, not split into one folder per character."""
    assert search_path_of(parse(["hydra.searchpath=[file://a,pkg://b]"])) == ["file://a", "pkg://b"]
    assert search_path_of(parse(["hydra.searchpath=ab"])) == []


def test_known_keys_of_the_chosen_groups_pass():
    """A key of any swept option is known; keys added by an overlay (experiment, profile) are known with it."""
    check_command_line(["-m", "prototype=adapter,lora", "prototype.r=4", "hydra.run.dir=x", "hydra/launcher=joblib"])
    check_command_line(["profile=cpu", "prototype=prefix", "prototype.embedding_std=0.1", "reproduce.root=x"])
    check_command_line(["experiment=multitask", "mode=multitask", "tasks=[rte,mrpc]", "multitask.temperature=2"])


REPRODUCTIONS = ["table1", "sparsity_sweep", "ablation_masks", "multitask"]


def compose_with_hydra(overrides: list[str]):
    return compose(overrides, with_hydra=True)


@pytest.mark.parametrize("profile,model,tasks", [("cpu", "minilm", "stsb,sst2"), ("gpu", "minilm", "rte,mrpc,stsb,cola,sst2"),
                                                 ("paper", "roberta-base", "cola,sst2,mrpc,qqp,stsb,mnli,qnli,rte")])
@pytest.mark.parametrize("experiment", REPRODUCTIONS)
def test_reproduction_overlays_compose_under_every_profile(experiment, profile, model, tasks):
    validate(compose_cfg([f"experiment={experiment}", f"profile={profile}"]))
    cfg = compose_with_hydra([f"experiment={experiment}", f"profile={profile}"])
    assert cfg.model.name == model and cfg.reproduce.experiment == experiment and cfg.reproduce.profile == profile
    params = cfg.hydra.sweeper.params
    assert params.seed == "42,43,44"
    assert params.task == tasks
    assert cfg.hydra.sweep.dir == f"outputs/reproduce/{profile}/{experiment}"
    assert cfg.hydra.sweep.subdir == cfg.hydra.job.override_dirname            # one stable folder per run
    if experiment in ("table1", "multitask"):
        assert (params.method, params.prototype) == ("petl,propetl", "adapter,lora,prefix")
        if experiment == "multitask":
            small = "rte,mrpc,stsb,cola"                          # the gpu profile's multi-task runs: the small tasks
            assert cfg.mode == "multitask" and ",".join(cfg.tasks) == (small if profile == "gpu" else tasks)
    else:
        assert cfg.method.name == "propetl"


def test_cpu_profile_runs_two_single_threaded_jobs_at_a_time():
    cfg = compose_with_hydra(["experiment=table1", "profile=cpu"])
    assert cfg.hydra.launcher.n_jobs == 2 and cfg.trainer.threads == 1
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher")
    assert "experiment" in cfg.hydra.job.config.override_dirname.exclude_keys


@pytest.mark.parametrize("prototype", ["adapter", "lora", "prefix"])
def test_cpu_profile_is_sized_for_learnable_tasks(prototype):
    """STS-B whole, SST-2 on a 6,000-sentence sample, one epoch, half of every mask kept."""
    cfg = compose_cfg(["experiment=table1", "profile=cpu", f"prototype={prototype}", "task=sst2"])
    assert cfg.data.max_train_examples == 6000 and cfg.trainer.epochs == 1 and cfg.trainer.batch_size == 32
    assert cfg.mask.sparsity == 0.5 and list(cfg.reproduce.tasks) == ["stsb", "sst2"]
    assert compose_cfg(["profile=cpu", f"prototype={prototype}", "mask.sparsity=0.9"]).mask.sparsity == 0.9
    finetune = compose_cfg(["profile=cpu", "method=finetune"]).trainer
    assert (finetune.lr, finetune.head_lr) == (2e-5, 1e-3)          # a fresh head needs more than 2e-5 in one epoch


def test_reproduce_plan_is_valid_command_lines():
    """Every sweep of every profile's plan passes the command-line check (known groups and options)."""
    reproduce = reproduce_module()
    assert set(reproduce.PLANS) == {"cpu", "gpu", "paper"}
    for profile, plan in reproduce.PLANS.items():
        table1 = [overrides for experiment, overrides in plan if experiment == "table1"]
        assert any(not any(o.startswith(("method=", "prototype=")) for o in overrides) for overrides in table1)  # the PETL grid
        assert any("method=finetune" in overrides for overrides in table1)   # and the fine-tuning row
        for experiment, overrides in plan:
            command = reproduce.sweep_command(profile, experiment, overrides, [])
            check_command_line(command[2:])
            compose_with_hydra([o for o in command[2:] if "," not in o])


def sweep_jobs(command: list[str]) -> list[list[str]]:
    """The jobs a `propetl-train -m ...` command line runs, as Hydra's basic sweeper splits them: the overlay's and the
    profile's hydra.sweeper.params, a command-line value replacing a key's list, their product. Runs nothing."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    arguments = command[2:]
    params = compose_with_hydra([o for o in arguments if "," not in o]).hydra.sweeper.params
    overrides = OverridesParser.create().parse_overrides([*(f"{k}={v}" for k, v in params.items()), *arguments])
    (jobs,) = BasicSweeper.split_arguments(overrides, None)
    return jobs


def test_the_paper_profile_plans_table2s_three_arms_times_three_seeds():
    """make reproduce-tables PROFILE=paper: T5-base multi-task GLUE, ProPETL-Adapter and the reference's two plain
    baselines (glue/normal_pfeiffer_adapter_reduction12: petl; glue/finetune, its sources prefixed with the task name),
    3 seeds each, all with Table 2's settings (paper.md §5.2). Planned and composed, not run."""
    from propetl.models.t5 import adds_task_prefix

    reproduce = reproduce_module()
    (overrides,) = [o for experiment, o in reproduce.PLANS["paper"] if experiment == "t5_multitask"]
    jobs = sweep_jobs(reproduce.sweep_command("paper", "t5_multitask", overrides, []))
    arms = sorted((job_value(job, "method"), job_value(job, "seed")) for job in jobs)
    assert arms == sorted((m, s) for m in ("propetl", "petl", "finetune") for s in ("42", "43", "44"))
    for job in jobs:
        cfg = compose_cfg(job)
        validate(cfg)
        method = cfg.method.name
        assert (cfg.model.name, cfg.model.family, cfg.mode, list(cfg.tasks)) == (
            "t5-base", "t5", "multitask", ["rte", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "cola"])
        t = cfg.trainer
        assert (t.lr, t.max_steps, t.batch_size, t.eval_every_steps, t.warmup_steps) == (3e-4, 20000, 128, 2000, 500)
        assert (cfg.multitask.temperature, t.label_smoothing, t.weight_decay) == (10, 0.1, 0.0)
        assert cfg.prototype.name == "adapter" and cfg.prototype.bottleneck == 64          # rf 12 on t5-base
        assert adds_task_prefix(method) == (method == "finetune")                          # add_prefix=True: finetune
        assert cfg.reproduce.experiment == "t5_multitask" and cfg.reproduce.profile == "paper"
        if method == "propetl":
            assert (cfg.mask.kind, cfg.mask.sparsity, cfg.mask.combine, t.mask_lr_ratio) == ("learned", 0.7, "or", 10)


def job_value(job: list[str], key: str) -> str:
    (value,) = [o.partition("=")[2] for o in job if o.partition("=")[0] == key]
    return value


def reproduce_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "reproduce.py"
    spec = importlib.util.spec_from_file_location("reproduce", path)
    reproduce = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reproduce)
    return reproduce


@pytest.mark.parametrize("target,script", [("reproduce-tables", "scripts/reproduce.py --profile cpu"),
                                           ("results", "scripts/collect_results.py --profile cpu"),
                                           ("tables", "propetl.report.command outputs/reproduce/cpu"),
                                           ("check-wheel", "scripts/check_wheel.sh")])
def test_make_targets_run_their_scripts(target, script):
    """The README's make commands reach the scripts (`make -n` prints the recipe, runs nothing)."""
    import shutil
    import subprocess
    from pathlib import Path

    if shutil.which("make") is None:
        pytest.skip("no make on this machine")
    done = subprocess.run(["make", "-n", target], cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
    assert done.returncode == 0 and "warning" not in done.stderr.lower(), done.stderr
    assert script in done.stdout


@pytest.mark.parametrize("method", ["petl", "propetl"])
def test_cpu_profile_starts_prefix_small_in_both_arms_and_other_profiles_keep_the_reference(method):
    """conf/profile_prototype/cpu_prefix.yaml: N(0, 0.02^2) on the cpu profile (N(0, 1) collapses plain prefix
    tuning at its lr; results/prefix_embedding_std/), the reference's N(0, 1) everywhere else; a command line wins."""
    def std(*overrides):
        return compose_cfg([f"method={method}", *overrides]).prototype.get("embedding_std")
    assert std("profile=cpu", "prototype=prefix", "experiment=table1") == 0.02
    assert std("profile=gpu", "prototype=prefix") == std("prototype=prefix") == 1.0
    assert std("profile=cpu", "prototype=prefix", "prototype.embedding_std=1.0") == 1.0
    assert std("profile=cpu", "prototype=lora") is None
