"""Pfeiffer bottleneck adapter after the feed-forward block of every layer. With f = FFN output (before the residual),
x = the sub-layer input and LN the pre-trained layer's frozen output LayerNorm (used twice, as in the reference):
    h   = LN(f + x)                                   # [B, T, hidden]
    a   = W_up relu(W_down h + b_down) + b_up         # W_down [bottleneck, hidden], W_up [hidden, bottleneck]
    out = LN(a + f + x)
ProPETL: W_down and W_up are the prototype times the layer's mask (biases unmasked). Mask scores start as the
reference's layouts do, range 1/sqrt(fan_in): single-task (RoBERTa, transposed scores) bottleneck for down, hidden for
up; with task masks (T5 multi-task, scores shaped like nn.Linear.weight) hidden for down, bottleneck for up.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from propetl.methods import rules
from propetl.methods.weights import LayerWeights, TensorSpec, bind

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh}
FOLDABLE = False  # a module after the feed-forward block: not a weight of plain BERT


@dataclass
class AdapterConfig(rules.PrototypeConfig):
    """conf/prototype/adapter.yaml's keys; None: the yaml's default."""

    name: str = "adapter"
    reduction_factor: int = rules.setting(rules.positive_int(), shape=True)  # bottleneck = hidden / it (12)
    bottleneck: int = rules.setting(rules.positive_int(), shape=True)  # the bottleneck width directly
    non_linearity: str = rules.setting(rules.one_of(ACTIVATIONS), shape=True)  # relu | gelu | tanh
    init_std: float = rules.setting()  # weights ~ N(0, init_std^2) (0.02)


CONFIG = AdapterConfig


def specs(config: AdapterConfig, hidden: int) -> dict[str, TensorSpec]:
    bottleneck, init = int(config.bottleneck), f"normal:{config.init_std}"
    # frozen (prototype.freeze): nn.Linear's range, not N(0, 0.02^2), whose output masks could only shrink to nothing
    # scores' fan-in: single-task the reference's transposed RoBERTa layout, multi-task its T5 one (the weight's own)
    return {
        "down_weight": TensorSpec(
            (bottleneck, hidden), init, True, bottleneck, frozen_init="kaiming", multitask_score_fan_in=hidden
        ),
        "down_bias": TensorSpec((bottleneck,), "zeros", masked=False),
        "up_weight": TensorSpec(
            (hidden, bottleneck), init, True, hidden, frozen_init="kaiming", multitask_score_fan_in=bottleneck
        ),
        "up_bias": TensorSpec((hidden,), "zeros", masked=False),
    }


class AdaptedFeedForwardOutput(nn.Module):
    """Replaces a BERT/RoBERTa layer's `output` block (dense -> dropout -> LN(. + x)) with its adapted form."""

    weights: LayerWeights  # the shared store (bind): not a submodule

    def __init__(self, original: nn.Module, weights: LayerWeights, layer_index: int, activation: str):
        super().__init__()
        self.original, self.layer_index, self.activation = original, layer_index, ACTIVATIONS[activation]
        bind(self, weights)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        o: Any = self.original  # torch types its submodules as Tensor | Module
        f = o.dropout(o.dense(hidden_states))
        h = o.LayerNorm(f + input_tensor)
        w = self.weights.layer(self.layer_index)
        a = F.linear(self.activation(F.linear(h, w["down_weight"], w["down_bias"])), w["up_weight"], w["up_bias"])
        return o.LayerNorm(a + f + input_tensor)


def attach(model: nn.Module, layers: nn.ModuleList, weights: LayerWeights, config: AdapterConfig) -> None:
    layer: Any  # a BERT/RoBERTa block: torch types its submodules as Tensor | Module
    for index, layer in enumerate(layers):
        layer.output = AdaptedFeedForwardOutput(layer.output, weights, index, config.non_linearity)


def merge(layers: nn.ModuleList, weights: LayerWeights) -> LayerWeights:
    """Fold each layer's mask into a plain per-layer adapter: inference then costs what plain PETL costs."""
    plain = weights.to_plain()
    layer: Any  # a BERT/RoBERTa block: torch types its submodules as Tensor | Module
    for layer in layers:
        bind(layer.output, plain)
    return plain
