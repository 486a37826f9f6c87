"""Binary masks over a shared prototype: all mask logic lives here.
A mask is a score tensor shaped like its weight; its binary form keeps the top n - floor(sparsity * n) of |score| and
passes gradients straight through (edge-popup, as the reference). `sparsity` is the fraction of ZEROS (the reference's
is the fraction kept). Masks of all layers are stacked [L, *shape] for one batched top-k; multi-task, each task's
mask is its own parameter (TaskMasks). Storage: mask_coding.py.
"""

from __future__ import annotations

import math

import torch
from torch import nn

MASK_KINDS = ("learned", "random", "none")


def zeros_per_mask(numel: int, sparsity: float) -> int:
    """floor(sparsity * numel), robust to float error (0.57 * 100 is 56.999...)."""
    return math.floor(round(sparsity * numel, 9))


def ones_per_mask(numel: int, sparsity: float) -> int:
    """How many entries a mask of `numel` entries keeps at this sparsity."""
    return numel - zeros_per_mask(numel, sparsity)


def topk_binary(magnitudes: torch.Tensor, n_ones: int) -> torch.Tensor:
    """Row-wise top-k over [rows, n]: 1.0 at the n_ones largest entries of each row, else 0.0. torch.topk selects
    the smaller side (no full sort) and breaks ties, so every row has exactly n_ones ones."""
    _, n = magnitudes.shape
    if n_ones >= n:
        return torch.ones_like(magnitudes)
    if n_ones <= n - n_ones:
        out = torch.zeros_like(magnitudes)
        return out.scatter_(1, magnitudes.topk(n_ones, dim=1, largest=True, sorted=False).indices, 1.0)
    out = torch.ones_like(magnitudes)
    return out.scatter_(1, magnitudes.topk(n - n_ones, dim=1, largest=False, sorted=False).indices, 0.0)


class _StraightThroughTopK(torch.autograd.Function):
    """Forward: binary top-k mask of |scores| per row. Backward: identity to the |scores|."""

    @staticmethod
    def forward(ctx, magnitudes: torch.Tensor, n_ones: int) -> torch.Tensor:
        return topk_binary(magnitudes, n_ones)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return grad_output, None


def binarize(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Binary masks for stacked scores [L, *shape], top-k of |score| within each of the L masks. The
    straight-through gradient reaches the scores as dL/dmask * sign(score) (through abs)."""
    flat = scores.reshape(scores.shape[0], -1)
    n_ones = ones_per_mask(flat.shape[1], sparsity)
    return _StraightThroughTopK.apply(flat.abs(), n_ones).view_as(scores)


def score_bound(shape: tuple[int, ...], fan_in: int | None = None) -> float:
    """The reference's initial score range: kaiming_uniform(a=sqrt(5)) is U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
    fan_in by default that of a tensor shaped like the masked weight. The reference shapes some score tensors
    otherwise (adapter: the transpose; prefix: one [L, P, 2h] tensor): a method passes that layout's fan-in
    (TensorSpec.score_fan_in)."""
    return 1.0 / math.sqrt(fan_in if fan_in is not None else math.prod(shape[1:]) if len(shape) > 1 else shape[0])


def init_scores(scores: torch.Tensor, fan_in: int | None = None) -> None:
    """Scores [count, *shape] ~ U(-b, b), b = score_bound(shape, fan_in), drawn from torch's global RNG."""
    bound = score_bound(tuple(scores.shape[1:]), fan_in)
    with torch.no_grad():
        scores.uniform_(-bound, bound)


class LayerMasks(nn.Module):
    """Binary masks for one prototype weight, one per layer (or per task): scores [count, *shape].
    kind="learned": trainable scores, top-k with straight-through gradients; "random": fixed scores drawn from
    `seed`; "none": all ones (plain weight tying). `forward()` returns the binary masks [count, *shape], cached
    until the scores change (their version counter moves at every optimizer step) or `invalidate()` is called
    (the model does so before every forward pass with grad)."""

    def __init__(
        self,
        count: int,
        shape: tuple[int, ...],
        sparsity: float,
        kind: str = "learned",
        seed: int = 0,
        score_fan_in: int | None = None,
    ):
        super().__init__()
        if kind not in MASK_KINDS:
            raise ValueError(f"mask.kind={kind!r} is not one of: {', '.join(MASK_KINDS)}")
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"mask.sparsity={sparsity!r} must be in [0, 1)")
        self.kind, self.sparsity, self.shape, self.count = kind, float(sparsity), tuple(shape), count
        scores = torch.empty(count, *shape)
        if kind == "random":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                init_scores(scores, score_fan_in)
        else:
            init_scores(scores, score_fan_in)
        self.scores = nn.Parameter(scores, requires_grad=(kind == "learned"))
        self._cached: torch.Tensor | None = None
        self._cache_key: tuple | None = None
        self.given: torch.Tensor | None = None  # fused runs (run/fused.py): this run's masks, made by its own store

    @property
    def entries_per_mask(self) -> int:
        return math.prod(self.shape)

    @property
    def ones_per_mask(self) -> int:
        return self.entries_per_mask if self.kind == "none" else ones_per_mask(self.entries_per_mask, self.sparsity)

    def invalidate(self) -> None:
        self._cached, self._cache_key = None, None

    def forward(self) -> torch.Tensor:
        if self.given is not None:
            return self.given
        key = (self.scores._version, torch.is_grad_enabled(), self.scores.device, self.scores.dtype)
        if self._cached is None or self._cache_key != key:
            if self.kind == "none":
                self._cached = torch.ones_like(self.scores)
            else:
                self._cached = binarize(self.scores, self.sparsity)
            self._cache_key = key
        return self._cached

    @torch.no_grad()
    def load_binary(self, masks: torch.Tensor) -> None:
        """Set the scores so that binarisation reproduces `masks` exactly (ones score 1, zeros 0)."""
        if tuple(masks.shape) != tuple(self.scores.shape):
            raise ValueError(f"mask shape {tuple(masks.shape)} != expected {tuple(self.scores.shape)}")
        ones = masks.reshape(self.count, -1).sum(dim=1)
        if self.kind != "none" and not torch.all(ones == self.ones_per_mask):
            raise ValueError(
                f"mask has {ones.tolist()} ones per layer, expected {self.ones_per_mask} at sparsity {self.sparsity}"
            )
        self.scores.copy_(masks.to(self.scores.dtype))
        self.invalidate()


# ----------------------------------------------------------------------------- tasks x layers

COMBINES = ("or", "and", "task_only", "layer_only")


def combine(task_mask: torch.Tensor, layer_masks: torch.Tensor, how: str = "or") -> torch.Tensor:
    """One task's masks for every layer [L, *shape], from its task mask [*shape] (shared by all layers) and
    the layer masks [L, *shape] (shared by all tasks):
    or:         1 - (1 - m_task)(1 - m_layer)   differentiable OR (paper.md §2.3): d/dm_task = 1 - m_layer
    and:        m_task * m_layer                                                    d/dm_task = m_layer
    task_only:  m_task at every layer;   layer_only: m_layer for every task.
    Task and layer masks are separate tensors: no task's mask doubles as a layer's (the reference's
    block-0 aliasing is not reproduced)."""
    task_mask = task_mask.unsqueeze(0)
    if how == "or":
        return 1.0 - (1.0 - task_mask) * (1.0 - layer_masks)
    if how == "and":
        return task_mask * layer_masks
    if how == "task_only":
        return task_mask.expand_as(layer_masks)
    if how == "layer_only":
        return layer_masks
    raise ValueError(f"mask.combine={how!r} is not one of: {', '.join(COMBINES)}")


class TaskMasks(nn.Module):
    """T task masks for one prototype weight, each task's scores its own parameter [*shape] (`scores[t]`): a step on
    task t's batch binarises only task t's scores, so the other tasks' get no gradient (grad None) and AdamW leaves
    them, their moments and their weight decay alone — a task's mask moves only when that task trains. The scores
    are drawn as LayerMasks draws its stack [T, *shape], then split; `forward()` gives all T binary masks stacked
    [T, *shape] (what a checkpoint stores as `name@task`), `row(t)` task t's."""

    def __init__(
        self,
        count: int,
        shape: tuple[int, ...],
        sparsity: float,
        kind: str = "learned",
        seed: int = 0,
        score_fan_in: int | None = None,
    ):
        super().__init__()
        drawn = LayerMasks(count, shape, sparsity, kind, seed, score_fan_in)  # the same draws, the same checks
        self.kind, self.sparsity, self.shape, self.count = drawn.kind, drawn.sparsity, drawn.shape, drawn.count
        learned = kind == "learned"
        self.scores = nn.ParameterList(nn.Parameter(row.clone(), requires_grad=learned) for row in drawn.scores.data)
        self._cached: dict[int, tuple[tuple, torch.Tensor]] = {}

    @property
    def entries_per_mask(self) -> int:
        return math.prod(self.shape)

    @property
    def ones_per_mask(self) -> int:
        return self.entries_per_mask if self.kind == "none" else ones_per_mask(self.entries_per_mask, self.sparsity)

    def invalidate(self) -> None:
        self._cached = {}

    def row(self, task: int) -> torch.Tensor:
        """Task `task`'s binary mask [*shape] (straight-through to its scores alone), cached until they change."""
        scores = self.scores[task]
        key = (scores._version, torch.is_grad_enabled(), scores.device, scores.dtype)
        cached = self._cached.get(task)
        if cached is None or cached[0] != key:
            mask = torch.ones_like(scores) if self.kind == "none" else binarize(scores.unsqueeze(0), self.sparsity)[0]
            self._cached[task] = cached = (key, mask)
        return cached[1]

    def forward(self) -> torch.Tensor:
        return torch.stack([self.row(task) for task in range(self.count)])

    @torch.no_grad()
    def load_binary(self, masks: torch.Tensor) -> None:
        """Set every task's scores so that binarisation reproduces `masks` [T, *shape] exactly."""
        if tuple(masks.shape) != (self.count, *self.shape):
            raise ValueError(f"mask shape {tuple(masks.shape)} != expected {(self.count, *self.shape)}")
        ones = masks.reshape(self.count, -1).sum(dim=1)
        if self.kind != "none" and not torch.all(ones == self.ones_per_mask):
            raise ValueError(
                f"mask has {ones.tolist()} ones per task, expected {self.ones_per_mask} at sparsity {self.sparsity}"
            )
        for scores, mask in zip(self.scores, masks):
            scores.copy_(mask.to(scores.dtype))
        self.invalidate()


class TaskLayerMasks(nn.Module):
    """Multi-task masks for one prototype weight: T task masks (TaskMasks: one parameter per task) and L layer masks
    (LayerMasks), each with its own scores and sparsity; `forward(task)` gives that task's [L, *shape] combined
    masks, from that task's scores and the layer masks only."""

    def __init__(
        self,
        num_tasks: int,
        num_layers: int,
        shape: tuple[int, ...],
        sparsity: float,
        how: str = "or",
        kind: str = "learned",
        seed: int = 0,
        score_fan_in: int | None = None,
    ):
        super().__init__()
        if how not in COMBINES:
            raise ValueError(f"mask.combine={how!r} is not one of: {', '.join(COMBINES)}")
        self.how = how
        self.tasks = TaskMasks(num_tasks, shape, sparsity, kind, seed=seed, score_fan_in=score_fan_in)
        self.layers = LayerMasks(num_layers, shape, sparsity, kind, seed=seed + 7919, score_fan_in=score_fan_in)

    def forward(self, task: int) -> torch.Tensor:
        return combine(self.tasks.row(task), self.layers(), self.how)

    def invalidate(self) -> None:
        self.tasks.invalidate()
        self.layers.invalidate()
