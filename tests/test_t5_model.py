"""The T5 model layer (models/t5.py, methods/adapter.py's T5 site) on a tiny random T5: the reference's adapter
placement (paper.md §2.3), one prototype for every encoder and decoder site, task OR site masks, merge, generate, loss."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from transformers import T5Config, T5ForConditionalGeneration
from transformers.activations import NewGELUActivation

from propetl import methods
from propetl.configs import ModelSetup, StorageConfig
from propetl.methods.adapter import AdaptedT5FeedForward
from propetl.models.backbone import ModelError
from propetl.models.t5 import TextToTextModel, check_t5_setup, seq2seq_loss, t5_sites

D, BOTTLENECK, ENC, DEC, VOCAB, EOS = 32, 16, 3, 2, 20, 1  # more decoder than encoder blocks: transformers 5.24 cannot generate (its cache has num_layers entries)
MASKED = ("down_weight", "up_weight")


def tiny_t5(seed: int = 0) -> T5ForConditionalGeneration:
    """A random T5 (3 encoder, 2 decoder blocks): no weights exist offline, and it need not know anything."""
    config = T5Config(vocab_size=VOCAB, d_model=D, d_kv=8, d_ff=64, num_layers=ENC, num_decoder_layers=DEC,
                      num_heads=4, dropout_rate=0.1, decoder_start_token_id=0, pad_token_id=0, eos_token_id=EOS)
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(config)


def setup(method="propetl", prototype="adapter", sparsity=0.5, init_std=0.5) -> ModelSetup:
    saved = {
        "model": {"name": "tiny-t5", "name_or_path": "unused", "hidden_size": D, "num_layers": ENC},
        "prototype": {"name": prototype, "reduction_factor": D // BOTTLENECK, "bottleneck": BOTTLENECK,
                      "non_linearity": "gelu_new", "init_std": init_std, "lr": 1e-3, "mask_sparsity": sparsity,
                      "mask_lr": 1e-2, "freeze": False, "seed": 0},
        "method": {"name": method},
        "mask": {"kind": "learned", "sparsity": sparsity, "lr": 1e-2, "weight_decay": 0.0, "seed": 0, "combine": "or"},
    }
    return ModelSetup(saved, StorageConfig("packed", "float32"))


def model_of(tasks=("a", "b"), seed=0, **kwargs) -> TextToTextModel:
    torch.manual_seed(seed + 1)
    return TextToTextModel(setup(**kwargs), list(tasks), backbone=tiny_t5(seed), task_masks=len(tasks) > 1,
                           label_smoothing=0.1)


def batch(seed=0, size=3, source=7, target=5):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, VOCAB, (size, source), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, -2:] = 0
    labels = torch.randint(2, VOCAB, (size, target), generator=g)
    labels[1, -2:] = -100
    return input_ids, attention_mask, labels


def hand_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """0/1 at the top n - floor(sparsity * n) of |score| of each mask (a full sort, as the reference)."""
    flat = scores.detach().reshape(scores.shape[0], -1)
    keep = flat.shape[1] - math.floor(sparsity * flat.shape[1])
    out = torch.zeros_like(flat)
    out.scatter_(1, flat.abs().argsort(dim=1, descending=True)[:, :keep], 1.0)
    return out.view_as(scores)


def site_outputs(model: TextToTextModel, task: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input h, output) of every site's adapted feed-forward sub-layer in one eval forward pass."""
    seen: list = [None] * (ENC + DEC)
    hooks = [wrapper.register_forward_hook(lambda m, args, out, i=i: seen.__setitem__(i, (args[0], out)))
             for i, wrapper in enumerate(block.layer[-1] for block in t5_sites(model.t5))]
    input_ids, attention_mask, labels = batch()
    model.eval()
    with torch.no_grad():
        model(input_ids, attention_mask, labels=labels, task=torch.full((3,), task))
    for hook in hooks:
        hook.remove()
    return seen


def hand_site_weights(model: TextToTextModel, site: int, task: int, sparsity: float) -> dict[str, torch.Tensor]:
    """Site `site`'s tensors computed by hand from the prototype and the scores: W * (m_task OR m_site)."""
    store = methods.petl_weights(model)
    if not store.shared:
        return {name: tensor[site] for name, tensor in store.weights.items()}
    out = {}
    for name, prototype in store.weights.items():
        if name not in MASKED:
            out[name] = prototype
            continue
        masks = store.masks[name]
        if store.num_tasks:
            task_scores = torch.stack(list(masks.tasks.scores))  # one parameter per task (methods/masks.TaskMasks)
            m_task, m_site = hand_mask(task_scores, sparsity)[task], hand_mask(masks.layers.scores, sparsity)[site]
            mask = 1 - (1 - m_task) * (1 - m_site)
        else:
            mask = hand_mask(masks.scores, sparsity)[site]
        out[name] = prototype * mask
    return out


@pytest.mark.parametrize("method,tasks,task", [("propetl", ("a", "b"), 1), ("propetl", ("a",), 0), ("petl", ("a",), 0)])
def test_every_site_computes_h_plus_y_plus_the_masked_adapter_of_it(method, tasks, task):
    model = model_of(tasks, method=method)
    assert methods.petl_weights(model).num_tasks == (len(tasks) if len(tasks) > 1 else 0)
    gelu_new = NewGELUActivation()
    sites = site_outputs(model, task)
    for site, (h, out) in enumerate(sites):
        ff = t5_sites(model.t5)[site].layer[-1].original  # the block's own frozen T5LayerFF
        z = h + ff.DenseReluDense(ff.layer_norm(h))  # eval: dropout is the identity
        w = hand_site_weights(model, site, task, 0.5)
        expected = z + gelu_new(z @ w["down_weight"].T + w["down_bias"]) @ w["up_weight"].T + w["up_bias"]
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        assert (out - z).abs().max() > 1e-2  # the adapter contributes: the check can fail
    assert len(sites) == ENC + DEC


def test_sites_are_the_encoder_then_the_decoder_feed_forward_sublayers_of_one_store():
    model = model_of()
    t5 = model.t5
    assert list(t5_sites(t5)) == [*t5.encoder.block, *t5.decoder.block]
    store = methods.petl_weights(model)
    assert store.num_layers == ENC + DEC and store.shared and store.num_tasks == 2
    wrappers = [block.layer[-1] for block in t5_sites(t5)]
    assert all(isinstance(w, AdaptedT5FeedForward) for w in wrappers)
    assert [w.layer_index for w in wrappers] == list(range(ENC + DEC))
    assert all(w.weights is store for w in wrappers)  # every site, encoder and decoder, reads the one store
    assert all(type(block.layer[0]).__name__ == "T5LayerSelfAttention" for block in t5_sites(t5))  # attention untouched


def test_t5_base_has_24_sites_12_encoder_then_12_decoder():
    with torch.device("meta"):  # shapes only: no weights offline
        t5 = T5ForConditionalGeneration(T5Config(d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12))
    sites = t5_sites(t5)
    assert len(sites) == 24 and list(sites[:12]) == list(t5.encoder.block) and list(sites[12:]) == list(t5.decoder.block)
    assert all(type(block.layer[-1]).__name__ == "T5LayerFF" for block in sites)


def test_one_prototype_parameter_serves_every_site_and_the_state_dict_holds_it_once():
    model = model_of()
    store = methods.petl_weights(model)
    state = model.state_dict()
    for name in ("down_weight", "down_bias", "up_weight", "up_bias"):
        keys = [k for k in state if k.endswith(f"weights.{name}")]
        assert keys == [f"petl_weights.weights.{name}"]
        assert tuple(store.weights[name].shape) == store.specs[name].shape  # one site's shape: no [L, ...] stack
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"petl_weights.weights.{n}" for n in store.weights} | {
        f"petl_weights.masks.{n}.layers.scores" for n in MASKED} | {
        f"petl_weights.masks.{n}.tasks.scores.{task}" for n in MASKED for task in (0, 1)}  # a parameter per task
    # an encoder site and a decoder site read the same tensor: moving the prototype moves both
    before = site_outputs(model, 0)
    with torch.no_grad():
        store.weights["up_bias"] += 1.0
    after = site_outputs(model, 0)
    for site in (0, ENC - 1, ENC, ENC + DEC - 1):
        assert not torch.allclose(before[site][1], after[site][1])
    for site in range(ENC + DEC):
        for name in MASKED:
            assert torch.equal(store.layer(site)[name], store.weights[name] * (store.layer(site)[name] != 0))


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_every_mask_has_exactly_n_minus_floor_sparsity_n_ones(sparsity):
    model = model_of(sparsity=sparsity)
    masks = methods.petl_weights(model).binary_masks()
    n = BOTTLENECK * D
    assert sorted(masks) == sorted(f"{n}@{part}" for n in MASKED for part in ("task", "layer"))
    for name, stack in masks.items():
        assert stack.shape[0] == (2 if name.endswith("@task") else ENC + DEC)
        assert stack.reshape(stack.shape[0], -1).sum(1).tolist() == [n - math.floor(sparsity * n)] * stack.shape[0]
        assert set(stack.unique().tolist()) == {0.0, 1.0}


def test_gradients_reach_the_prototype_and_the_active_tasks_scores_and_the_backbone_stays_frozen():
    model = model_of()
    model.train()
    input_ids, attention_mask, labels = batch()
    model(input_ids, attention_mask, labels=labels, task=torch.zeros(3, dtype=torch.long)).loss.backward()
    store = methods.petl_weights(model)
    for name, prototype in store.weights.items():
        assert prototype.grad is not None and prototype.grad.abs().sum() > 0, name
    for name in MASKED:
        tasks, layers = store.masks[name].tasks.scores, store.masks[name].layers.scores.grad
        assert tasks[0].grad.abs().sum() > 0 and tasks[1].grad is None  # the batch's task only (its own parameter)
        assert all(layers[site].abs().sum() > 0 for site in range(ENC + DEC))  # encoder and decoder sites
    for name, parameter in model.t5.named_parameters():
        assert not parameter.requires_grad and parameter.grad is None, name


def test_tasks_select_their_masks():
    model = model_of()
    input_ids, attention_mask, labels = batch()
    model.eval()
    with torch.no_grad():
        logits = [model(input_ids, attention_mask, labels=labels, task=torch.full((3,), t)).logits for t in (0, 1)]
    assert not torch.allclose(logits[0], logits[1])


def test_multitask_petl_is_the_references_plain_baseline_one_adapter_per_site_shared_by_every_task():
    """glue/normal_pfeiffer_adapter_reduction12 (paper.md §2.3, §5.2): method=petl with several tasks is 2 x L adapters,
    each site its own, no mask scores, no task-specific parameter: every parameter serves every task and the task
    index changes nothing (propetl beside it: the same batch, different logits per task)."""
    tasks = ("a", "b", "c")
    model = model_of(tasks, method="petl")
    store = methods.petl_weights(model)
    assert not store.shared and len(store.masks) == 0 and store.mask_stores() == {}
    sites, adapter = ENC + DEC, 2 * D * BOTTLENECK + BOTTLENECK + D
    assert {name: tuple(w.shape[:1]) for name, w in store.weights.items()} == dict.fromkeys(store.weights, (sites,))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(trainable) == {f"petl_weights.weights.{n}" for n in store.weights}  # no scores, no heads, T5 frozen
    assert sum(p.numel() for p in trainable.values()) == sites * adapter
    for site in range(sites):  # each site its own adapter: its slice of every tensor, no other's
        torch.testing.assert_close(hand_site_weights(model, site, 0, 0.5)["down_weight"], store.weights["down_weight"][site])
    assert not torch.equal(store.weights["down_weight"][0], store.weights["down_weight"][1])
    input_ids, attention_mask, labels = batch()
    model.eval()
    with torch.no_grad():
        logits = [model(input_ids, attention_mask, labels=labels, task=torch.full((3,), t)).logits for t in range(3)]
        generated = [model.generate(input_ids, attention_mask, task=t, max_new_tokens=4) for t in range(3)]
    assert all(torch.equal(logits[0], other) for other in logits[1:])
    assert all(torch.equal(generated[0], other) for other in generated[1:])
    model.train()
    for task in range(3):  # every task's batch trains every parameter: nothing belongs to one task
        model.zero_grad()
        model(input_ids, attention_mask, labels=labels, task=torch.full((3,), task)).loss.backward()
        for name, parameter in trainable.items():
            per_site = parameter.grad.reshape(sites, -1).abs().sum(dim=1)
            assert (per_site > 0).all(), (task, name)
    propetl = model_of(tasks)
    propetl.eval()
    with torch.no_grad():
        pro = [propetl(input_ids, attention_mask, labels=labels, task=torch.full((3,), t)).logits for t in (0, 2)]
    assert not torch.allclose(pro[0], pro[1])  # the same check fails for ProPETL: its task masks differ


@pytest.mark.parametrize("tasks,task", [(("a", "b"), 1), (("a",), 0)])
def test_merge_into_plain_per_site_adapters_keeps_logits_and_generations(tasks, task):
    model = model_of(tasks)
    model.eval()
    input_ids, attention_mask, labels = batch()
    merged = model_of(tasks)  # a twin (a deep-copied T5 cannot generate in transformers 5: its cache breaks)
    merged.load_state_dict(model.state_dict())
    merged.eval().select_task(task)
    merged.merge()
    plain = methods.petl_weights(merged)
    assert not plain.shared and not plain.masks and plain.weights["down_weight"].shape == (ENC + DEC, BOTTLENECK, D)
    assert all(block.layer[-1].weights is plain for block in t5_sites(merged.t5))
    with torch.no_grad():
        for m in (model, merged):
            m.select_task(task)
        torch.testing.assert_close(
            merged(input_ids, attention_mask, labels=labels).logits,
            model(input_ids, attention_mask, labels=labels, task=torch.full((3,), task)).logits,
            atol=1e-5, rtol=1e-5,
        )
    generated = [m.generate(input_ids, attention_mask, task=task, max_new_tokens=6) for m in (model, merged)]
    assert torch.equal(generated[0], generated[1])


def test_greedy_generate_is_the_argmax_decode_of_the_adapted_model():
    model = model_of()
    model.eval()
    input_ids, attention_mask, _ = batch()
    steps = 5
    out = model.generate(input_ids, attention_mask, task=1, max_new_tokens=steps, min_new_tokens=steps)
    decoded = torch.zeros(3, 1, dtype=torch.long)  # decoder_start_token_id
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids, attention_mask, task=torch.ones(3, dtype=torch.long), decoder_input_ids=decoded).logits
            logits[:, -1, EOS] = -float("inf")  # min_new_tokens: no end before `steps`
            decoded = torch.cat([decoded, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, decoded)
    bare = tiny_t5(0).eval().generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=steps,
                                      min_new_tokens=steps, do_sample=False)
    assert not torch.equal(out, bare)  # the adapters are in the decode


def test_the_loss_is_label_smoothed_token_mean_cross_entropy_skipping_ignored_labels():
    model = model_of()
    model.eval()
    input_ids, attention_mask, labels = batch()
    with torch.no_grad():
        out = model(input_ids, attention_mask, labels=labels)
        log_p = out.logits.log_softmax(-1)
        keep = labels != -100
        nll = -log_p[keep].gather(1, labels[keep].unsqueeze(1)).squeeze(1)
        smooth = -log_p[keep].mean(-1)
        torch.testing.assert_close(out.loss, (0.9 * nll + 0.1 * smooth).mean())
        torch.testing.assert_close(seq2seq_loss(out.logits, labels, 0.0), nll.mean())
        # with no smoothing, transformers' own T5 loss (labels shifted right the same way)
        hf = model.t5(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        torch.testing.assert_close(seq2seq_loss(out.logits, labels, 0.0), hf)


def test_finetune_trains_every_weight_and_unsupported_choices_are_refused_in_one_line():
    model = model_of(method="finetune")
    assert methods.petl_weights(model) is None
    assert all(p.requires_grad for p in model.parameters())
    for method, prototype, allowed in (("propetl", "lora", "adapter"), ("petl", "prefix", "adapter"),
                                       ("peft", "adapter", "propetl, petl, finetune")):
        with pytest.raises(ModelError, match=f"allowed: {allowed}$") as error:
            check_t5_setup(method, prototype)
        assert "\n" not in str(error.value)
    with pytest.raises(ModelError, match="prototype=lora"):
        model_of(prototype="lora")


def test_a_saved_t5_folder_loads_through_the_setup_and_a_size_mismatch_is_one_line(tmp_path):
    tiny_t5(0).save_pretrained(tmp_path)
    right = setup()
    right.saved["model"]["name_or_path"] = str(tmp_path)
    model = TextToTextModel(right, ["a"], task_masks=False)
    assert torch.equal(model.t5.shared.weight, tiny_t5(0).shared.weight)
    assert methods.petl_weights(model).num_layers == ENC + DEC
    wrong = setup()
    wrong.saved["model"].update(name_or_path=str(tmp_path), hidden_size=2 * D)
    with pytest.raises(ModelError, match=r"config says 64 x 3: fix conf/model/tiny-t5.yaml$"):
        TextToTextModel(wrong, ["a"], task_masks=False)


def test_a_frozen_prototype_on_t5_trains_masks_only():
    frozen = setup()
    frozen.saved["prototype"]["freeze"] = True
    model = TextToTextModel(frozen, ["a"], backbone=tiny_t5(0), task_masks=False)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {f"petl_weights.masks.{n}.scores" for n in MASKED}
    assert methods.petl_weights(model).stored_tensors() == {}  # its seed regenerates it


def test_finetuned_weights_load_into_a_plain_t5_under_their_transformers_names():
    model = model_of(("a",), method="finetune")
    with torch.no_grad():
        model.t5.shared.weight += 1.0
    plain = tiny_t5(1)
    plain.load_state_dict({model.transformers_name(n): t for n, t in model.state_dict().items()})
    assert torch.equal(plain.shared.weight, model.t5.shared.weight) and model.head_names() == set()


@pytest.mark.slow
def test_a_frozen_tiny_t5_learns_a_second_task_through_a_propetl_adapter_alone(tmp_path):
    """scripts/t5_learns.py --quick: full fine-tuning learns copy; frozen, the untrained model scores ~0 on shift
    (it copies); one ProPETL prototype over per-site masks learns shift far above chance (<= 1e-4)."""
    spec = importlib.util.spec_from_file_location("t5_learns", Path(__file__).resolve().parents[1] / "scripts" / "t5_learns.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    result = script.main(["--quick", "--out", str(tmp_path)])
    assert result["copy_full_finetune"]["exact_match_copy"] > 0.5
    assert result["shift_frozen_untrained"]["exact_match_shift"] < 0.02
    assert result["shift_frozen_untrained"]["exact_match_copy"] > 0.5  # it copies: the shift is what the adapter adds
    assert result["shift_propetl"]["exact_match_shift"] > 0.5
    assert result["shift_propetl"]["sites"] == 4
    multitask = result["multitask_propetl"]["exact_match"]  # each task through its own masks, not the other's
    assert multitask["shift@shift_masks"] > 0.5 and multitask["shift3@shift3_masks"] > 0.5
    assert multitask["shift@shift3_masks"] < 0.1 and multitask["shift3@shift_masks"] < 0.1
    assert json.loads((tmp_path / "result.json").read_text())["shift_propetl"] == result["shift_propetl"]
    assert (tmp_path / "result.md").read_text().startswith("# A tiny T5 learns")
