"""Prefix-tuning: P key/value positions prepended to every layer's self-attention.
Trained re-parameterised (as the reference): embedding E [P, hidden] -> Linear -> tanh -> Linear to out = L * 2 * hidden
(plain PETL) or 2 * hidden, ONE prefix masked per layer (ProPETL). Only the MLP's output is stored; a loaded model has
no MLP. Each [P, 2h] prefix splits into keys and values [heads, P, head_dim]. The attention hook is ONE function,
`prefix_attention` (transformers' AttentionInterface); `attach` fails loudly if the model does not route through it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from propetl.methods import rules
from propetl.methods.weights import LayerWeights, TensorSpec

ATTENTION_NAME = "propetl_prefix"
FOLDABLE = False  # extra attention positions: not a weight of plain BERT


@dataclass
class PrefixConfig(rules.PrototypeConfig):
    """conf/prototype/prefix.yaml's keys; None: the yaml's default."""

    name: str = "prefix"
    length: int = rules.setting(rules.positive_int(), shape=True)  # positions (hidden / 12)
    mlp_hidden: int = rules.setting(
        rules.positive_int(), shape=True
    )  # the re-parameterisation MLP's width (2/3 hidden)
    embedding_std: float = rules.setting(rules.positive_number(), 1.0)  # its input ~ N(0, std^2): nn.Embedding's


CONFIG = PrefixConfig


def prefix_attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    """SDPA attention with the layer's prefix prepended. key/value: [B, heads, T, head_dim]."""
    source = module.__dict__.get("prefix_source")
    if source is not None:
        weights, index = source
        kv = weights.layer(index)["prefix"]  # [P, 2 * hidden]
        length, (batch, heads, _, head_dim) = kv.shape[0], key.shape
        prefix_k, prefix_v = kv.view(length, 2, heads, head_dim).permute(1, 2, 0, 3).to(key.dtype)  # [heads, P, d]
        key = torch.cat([prefix_k.unsqueeze(0).expand(batch, -1, -1, -1), key], dim=2)
        value = torch.cat([prefix_v.unsqueeze(0).expand(batch, -1, -1, -1), value], dim=2)
        if attention_mask is not None:  # [B, 1, Tq, Tk]: bool keep, or additive float
            keep = attention_mask.dtype == torch.bool  # True for a bool mask, 0 added for a float one
            pad = attention_mask.new_full((*attention_mask.shape[:-1], length), keep)
            attention_mask = torch.cat([pad, attention_mask], dim=-1)
        weights.hook_calls += 1
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(ATTENTION_NAME, prefix_attention)
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def specs(config: PrefixConfig, hidden: int) -> dict[str, TensorSpec]:
    length = int(config.length)
    # frozen (prototype.freeze): the table drawn directly (no MLP to train) at about the scale of BERT's keys/values
    return {
        "prefix": TensorSpec(
            (length, 2 * hidden), "normal:0.02", masked=True, score_fan_in=length * 2 * hidden, frozen_init="normal:1.0"
        )
    }


class PrefixWeights(LayerWeights):
    """LayerWeights whose prefix comes from the re-parameterisation MLP while training."""

    def __init__(
        self, config: PrefixConfig, hidden: int, num_layers: int, shared: bool, reparameterise: bool, **mask_kwargs
    ):
        super().__init__(specs(config, hidden), num_layers, shared, **mask_kwargs)
        self.reparameterise = reparameterise and not self.frozen  # frozen: the table itself
        if self.reparameterise:
            del self.weights["prefix"]  # the MLP produces it
            length, out = int(config.length), 2 * hidden * (1 if shared else num_layers)
            self.embedding = nn.Parameter(torch.empty(length, hidden).normal_(0.0, float(config.embedding_std)))
            width = int(config.mlp_hidden)
            self.mlp = nn.Sequential(nn.Linear(hidden, width), nn.Tanh(), nn.Linear(width, out))

    def base_tensors(self) -> dict[str, torch.Tensor]:
        if not self.reparameterise:
            return super().base_tensors()
        table = self.mlp(self.embedding)  # [P, out]
        if not self.shared:  # [P, L*2h] -> [L, P, 2h]
            table = table.view(table.shape[0], self.num_layers, -1).transpose(0, 1)
        return {"prefix": table}


def make_weights(
    config: PrefixConfig, hidden: int, num_layers: int, shared: bool, for_training: bool, **mask_kwargs
) -> PrefixWeights:
    return PrefixWeights(config, hidden, num_layers, shared, reparameterise=for_training, **mask_kwargs)


def _bind_sources(layers: nn.ModuleList, weights: LayerWeights) -> None:
    layer: Any  # a BERT/RoBERTa block: torch types its submodules as Tensor | Module
    for index, layer in enumerate(layers):
        layer.attention.self.__dict__["prefix_source"] = (weights, index)


def attach(model: Any, layers: nn.ModuleList, weights: LayerWeights, config: PrefixConfig) -> None:
    """`model`: a transformers model or a MultiTaskModel (both have set_attn_implementation)."""
    _bind_sources(layers, weights)
    model.set_attn_implementation(ATTENTION_NAME)
    first: Any = layers[0]  # a BERT/RoBERTa block: torch types its submodules as Tensor | Module
    if getattr(first.attention.self.config, "_attn_implementation", None) != ATTENTION_NAME:
        raise RuntimeError(
            "prefix-tuning: the model's self-attention does not use transformers' attention interface; "
            "the prefix hook (propetl/methods/prefix.py) must be ported to this transformers version"
        )


def merge(layers: nn.ModuleList, weights: LayerWeights) -> LayerWeights:
    """Materialise each layer's masked prefix once: inference then costs what plain prefix-tuning costs."""
    plain = weights.to_plain()
    _bind_sources(layers, plain)
    return plain
