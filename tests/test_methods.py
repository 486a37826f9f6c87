"""The same checks over every method and prototype (a PEFT-style test matrix), on a tiny random BERT."""
from __future__ import annotations

import pytest
import torch
from conftest import TINY, tiny_batch

from propetl import methods
from propetl.configs import ModelSetup
from propetl.methods.lora import LoRALinear
from propetl.methods.masks import ones_per_mask
from propetl.models import backbone
from propetl.storage import checkpoint

PROTOTYPES = ["adapter", "lora", "prefix"]
PETL_METHODS = [("petl", p) for p in PROTOTYPES] + [("propetl", p) for p in PROTOTYPES]


def build(tiny_cfg, method, prototype, *overrides, for_training=True):
    cfg = tiny_cfg(f"method={method}", f"prototype={prototype}", *overrides)
    torch.manual_seed(0)
    return backbone.build(ModelSetup.from_config(cfg), 2, for_training=for_training), cfg


def train_steps(model, steps: int = 3, lr: float = 1e-2, seed: int = 0):
    """A few real optimizer steps so that every tensor (LoRA's B starts at zero) has moved."""
    if hasattr(type(model), "parameter_groups"):        # the API's ProPETLModel trains from its groups only
        parameters = [dict(group, lr=lr) for group in model.parameter_groups()]
    else:
        parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=lr)
    model.train()
    for step in range(steps):
        optimizer.zero_grad()
        model(**tiny_batch(seed=seed + step)).loss.backward()
        optimizer.step()
    model.eval()


def logits(model, seed: int = 99):
    batch = tiny_batch(seed=seed)
    batch.pop("labels")
    with torch.no_grad():
        return model(**batch).logits


# ----------------------------------------------------------------------------- which parameters train

@pytest.mark.parametrize("method,prototype", PETL_METHODS + [("finetune", "adapter")])
def test_forward_pass_and_trainable_parameters(tiny_cfg, method, prototype):
    model, _ = build(tiny_cfg, method, prototype)
    out = model(**tiny_batch())
    assert out.logits.shape == (3, 2) and torch.isfinite(out.loss)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    heads = backbone.head_parameter_names(model)
    assert heads and heads <= trainable
    if method == "finetune":
        assert trainable == {n for n, _ in model.named_parameters()}
        return
    petl = {n for n in trainable if n.startswith(methods.WEIGHTS_ATTRIBUTE + ".")}
    assert trainable == heads | petl, "the backbone must be frozen"
    scores = {n for n in petl if n.endswith(".scores")}
    assert bool(scores) == (method == "propetl")


@pytest.mark.parametrize("prototype", PROTOTYPES)
def test_propetl_shares_one_prototype_tensor(tiny_cfg, prototype):
    shared, _ = build(tiny_cfg, "propetl", prototype)
    plain, _ = build(tiny_cfg, "petl", prototype)
    specs = methods.PROTOTYPES[prototype].specs(tiny_cfg(f"prototype={prototype}").prototype, TINY["hidden"])
    for name, tensor in methods.petl_weights(shared).base_tensors().items():
        assert tuple(tensor.shape) == specs[name].shape                 # one layer's module, once
    for name, tensor in methods.petl_weights(plain).base_tensors().items():
        assert tuple(tensor.shape) == (TINY["layers"], *specs[name].shape)
    # every layer wrapper reads the very same store object, registered once on the model
    store = methods.petl_weights(shared)
    layers = backbone.encoder_layers(shared)
    if prototype == "adapter":
        readers = [layer.output.weights for layer in layers]
    elif prototype == "lora":
        readers = [layer.attention.self.query.weights for layer in layers]
    else:
        readers = [layer.attention.self.__dict__["prefix_source"][0] for layer in layers]
    assert all(reader is store for reader in readers)
    assert sum(1 for n in shared.state_dict() if n.startswith(methods.WEIGHTS_ATTRIBUTE + ".weights.")) == \
        len(store.weights)


# ----------------------------------------------------------------------------- masks

@pytest.mark.parametrize("prototype", PROTOTYPES)
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9, 0.99])
def test_exact_mask_density(tiny_cfg, prototype, sparsity):
    model, _ = build(tiny_cfg, "propetl", prototype, f"mask.sparsity={sparsity}")
    masks = methods.petl_weights(model).binary_masks()
    assert masks
    for mask in masks.values():
        per_layer = mask.reshape(TINY["layers"], -1)
        n = per_layer.shape[1]
        assert torch.all(per_layer.sum(dim=1) == ones_per_mask(n, sparsity))
        assert torch.all((mask == 0) | (mask == 1))


@pytest.mark.parametrize("prototype", PROTOTYPES)
def test_gradients_reach_scores_and_prototype(tiny_cfg, prototype):
    model, _ = build(tiny_cfg, "propetl", prototype)
    train_steps(model, steps=1)                          # LoRA's B leaves zero, so A and the masks get signal
    model.train()
    model.zero_grad()
    model(**tiny_batch(seed=5)).loss.backward()
    store = methods.petl_weights(model)
    for name, parameter in store.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, f"no gradient reaches {name}"


@pytest.mark.parametrize("prototype", PROTOTYPES)
def test_masks_change_during_training(tiny_cfg, prototype):
    model, _ = build(tiny_cfg, "propetl", prototype)
    before = {n: m.clone() for n, m in methods.petl_weights(model).binary_masks().items()}
    train_steps(model, steps=5, lr=0.05)
    after = methods.petl_weights(model).binary_masks()
    assert any(not torch.equal(before[n], after[n]) for n in before)


@pytest.mark.parametrize("prototype", PROTOTYPES)
def test_mask_computed_once_per_step(tiny_cfg, prototype, monkeypatch):
    import propetl.methods.masks as masks_module

    calls = []
    original = masks_module.binarize
    monkeypatch.setattr(masks_module, "binarize", lambda *a: calls.append(1) or original(*a))
    model, _ = build(tiny_cfg, "propetl", prototype)
    model.train()
    model(**tiny_batch()).loss.backward()
    n_masked = len(methods.petl_weights(model).masks)
    assert len(calls) == n_masked                        # once per masked tensor, not once per layer call
    calls.clear()
    with torch.no_grad():
        model.eval()
        logits(model)
        logits(model)
    assert len(calls) == n_masked                        # evaluation reuses them until the scores change


@pytest.mark.parametrize("kind", ["random", "none"])
def test_random_and_none_masks(tiny_cfg, kind):
    model, _ = build(tiny_cfg, "propetl", "adapter", f"mask.kind={kind}", "mask.sparsity=0.5")
    store = methods.petl_weights(model)
    assert not store.score_parameters()                  # nothing to learn
    masks = {n: m() for n, m in store.masks.items()}
    if kind == "none":
        assert all(torch.all(m == 1) for m in masks.values())
        assert store.binary_masks() == {}                # nothing to store
    else:
        again, _ = build(tiny_cfg, "propetl", "adapter", f"mask.kind={kind}", "mask.sparsity=0.5")
        assert all(torch.equal(masks[n], methods.petl_weights(again).masks[n]()) for n in masks)  # seeded
        train_steps(model, steps=2)
        assert all(torch.equal(masks[n], m()) for n, m in store.masks.items())                   # fixed


def test_prefix_hook_runs_in_every_layer(tiny_cfg):
    """Fails loudly when transformers' attention internals move away from the hook."""
    model, _ = build(tiny_cfg, "propetl", "prefix")
    store = methods.petl_weights(model)
    store.hook_calls = 0
    logits(model)
    assert store.hook_calls == TINY["layers"]
    bare, _ = build(tiny_cfg, "finetune", "adapter")
    assert not torch.allclose(logits(model), logits(bare))


# ----------------------------------------------------------------------------- save, load, merge

@pytest.mark.parametrize("method,prototype", PETL_METHODS + [("finetune", "adapter")])
def test_save_load_gives_identical_predictions(tiny_cfg, tmp_path, method, prototype):
    model, cfg = build(tiny_cfg, method, prototype)
    train_steps(model)
    expected = logits(model)
    checkpoint.save_checkpoint(model, ModelSetup.from_config(cfg), tmp_path / "checkpoint")
    loaded, _ = checkpoint.load_checkpoint(tmp_path / "checkpoint")
    assert torch.equal(logits(loaded), expected)
    if method == "propetl":
        assert (tmp_path / "checkpoint" / "shared" / "layer_masks.safetensors").exists()
        for name, mask in methods.petl_weights(loaded).binary_masks().items():
            assert torch.equal(mask, methods.petl_weights(model).binary_masks()[name])


@pytest.mark.parametrize("method,prototype", PETL_METHODS)
def test_merged_inference_matches(tiny_cfg, method, prototype):
    model, _ = build(tiny_cfg, method, prototype)
    train_steps(model)
    expected = logits(model)
    methods.merge(model, backbone.encoder_layers(model), prototype)
    torch.testing.assert_close(logits(model), expected, rtol=1e-5, atol=1e-5)
    store = methods.petl_weights(model)
    if prototype == "lora":
        assert store is None
        assert not any(isinstance(m, LoRALinear) for m in model.modules())   # the bare model's cost
    else:
        assert not store.shared and not store.masks                          # plain per-layer modules


@pytest.mark.parametrize("prototype", PROTOTYPES)
def test_merge_after_loading(tiny_cfg, tmp_path, prototype):
    model, cfg = build(tiny_cfg, "propetl", prototype)
    train_steps(model)
    checkpoint.save_checkpoint(model, ModelSetup.from_config(cfg), tmp_path / "ck")
    loaded, _ = checkpoint.load_checkpoint(tmp_path / "ck")
    methods.merge(loaded, backbone.encoder_layers(loaded), prototype)
    torch.testing.assert_close(logits(loaded), logits(model), rtol=1e-5, atol=1e-5)
