"""LoRA on the self-attention projections (query and value by default). For a frozen W [out, in], x [B, T, in]:
    y = W x + b + (alpha / r) * B (A x)               # A [r, in], B [out, r]; A kaiming-uniform, B zeros
ProPETL: one (A, B) pair per target, shared by all layers, each layer masking A and B with its own binary masks.
Merging folds (alpha/r) * (B*M_B)(A*M_A) into W: inference then costs exactly what the bare model costs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from propetl.methods import rules
from propetl.methods.weights import LayerWeights, TensorSpec, bind

TARGETS = ("query", "key", "value")
FOLDABLE = True  # merge() folds every update into the frozen W_q / W_v


@dataclass
class LoRAConfig(rules.PrototypeConfig):
    """conf/prototype/lora.yaml's keys; None: the yaml's default."""

    name: str = "lora"
    r: int = rules.setting(rules.positive_int(), shape=True)  # rank (hidden / 24)
    alpha: float = rules.setting(rules.positive_number(), shape=True)  # the update is scaled by alpha / r (1.5 r)
    targets: list[str] = rules.setting(rules.distinct_list_of(TARGETS), shape=True)  # noqa: RUF009 (query, value)


CONFIG = LoRAConfig


def specs(config: LoRAConfig, hidden: int) -> dict[str, TensorSpec]:
    r = int(config.r)
    out = {}
    for target in config.targets:
        out[f"{target}_A"] = TensorSpec((r, hidden), "kaiming", masked=True)
        out[f"{target}_B"] = TensorSpec((hidden, r), "zeros", masked=True, frozen_init="kaiming")  # frozen: B != 0
    return out


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus the layer's low-rank update."""

    weights: LayerWeights  # the shared store (bind): not a submodule

    def __init__(self, base: nn.Linear, weights: LayerWeights, layer_index: int, target: str, scaling: float):
        super().__init__()
        self.base, self.layer_index, self.target, self.scaling = base, layer_index, target, scaling
        bind(self, weights)

    def delta_weight(self) -> torch.Tensor:
        w = self.weights.layer(self.layer_index)
        return self.scaling * (w[f"{self.target}_B"] @ w[f"{self.target}_A"])  # [out, in]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weights.layer(self.layer_index)
        update = F.linear(F.linear(x, w[f"{self.target}_A"]), w[f"{self.target}_B"])
        return self.base(x) + self.scaling * update


def attach(model: nn.Module, layers: nn.ModuleList, weights: LayerWeights, config: LoRAConfig) -> None:
    scaling = float(config.alpha) / float(config.r)
    layer: Any  # a BERT/RoBERTa block: torch types its submodules as Tensor | Module
    for index, layer in enumerate(layers):
        attention = layer.attention.self
        for target in config.targets:
            setattr(attention, target, LoRALinear(getattr(attention, target), weights, index, target, scaling))


def merge(layers: nn.ModuleList, weights: LayerWeights) -> None:
    """Fold every layer's (masked) update into its frozen weight and drop the wrappers."""
    layer: Any  # a BERT/RoBERTa block: torch types its submodules as Tensor | Module
    with torch.no_grad():
        for layer in layers:
            attention = layer.attention.self
            for name, module in list(attention.named_children()):
                if isinstance(module, LoRALinear):
                    module.base.weight += module.delta_weight().to(module.base.weight.dtype)
                    setattr(attention, name, module.base)
