"""method=peft: the reference row. Plain LoRA made by Hugging Face PEFT instead of by propetl; imported only on
method=peft's path (methods.peft_module()): `peft` is optional, `pip install 'propetl[peers]'`.

Same backbone, data, head, loop and recipe as `method=petl prototype=lora`; only the LoRA modules come from the
library: `peft.inject_adapter_in_model(LoraConfig(r, lora_alpha=alpha, lora_dropout=0, target_modules=
prototype.targets, bias="none"), model)` wraps the target projections in `peft.tuners.lora.Linear`, in place.
The math and the init equal ours (methods/lora.py: y = W x + b + (alpha / r) * B (A x), A kaiming_uniform(a=sqrt(5)),
B zeros; PEFT's reset_lora_parameters with init_lora_weights=True, use_rslora=False): tests/test_peft.py copies our
A and B into PEFT's lora_A / lora_B and gets the same logits.
The head is ours, trained as every other method trains it (classifier AND BERT pooler, at trainer.head_lr): no
task_type is given, so PEFT adds no `modules_to_save` (TaskType.SEQ_CLS would train the classifier only and leave
the pooler frozen, reported to cost most of STS-B's score on this model; a reference row must differ in the LoRA code
only). PEFT freezes every non-LoRA parameter when it injects; the head is made trainable again here.
"""
from __future__ import annotations

import peft
from peft.tuners.lora import LoraModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn


def attach(model: nn.Module, cfg, head_names: set[str]) -> None:
    """Inject PEFT's LoRA into `model` in place (cfg: the prototype group, lora); the head trains."""
    config = peft.LoraConfig(r=int(cfg.r), lora_alpha=cfg.alpha, lora_dropout=0.0, target_modules=list(cfg.targets),
                             bias="none")
    peft.inject_adapter_in_model(config, model)
    for name, parameter in model.named_parameters():
        if name in head_names:
            parameter.requires_grad_(True)


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """name -> PEFT's adapter parameters (lora_A / lora_B of every target of every layer), by PEFT's own rule."""
    return {name: p for name, p in model.named_parameters() if LoraModel.prefix in name}


def merge(model: nn.Module) -> None:
    """Fold every LoRA update into its frozen weight and put the plain nn.Linear back (the bare model's cost)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())
