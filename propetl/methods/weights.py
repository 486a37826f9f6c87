"""Per-layer weights of a PETL module, in plain or ProPETL form, from a prototype's `TensorSpec`s (ONE layer's shapes).
`LayerWeights` is plain (method=petl: one parameter [L, *shape] per tensor) or shared (method=propetl: the prototype
[*shape], layer l using prototype * mask[l], masks a `LayerMasks` or, multi-task, `TaskLayerMasks`; biases unmasked).
A frozen prototype (prototype.freeze=true) is drawn from a seed (`frozen_init`) and never trained: only masks learn.
Layer wrappers only call `layer(l)`, so the model code is the same for both forms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from propetl.methods.masks import LayerMasks, TaskLayerMasks, TaskMasks


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    init: str  # "normal:<std>" | "zeros" | "kaiming"  (kaiming_uniform a=sqrt(5), as nn.Linear)
    masked: bool  # ProPETL masks it per layer (weights) or shares it unmasked (biases)
    score_fan_in: int | None = None  # reference's score fan-in (initial range: masks.score_bound); None: this shape's
    frozen_init: str | None = None  # how a frozen prototype draws it (prototype.freeze); None: as `init`
    multitask_score_fan_in: int | None = None  # with task masks (the reference's T5 layout); None: score_fan_in

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def fan_in(self, multitask: bool) -> int | None:
        """The fan-in of its mask scores' initial range: single-task, or with task masks (multi-task)."""
        own = self.multitask_score_fan_in if multitask else None
        return self.score_fan_in if own is None else own


def init_tensor(tensor: torch.Tensor, init: str, generator: torch.Generator | None = None) -> None:
    """Initialise one layer's tensor (or a stack of them, one per layer) in place (from `generator`: a seeded draw)."""
    with torch.no_grad():
        if init == "zeros":
            tensor.zero_()
        elif init.startswith("normal:"):
            tensor.normal_(0.0, float(init.split(":", 1)[1]), generator=generator)
        elif init == "kaiming":
            for one in tensor.view(-1, *tensor.shape[-2:]):
                nn.init.kaiming_uniform_(one, a=math.sqrt(5), generator=generator)
        else:
            raise ValueError(f"unknown init {init!r}")


class LayerWeights(nn.Module):
    """The trainable tensors of one PETL method for all L layers (see the module docstring)."""

    hook_calls = 0  # prefix: how often prefix_attention read this store (tests count them)

    def __init__(
        self,
        specs: dict[str, TensorSpec],
        num_layers: int,
        shared: bool,
        mask_sparsity: float = 0.0,
        mask_kind: str = "learned",
        mask_seed: int = 0,
        num_tasks: int = 0,
        mask_combine: str = "or",
        frozen_seed: int | None = None,
    ):
        super().__init__()
        if frozen_seed is not None and not shared:
            raise ValueError("a frozen prototype needs the shared form (method=propetl)")
        self.specs, self.num_layers, self.shared = dict(specs), num_layers, shared
        self.frozen = frozen_seed is not None  # prototype.freeze: drawn from frozen_seed, never trained
        generator = torch.Generator().manual_seed(frozen_seed) if frozen_seed is not None else None
        self.weights, self.masks = nn.ParameterDict(), nn.ModuleDict()
        for i, (name, spec) in enumerate(self.specs.items()):
            shape = spec.shape if shared else (num_layers, *spec.shape)
            self.weights[name] = nn.Parameter(torch.empty(shape), requires_grad=not self.frozen)
            init_tensor(self.weights[name], (spec.frozen_init or spec.init) if self.frozen else spec.init, generator)
            fan_in = spec.fan_in(multitask=bool(num_tasks))
            drawn: dict[str, Any] = {"kind": mask_kind, "seed": mask_seed + i, "score_fan_in": fan_in}
            if shared and spec.masked and num_tasks:
                self.masks[name] = TaskLayerMasks(
                    num_tasks, num_layers, spec.shape, mask_sparsity, mask_combine, **drawn
                )
            elif shared and spec.masked:
                self.masks[name] = LayerMasks(num_layers, spec.shape, mask_sparsity, **drawn)
        self.num_tasks, self.active_task = num_tasks, 0  # multi-task: whose masks per_layer() applies
        self._per_layer: dict[str, torch.Tensor] | None = None
        self._cache_key: tuple | None = None

    def base_tensors(self) -> dict[str, torch.Tensor]:
        """name -> [*shape] (shared) or [L, *shape] (plain), before masking; prefix overrides it (its MLP's output)."""
        return dict(self.weights.items())

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        """The dense tensors a checkpoint keeps: base_tensors, none of a frozen prototype (its seed regenerates it)."""
        return {} if self.frozen else self.base_tensors()

    def _key(self) -> tuple:
        return (torch.is_grad_enabled(), self.active_task) + tuple(p._version for p in self.parameters())

    def invalidate(self) -> None:
        """Forget the cached per-layer tensors; the model calls this before every forward with grad."""
        self._per_layer, self._cache_key = None, None
        for mask in self.mask_stores().values():
            mask.invalidate()

    def per_layer(self) -> dict[str, torch.Tensor]:
        """name -> [L, *shape]: the tensors every layer uses, computed once per step (masks included)."""
        key = self._key()
        if self._per_layer is None or self._cache_key != key:
            out = {}
            for name, base in self.base_tensors().items():
                if not self.shared:
                    out[name] = base
                elif name in self.masks:
                    mask = self.masks[name]
                    masks = mask(self.active_task) if isinstance(mask, TaskLayerMasks) else mask()
                    out[name] = base.unsqueeze(0) * masks  # [L, *shape]
                else:
                    out[name] = base.unsqueeze(0).expand(self.num_layers, *base.shape)
            self._per_layer, self._cache_key = out, key
        return self._per_layer

    def layer(self, index: int) -> dict[str, torch.Tensor]:
        return {name: tensor[index] for name, tensor in self.per_layer().items()}

    def mask_stores(self) -> dict[str, LayerMasks | TaskMasks]:
        """Every stack of masks by stored name: `name` [L, *shape]; multi-task: `name@task` [T, *shape]
        and `name@layer` [L, *shape]."""
        out: dict[str, LayerMasks | TaskMasks] = {}
        for name, mask in self.masks.items():
            if isinstance(mask, TaskLayerMasks):
                out[f"{name}@task"], out[f"{name}@layer"] = mask.tasks, mask.layers
            elif isinstance(mask, LayerMasks):
                out[name] = mask
        return out

    def binary_masks(self) -> dict[str, torch.Tensor]:
        """stored name -> 0/1 masks of the masked tensors (none for plain form or mask.kind=none)."""
        with torch.no_grad():
            return {name: mask().detach() for name, mask in self.mask_stores().items() if mask.kind != "none"}

    def score_parameters(self) -> list[nn.Parameter]:
        """The trainable mask scores: one parameter per stack of layer masks, one per task and tensor (TaskMasks)."""
        return [p for mask in self.mask_stores().values() for p in mask.parameters() if p.requires_grad]

    def to_plain(self) -> LayerWeights:
        """Materialise every layer's tensors into a plain per-layer store (merge for inference)."""
        plain = LayerWeights(self.specs, self.num_layers, shared=False)
        with torch.no_grad():
            per_layer = self.per_layer()
            for name, tensor in per_layer.items():
                plain.weights[name].copy_(tensor)
        return plain.to(next(iter(per_layer.values())).device)


def bind(wrapper: nn.Module, weights: LayerWeights) -> None:
    """Let a layer wrapper reach the shared store without registering it as its own submodule
    (the store is registered once, on the model: shared tensors exist once in state dicts)."""
    wrapper.__dict__["weights"] = weights
