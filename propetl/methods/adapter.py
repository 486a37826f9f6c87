"""Pfeiffer bottleneck adapter after the feed-forward block of every layer. With f = FFN output (before the residual),
x = the sub-layer input and LN the pre-trained layer's frozen output LayerNorm (used twice, as in the reference):
    h   = LN(f + x)                                   # [B, T, hidden]
    a   = W_up relu(W_down h + b_down) + b_up         # W_down [bottleneck, hidden], W_up [hidden, bottleneck]
    out = LN(a + f + x)
T5 (pre-LN blocks; paper.md §2.3, the reference's gelu_new): with y = Dropout(FF(LN(h))) of the block's feed-forward
sub-layer, out = h + y + Adapter(h + y). A layer (site) is either form; models/t5.py lists a T5's 24 (12 + 12).
ProPETL: W_down and W_up are the prototype times the layer's mask (biases unmasked). Mask scores start as the
reference's layouts do, range 1/sqrt(fan_in): single-task (RoBERTa, transposed scores) bottleneck for down, hidden for
up; with task masks (T5 multi-task, scores shaped like nn.Linear.weight) hidden for down, bottleneck for up.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from propetl.methods import rules
from propetl.methods.weights import LayerWeights, TensorSpec, bind

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "tanh": torch.tanh,
    "gelu_new": partial(F.gelu, approximate="tanh"),  # transformers' gelu_new: the T5 reference's
}
FOLDABLE = False  # a module after the feed-forward block: not a weight of plain BERT


@dataclass
class AdapterConfig(rules.PrototypeConfig):
    """conf/prototype/adapter.yaml's keys; None: the yaml's default."""

    name: str = "adapter"
    reduction_factor: int = rules.setting(rules.positive_int(), shape=True)  # bottleneck = hidden / it (12)
    bottleneck: int = rules.setting(rules.positive_int(), shape=True)  # the bottleneck width directly
    non_linearity: str = rules.setting(rules.one_of(ACTIVATIONS), shape=True)  # relu | gelu | tanh | gelu_new
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


def bottleneck(x: torch.Tensor, w: dict[str, torch.Tensor], activation: Callable) -> torch.Tensor:
    """The adapter itself: W_up act(W_down x + b_down) + b_up, with one site's (masked) tensors `w`."""
    return F.linear(activation(F.linear(x, w["down_weight"], w["down_bias"])), w["up_weight"], w["up_bias"])


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
        a = bottleneck(h, self.weights.layer(self.layer_index), self.activation)
        return o.LayerNorm(a + f + input_tensor)


class AdaptedT5FeedForward(nn.Module):
    """Replaces a T5 block's feed-forward sub-layer (h + Dropout(FF(LN(h)))) with its adapted form:
    z = h + Dropout(FF(LN(h))); out = z + Adapter(z) (the reference's placement, paper.md §2.3)."""

    weights: LayerWeights  # the shared store (bind): not a submodule

    def __init__(self, original: nn.Module, weights: LayerWeights, layer_index: int, activation: str):
        super().__init__()
        self.original, self.layer_index, self.activation = original, layer_index, ACTIVATIONS[activation]
        bind(self, weights)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        o: Any = self.original  # transformers' T5LayerFF (torch types its submodules as Tensor | Module)
        z = hidden_states + o.dropout(o.DenseReluDense(o.layer_norm(hidden_states)))
        return z + bottleneck(z, self.weights.layer(self.layer_index), self.activation)


def feed_forward_slot(layer: nn.Module) -> tuple[nn.Module, str]:
    """(parent, name) of the module a layer's adapter wraps: a T5 block's feed-forward sub-layer (the last of
    block.layer, a T5LayerFF or its wrapper), else a BERT/RoBERTa layer's `output`."""
    sublayers = getattr(layer, "layer", None)
    if isinstance(sublayers, nn.ModuleList) and len(sublayers):
        last = sublayers[-1]
        if isinstance(last, AdaptedT5FeedForward) or hasattr(last, "DenseReluDense"):
            return sublayers, str(len(sublayers) - 1)
    return layer, "output"


def attach(model: nn.Module, layers: nn.ModuleList, weights: LayerWeights, config: AdapterConfig) -> None:
    """Wrap every layer's (site's) feed-forward output; layer i reads the store's layer i."""
    for index, layer in enumerate(layers):
        parent, name = feed_forward_slot(layer)
        wrapper = AdaptedT5FeedForward if parent is not layer else AdaptedFeedForwardOutput
        setattr(parent, name, wrapper(getattr(parent, name), weights, index, config.non_linearity))


def merge(layers: nn.ModuleList, weights: LayerWeights) -> LayerWeights:
    """Fold each layer's mask into a plain per-layer adapter: inference then costs what plain PETL costs."""
    plain = weights.to_plain()
    for layer in layers:
        bind(getattr(*feed_forward_slot(layer)), plain)
    return plain
