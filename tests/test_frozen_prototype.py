"""prototype.freeze=true: ProPETL's masks over a prototype drawn from prototype.seed and never trained (issue 25).
A task then keeps only its masks and its head; the seed in its config draws the prototype again on loading."""
from __future__ import annotations

import pytest
import torch
from conftest import TINY, tiny_batch
from test_methods import PROTOTYPES, build, logits, train_steps
from test_storage import CASES, HEAD

from propetl import methods
from propetl.api import ProPETLConfig, get_propetl_model
from propetl.configs import ConfigError, ModelSetup
from propetl.models import backbone
from propetl.report.runs import row_label
from propetl.report.stats import mask_ablation, paired_comparisons
from propetl.storage import accounting, checkpoint
from propetl.validate import validate

L = TINY["layers"]
FROZEN = "prototype.freeze=true"


def frozen(tiny_cfg, prototype, *overrides):
    return build(tiny_cfg, "propetl", prototype, *CASES[prototype][0], FROZEN, *overrides)


def prototype_tensors(model) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in methods.petl_weights(model).base_tensors().items()}


@pytest.mark.parametrize("prototype", PROTOTYPES)
def test_drawn_from_its_seed_and_never_trained(tiny_cfg, prototype):
    model, _ = frozen(tiny_cfg, prototype)
    store = methods.petl_weights(model)
    assert store.frozen and not any(p.requires_grad for p in store.weights.values())
    before = prototype_tensors(model)
    torch.manual_seed(123)                                         # the global RNG does not draw it: the seed does
    again, _ = frozen(tiny_cfg, prototype)
    other, _ = frozen(tiny_cfg, prototype, "prototype.seed=1")
    for name, tensor in before.items():
        assert torch.equal(tensor, prototype_tensors(again)[name])
        if store.specs[name].masked:
            assert not torch.equal(tensor, prototype_tensors(other)[name]), f"seed 1 drew the same {name}"
            assert tensor.abs().min() > 0 or tensor.abs().mean() > 0.01, f"{name} too small to select from"
    train_steps(model, steps=3, lr=0.05)
    for name, tensor in prototype_tensors(model).items():
        assert torch.equal(tensor, before[name]), f"the frozen {name} moved"
    trainable = {n for n, p in store.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".scores") for n in trainable)      # only the masks learn (and the head)


def test_lora_b_is_drawn_non_zero(tiny_cfg):
    """Trained LoRA starts B at zero; a frozen B of zeros would make every mask meaningless."""
    model, _ = frozen(tiny_cfg, "lora")
    for target in ("query", "value"):
        assert methods.petl_weights(model).weights[f"{target}_B"].abs().sum() > 0


@pytest.mark.parametrize("prototype", PROTOTYPES)
def test_gradients_reach_the_mask_scores_only(tiny_cfg, prototype):
    model, _ = frozen(tiny_cfg, prototype)
    model.train()
    model(**tiny_batch(seed=5)).loss.backward()
    store = methods.petl_weights(model)
    for name, parameter in store.named_parameters():
        if name.endswith(".scores"):
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, f"no gradient reaches {name}"
        else:
            assert parameter.grad is None, f"{name} of the frozen prototype got a gradient"


@pytest.mark.parametrize("prototype", PROTOTYPES)
def test_keeps_masks_and_head_only_and_reloads_identically(tiny_cfg, tmp_path, prototype):
    _, per_layer, masked = CASES[prototype]
    model, cfg = frozen(tiny_cfg, prototype, "storage.mask_coding=bits")
    train_steps(model, steps=3, lr=0.05)
    expected = logits(model)
    folder = checkpoint.save_checkpoint(model, ModelSetup.from_config(cfg), tmp_path / "checkpoint")
    assert not (folder / "shared" / checkpoint.DENSE_FILE["propetl"]).exists()       # no prototype tensor
    loaded, _ = checkpoint.load_checkpoint(folder)
    assert torch.equal(logits(loaded), expected)
    # storage by hand: no float of the prototype, one bit a mask entry (each tensor padded to bytes), the head
    f = accounting.account(model, ModelSetup.from_config(cfg), backbone_params=1)
    assert f["stored_params"] == f["prototype_params"] == 0
    assert f["mask_entries"] == L * sum(masked) and f["storage_bits"] == L * sum(masked)
    assert f["storage_bytes"] == sum(L * n // 8 for n in masked)
    assert f["storage_bytes_with_head"] == f["storage_bytes"] + 4 * HEAD
    assert f["storage_ratio_to_plain_petl"] == pytest.approx(L * sum(masked) / 32 / (L * per_layer))
    written = checkpoint.file_sizes(folder)
    masks_file = (folder / "shared" / checkpoint.LAYER_MASKS_FILE).stat().st_size
    assert written["file_bytes"] == masks_file                     # the masks file is all a task keeps but its head
    assert 0 < masks_file - f["storage_bytes"] < 800               # + the safetensors header and the masks' digest


def test_multitask_checkpoint_reloads_the_frozen_prototype(tiny_cfg, tmp_path):
    cfg = tiny_cfg("method=propetl", "prototype=adapter", "prototype.reduction_factor=4", FROZEN)
    torch.manual_seed(0)
    model = backbone.MultiTaskModel(ModelSetup.from_config(cfg), ["rte", "mrpc"], [2, 2], for_training=True, task_masks=True)
    before = prototype_tensors(model)
    checkpoint.save_checkpoint(model, ModelSetup.from_config(cfg), tmp_path / "mt")
    loaded, _ = checkpoint.load_multitask(tmp_path / "mt")
    for name, tensor in prototype_tensors(loaded).items():
        assert torch.equal(tensor, before[name])


@pytest.mark.parametrize("overrides,message", [
    (["method=petl", FROZEN], "prototype.freeze=True is invalid; allowed: false with method=petl"),
    (["prototype.freeze=maybe"], "prototype.freeze='maybe' is invalid; allowed: true or false"),
    ([FROZEN, "prototype.seed=-1"], "prototype.seed=-1 is invalid"),
])
def test_bad_settings_are_refused_in_one_line(tiny_cfg, overrides, message):
    with pytest.raises(ConfigError) as error:
        validate(tiny_cfg(*overrides))
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_python_api_freezes_too(tiny_model_dir):
    from transformers import AutoModelForSequenceClassification
    model = get_propetl_model(AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2),
                              ProPETLConfig(prototype="adapter", freeze=True, prototype_seed=3))
    store = methods.petl_weights(model.model if hasattr(model, "model") else model)
    assert store.frozen and not any(p.requires_grad for p in store.weights.values())


def _run(seed: int, score: float, **fields) -> dict:
    base = {"model": "m", "task": "stsb", "method": "propetl", "prototype": "adapter", "mask_kind": "learned",
            "mask_sparsity": 0.5, "seed": seed, "test": {"pearson": score, "spearmanr": score}, "glue_score": score,
            "storage": {}}
    return {**base, **fields}


def test_report_keeps_frozen_runs_apart():
    """Their own row; never the learned arm of the mask ablation nor ProPETL in ProPETL − PETL."""
    trained = [_run(s, 0.8) for s in (42, 43)]
    frozen_runs = [_run(s, 0.7, prototype_frozen=True) for s in (42, 43)]
    random = [_run(s, 0.5, mask_kind="random") for s in (42, 43)]
    plain = [_run(s, 0.75, method="petl") for s in (42, 43)]
    assert row_label(frozen_runs[0]) == "ProPETL-Adapter (frozen prototype)"
    assert row_label(trained[0]) == "ProPETL-Adapter"
    (kinds,) = mask_ablation(trained + frozen_runs + random).values()
    assert kinds["learned"] == trained
    comparisons = paired_comparisons(trained + frozen_runs + plain, trained + frozen_runs + random)
    pro_vs_petl = [c for c in comparisons if c["comparison"] == "ProPETL − PETL" and c["metric"] == "glue_score"]
    assert [round(c["mean_a"], 6) for c in pro_vs_petl] == [80.0]
