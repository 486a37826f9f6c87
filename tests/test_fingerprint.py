"""The fingerprint is the whole computation (issue 29): every key that changes what a run computes decides skip and
resume (the attack's keys among them: data.max_length, trainer.warmup_ratio, trainer.head_lr, trainer.weight_decay,
other data files under data.dir), keys that change nothing do not, and the same files under another path match.
Sweep folder names leave out exactly keys that change nothing."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import compose_cfg, write_mnli
from omegaconf import OmegaConf

from propetl import configs
from propetl.run import fingerprint, rundir
from propetl.run.resume import Checkpointer
from propetl.storage.files import seal

COMPUTED = ["data.max_length=64", "trainer.warmup_ratio=0.2", "trainer.head_lr=0.01", "trainer.weight_decay=0.0",
            "trainer.eval_batch_size=32", "storage.dtype=bf16", "task.epochs=3", "prototype.init_std=0.1",
            "mask.combine=and"]
NOT_COMPUTED = ["logger.mode=disabled", "logger.project=other", "trainer.progress=false", "trainer.threads=1",
                "trainer.device=cpu", "trainer.log_every_steps=1", "trainer.resume=false", "trainer.save_steps=5",
                "run_dir.allow_other_files=true", "data.allow_hub=false", "task.report.title=Other"]


@pytest.fixture
def data_copy(tmp_path, glue_dir) -> Path:
    """RTE's files in a folder of their own (the same bytes as the linked GLUE folder's)."""
    shutil.copytree(glue_dir / "RTE", tmp_path / "glue" / "RTE")
    return tmp_path / "glue"


def test_every_computed_key_changes_it_and_others_do_not(glue_dir):
    base = fingerprint.fingerprint(compose_cfg([f"data.dir={glue_dir}"]))
    for override in COMPUTED:
        changed = fingerprint.fingerprint(compose_cfg([f"data.dir={glue_dir}", override]))
        assert fingerprint.differences(base, changed), override
    for override in NOT_COMPUTED:
        assert fingerprint.fingerprint(compose_cfg([f"data.dir={glue_dir}", override])) == base, override


def test_the_data_counts_by_content_not_by_path(glue_dir, data_copy):
    base = fingerprint.fingerprint(compose_cfg([f"data.dir={glue_dir}"]))
    assert fingerprint.fingerprint(compose_cfg([f"data.dir={data_copy}"])) == base      # the same files elsewhere
    (data_copy / "RTE" / "train.tsv").write_text((data_copy / "RTE" / "train.tsv").read_text()[:-200])
    changed = fingerprint.fingerprint(compose_cfg([f"data.dir={data_copy}"]))
    assert [key for key, *_ in fingerprint.differences(base, changed)] == [fingerprint.DATA_KEY]


def test_a_t5_mnli_run_hashes_the_mismatched_dev_set_it_selects_on(tmp_path):
    """T5 MNLI selects on dev_mismatched.tsv (paper.md §5.3): its data sha256 follows that file; the encoder's does not
    read it, nor does T5 under data.protocol=full_dev."""
    write_mnli(tmp_path, {"train.tsv": 3, "dev_matched.tsv": 2, "dev_mismatched.tsv": 2})
    runs = {"t5": ["model=t5-small", "task=mnli"], "encoder": ["task=mnli"],
            "t5 full_dev": ["model=t5-small", "task=mnli", "data.protocol=full_dev"]}
    before = {run: fingerprint.data_sha256(compose_cfg([*o, f"data.dir={tmp_path}"])) for run, o in runs.items()}
    write_mnli(tmp_path, {"dev_mismatched.tsv": 1})
    after = {run: fingerprint.data_sha256(compose_cfg([*o, f"data.dir={tmp_path}"])) for run, o in runs.items()}
    assert [run for run in runs if before[run] != after[run]] == ["t5"]


@pytest.mark.parametrize("override", ["data.max_length=64", "trainer.warmup_ratio=0.2", "trainer.head_lr=0.01",
                                      "trainer.weight_decay=0.0"])
def test_a_finished_run_of_another_computation_is_not_skipped(tmp_path, override, glue_dir):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = compose_cfg([f"data.dir={glue_dir}"])
    (run_dir / "metrics.json").write_text(json.dumps({"glue_score": 50.0,
                                                      "data_sha256": fingerprint.data_sha256(cfg)}))
    rundir.write_record(run_dir, cfg, [])
    assert rundir.finished_run(run_dir, fingerprint.fingerprint(cfg)) is not None
    key = override.split("=")[0]
    with pytest.raises(rundir.RunDirectoryError, match=f"finished run of another config \\(.*{key}="):
        rundir.finished_run(run_dir, fingerprint.fingerprint(compose_cfg([f"data.dir={glue_dir}", override])))


def test_a_finished_run_of_other_data_is_not_skipped(tmp_path, glue_dir, data_copy):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = compose_cfg([f"data.dir={data_copy}"])
    (run_dir / "metrics.json").write_text(json.dumps({"glue_score": 50.0, "data_sha256": fingerprint.data_sha256(cfg)}))
    rundir.write_record(run_dir, cfg, [])
    (data_copy / "RTE" / "dev.tsv").write_text((data_copy / "RTE" / "dev.tsv").read_text()[:-100])
    with pytest.raises(rundir.RunDirectoryError, match=f"{fingerprint.DATA_KEY}="):
        rundir.finished_run(run_dir, fingerprint.fingerprint(cfg))


def test_a_resume_of_another_computation_is_refused(tmp_path, glue_dir, monkeypatch):
    monkeypatch.setattr("propetl.run.resume.check_state", lambda meta, directory: None)   # a state.json of a fingerprint only
    run_dir = tmp_path / "run"
    (run_dir / "resume").mkdir(parents=True)
    saved = Checkpointer(run_dir, compose_cfg([f"data.dir={glue_dir}"])).fingerprint
    (run_dir / "resume" / "state.json").write_text(json.dumps({"fingerprint": saved}))
    seal(run_dir / "resume")
    for override in ("data.max_length=64", "trainer.warmup_ratio=0.2", "trainer.head_lr=0.01"):
        checkpointer = Checkpointer(run_dir, compose_cfg([f"data.dir={glue_dir}", override]))
        with pytest.raises(Exception, match=f"trained with another config \\(.*{override.split('=')[0]}="):
            checkpointer.check_fingerprint()
    Checkpointer(run_dir, compose_cfg([f"data.dir={glue_dir}", "trainer.threads=1"])).check_fingerprint()


def test_sweep_folder_names_leave_out_only_keys_that_change_nothing():
    hydra_cfg = OmegaConf.load(configs.CONF_DIR / "hydra" / "default.yaml")
    excluded = list(hydra_cfg.job.config.override_dirname.exclude_keys)
    assert "data.dir" not in excluded
    for key in excluded:
        assert key.startswith("hydra.") or any(key == n or key.startswith(f"{n}.") for n in fingerprint.NOT_COMPUTED), key


def test_a_random_mask_follows_the_run_s_seed_unless_mask_seed_is_given():
    """The ablation's random arm: three seeds, three masks (mask.seed defaulted to 0 once: one mask for all)."""
    from propetl.configs import MaskConfig
    from propetl.methods import make_weights, prototype_config

    def random_masks(*overrides: str) -> dict:
        cfg = compose_cfg(["mask.kind=random", "prototype=lora", *overrides])
        weights = make_weights(cfg.method.name, prototype_config(cfg.prototype), MaskConfig.from_config(cfg.mask), 32, 2)
        return {name: masks().clone() for name, masks in weights.masks.items()}

    first, second = random_masks("seed=42"), random_masks("seed=43")
    assert all((first[n] != second[n]).float().mean() > 0.05 for n in first)          # Hamming distance > 0
    assert all(torch.equal(random_masks("seed=42")[n], first[n]) for n in first)       # and reproducible
    pinned = [random_masks(f"seed={s}", "mask.seed=7") for s in (42, 43)]
    assert all(torch.equal(pinned[0][n], pinned[1][n]) for n in first)                # mask.seed given: one mask
    learned = [fingerprint.config_part(compose_cfg([f"mask.seed={s}"])) for s in (0, 42)]
    assert learned[0] == learned[1]                        # a learned mask's fingerprint does not hold mask.seed
