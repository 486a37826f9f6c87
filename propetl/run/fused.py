"""Fused runs (issue 28): the runs of a sweep that differ only in their seeds, mask sparsity or mask kind train side by
side in one process, their forward and backward passes fused into one over the shared frozen backbone.

Each run stays a run: its own thread goes through the ordinary recipe (run/train.py: its folder, data order from its
own seed, model built from its own seed, optimizer, schedule, clipping, selection, checkpoint, resume state,
metrics.json, W&B run). Only `loop.train_step` meets the others: every run hands its batch to the group and waits;
the last to arrive computes all of them at once — each run's binary masks made by its own mask store (its sparsity,
mask kind and scores, straight-through as alone), the runs' masks and trainable tensors (and frozen ones that differ,
such as a frozen prototype drawn from each seed) stacked along a run dimension, every other tensor the shared
backbone's, one `torch.func.vmap` over `functional_call` of one run's model (its matrix products over the frozen
weights run once over all runs' rows; each run's prototype, masks and head on its own rows) — and the sum of the
runs' losses backpropagates into each run's own parameters. Each run then clips and steps its own AdamW, so its
update is exactly its own.

Which runs fuse: hydra_plugins/propetl_fused_launcher groups a sweep's jobs by their overrides without FUSED_KEYS
(seeds, mask sparsity and kind); `refusal(cfg)` names what cannot fuse (fine-tuning, several tasks, T5, PEFT tuners,
fp16, data-parallel), and such runs train one after another as without fusing.
Dropout: every run its own keyed stream (run/keyed_dropout.py: a hash of its seed, its step, the dropout site and each
entry's position; no generator state), so a run's draws do not depend on which runs share the pass or how far they have
got, and a run resumed after any kill repeats them. A fused run's dropout is not bit for bit that of the run made alone
(torch's generator); with dropout off the two are the same computation, within float rounding.
"""

from __future__ import annotations

import signal
import threading
import weakref
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn
from torch.func import functional_call, vmap

from propetl import methods
from propetl.methods import masks as masks_module
from propetl.run import distributed, keyed_dropout

Precision = Callable[[], AbstractContextManager]  # a run's autocast (loop.autocast), entered around the fused pass

FUSED_KEYS = ("seed", "mask.seed", "mask.sparsity", "mask.kind")  # what fused runs may differ in; the rest is shared
_local = threading.local()


class SignalRelay:
    """SIGINT/SIGTERM while fused runs train (their threads cannot catch signals): the first is noted here, in the main
    thread, and the next fused pass hands it to every run of its group at once (FusedGroup.stop_signum), so all save
    at one step and exit 128+signal; a second one (nothing training to see the first: setup, the test pass, a hang)
    acts as it would without the relay."""

    signum: int | None = None

    def __enter__(self):
        SignalRelay.signum = None
        self._previous = {sig: signal.signal(sig, self._note) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _note(self, signum, frame) -> None:
        if SignalRelay.signum is None:
            SignalRelay.signum = signum
            return
        self.__exit__()
        signal.raise_signal(signum)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def refusal(cfg) -> str | None:
    """Why a run of this config cannot train fused (None: it can)."""
    if cfg.get("mode") == "multitask":
        return "mode=multitask (a batch's task picks the masks)"
    if cfg.method.name not in ("propetl", "petl"):
        return f"method={cfg.method.name} (fused runs share a frozen backbone: method=propetl or petl)"
    if cfg.model.get("family", "encoder") != "encoder":
        return f"model.family={cfg.model.family} (encoders only)"
    if cfg.trainer.precision == "fp16":
        return "trainer.precision=fp16 (a grad scaler per run)"
    if distributed.from_environment().enabled:
        return "a data-parallel launch (each run's gradients are DDP's)"
    return None


def fuse_key(overrides: Sequence[str]) -> tuple[str, ...]:
    """A job's overrides without FUSED_KEYS: jobs with the same key train fused."""
    return tuple(o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in FUSED_KEYS)


def current() -> FusedGroup | None:
    """The fused group this thread's run trains in (None: a run made alone)."""
    member = getattr(_local, "member", None)
    return None if member is None else member.group


def join(member: Member | None) -> None:
    """This thread's run is `member` of its group from now on (None: a run made alone)."""
    _local.member = member


def seed_dropout(seed: int) -> None:
    """This thread's fused run draws its dropout from `seed` (its run's seed; run/keyed_dropout.py)."""
    member = getattr(_local, "member", None)
    if member is not None:
        member.seed = seed


def leave() -> None:
    """This thread's run takes no more steps (fit's end, or a failure): the others go on without it."""
    member = getattr(_local, "member", None)
    if member is not None:
        member.group.leave(member)


class Member:
    """One run of a group: its place in every pass (the job's number: the runs' order in the stacked tensors does not
    depend on which thread came first), its dropout's seed, and whether it has left."""

    def __init__(self, group: FusedGroup, place: int):
        self.group, self.place, self.left = group, place, False
        self.seed = 0  # its dropout's seed (seed_dropout: the run's seed)


class FusedGroup:
    """The meeting point of K runs' training steps: `forward_backward` returns when every run still training has
    handed in its batch and the fused pass has written their gradients. Runs are Member tokens (not thread ids,
    which a finished thread hands on to the next)."""

    def __init__(self, runs: int):
        self.live, self.cond = runs, threading.Condition()
        self.waiting: dict[Member, tuple] = {}  # member -> (model, batch, precision, dropout key)
        self.results: dict[Member, tuple[torch.Tensor, torch.Tensor]] = {}
        self.error: Exception | None = None
        self.varying: list[str] | None = None  # parameter names whose tensors differ between runs
        self.arrivals = 0  # batches handed in so far (the launcher starts the next run once its first arrived)
        self.stop_signum: int | None = None  # a relayed signal, seen by every run after the same fused pass

    def member(self, place: int) -> Member:
        return Member(self, place)

    def leave(self, member: Member) -> None:
        with self.cond:
            if member.left:
                return
            member.left = True
            self.live -= 1
            self._step_if_all_here()
            self.cond.notify_all()

    def forward_backward(
        self, model: nn.Module, batch: dict, precision: Precision, step: int
    ) -> tuple[float, torch.Tensor]:
        """This run's (loss, logits) of the fused pass (under `precision()`, its autocast) at its optimizer step `step`
        (the steps taken before: its dropout's key); its parameters' .grad hold its own gradients."""
        me = _local.member
        with self.cond:
            self.waiting[me] = (model, batch, precision, keyed_dropout.run_key(me.seed, step))
            self.arrivals += 1
            self.cond.notify_all()
            self._step_if_all_here()
            while me not in self.results and self.error is None:
                self.cond.wait()
            if self.error is not None:
                raise RuntimeError(f"a fused run's step failed: {self.error}") from self.error
            loss, logits = self.results.pop(me)
        return loss.item(), logits

    def _step_if_all_here(self) -> None:
        """With the lock held: once every live run has handed in its batch, the fused pass (by the last to come)."""
        if not self.waiting or len(self.waiting) < self.live:
            return
        entries, self.waiting = self.waiting, {}
        self.stop_signum = SignalRelay.signum
        try:
            for member, outputs in fused_pass(entries, self).items():
                self.results[member] = outputs
        except Exception as error:  # noqa: BLE001 (every waiting run raises it, not only the one computing)
            self.error = error
        self.cond.notify_all()


def mask_stores(model: nn.Module) -> dict:
    """A run's stacks of layer masks by name (none for plain PETL)."""
    weights = methods.petl_weights(model)
    return {} if weights is None else weights.mask_stores()


_parameters: weakref.WeakKeyDictionary[nn.Module, dict[str, nn.Parameter]] = weakref.WeakKeyDictionary()


def parameters_by_name(model: nn.Module) -> dict[str, nn.Parameter]:
    """model.named_parameters() as a dict, made once a model (a walk over every module: ~1 ms a run and pass for
    MiniLM, the largest per-run cost of a pass before this cache). Training changes values, never which tensors."""
    if model not in _parameters:
        _parameters[model] = dict(model.named_parameters())
    return _parameters[model]


def varying_names(models: list[nn.Module]) -> list[str]:
    """The parameters the runs do not share, mask scores aside (each run's masks come from its own store: see
    stacked_forward): trainable ones, and frozen ones whose values differ (a frozen prototype drawn from each seed)."""
    named = [parameters_by_name(m) for m in models]
    scores = {id(p) for mask in mask_stores(models[0]).values() for p in mask.parameters()}
    return [
        name
        for name, first in named[0].items()
        if id(first) not in scores
        and (first.requires_grad or any(not torch.equal(first, other[name]) for other in named[1:]))
    ]


def fused_pass(entries: dict[Member, tuple], group: FusedGroup) -> dict[Member, tuple[torch.Tensor, torch.Tensor]]:
    """Runs with batches of one size go through one vmap; a size of its own (an epoch's last batch after a resume) is
    a pass of its own. Returns member -> (loss, detached logits)."""
    by_size: dict[int, list[Member]] = {}
    for member in sorted(entries, key=lambda m: m.place):
        by_size.setdefault(int(entries[member][1]["input_ids"].shape[0]), []).append(member)
    out = {}
    for members in by_size.values():
        models = [entries[m][0] for m in members]
        if group.varying is None and len(models) > 1:
            group.varying = varying_names(models)
        losses, logits = stacked_forward(
            models,
            [entries[m][1] for m in members],
            group.varying,
            entries[members[0]][2],
            [entries[m][3] for m in members],
        )
        losses.sum().backward()
        out.update({member: (losses[k].detach(), logits[k]) for k, member in enumerate(members)})
    return out


def stacked_masks(stores: list) -> torch.Tensor:
    """The runs' binary masks of one weight, [K, count, *shape], each run's as its own store (a LayerMasks: fused runs
    are one-task) makes it: runs of one sparsity and mask kind in one top-k over their stacked scores (row by row, as
    each alone; straight-through to each run's scores), not one top-k a run."""
    kinds: dict[tuple[str, float], list[int]] = {}
    for run, store in enumerate(stores):
        kinds.setdefault((store.kind, store.sparsity), []).append(run)
    places: dict[int, torch.Tensor] = {}
    for (kind, sparsity), runs in kinds.items():
        scores: list[torch.Tensor] = [stores[run].scores for run in runs]
        if kind == "none":
            together = torch.ones(len(runs), *scores[0].shape, dtype=scores[0].dtype, device=scores[0].device)
        else:
            together = masks_module.binarize(torch.cat(scores), sparsity).view(len(runs), *scores[0].shape)
        places.update({run: together[place] for place, run in enumerate(runs)})
    return torch.stack([places[run] for run in range(len(stores))])


def pad_to(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """[B, T] right-padded with zeros to [B, length] (attention 0 there: the values do not matter)."""
    return nn.functional.pad(tensor, (0, length - tensor.shape[1]))


def stacked_forward(
    models: list[nn.Module],
    batches: list[dict],
    varying: list[str] | None,
    precision: Precision = nullcontext,
    dropout_keys: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """K runs' losses [K] and logits [K, B, C]: one vmap over model 0 with the varying tensors and each run's masks
    stacked (model 0's mask stores hand out the run's masks inside the pass: LayerMasks.given). `dropout_keys`: each run's
    dropout key (keyed_dropout.run_key); None: dropout from torch's generator, every run its own rows' draws."""
    base = models[0]
    device = batches[0]["input_ids"].device
    if len(models) == 1:
        with precision(), keyed_dropout.keyed(dropout_keys[0].to(device)) if dropout_keys else nullcontext():
            output = base(**{k: v for k, v in batches[0].items() if k != "task"})
        return output.loss.unsqueeze(0), output.logits.detach().unsqueeze(0)
    named = [parameters_by_name(m) for m in models]
    stacked = {name: torch.stack([n[name] for n in named]) for name in varying or []}
    length = max(b["input_ids"].shape[1] for b in batches)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in batches[0]]
    inputs = {k: torch.stack([pad_to(b[k], length) for b in batches]) for k in keys}
    labels = torch.stack([b["labels"] for b in batches])
    # each run's binary masks by its own store (its sparsity, mask kind and scores; straight-through to its scores)
    stores = [mask_stores(m) for m in models]
    masks = {name: stacked_masks([store[name] for store in stores]) for name in stores[0]}
    slots = stores[0]

    run_keys = torch.stack(dropout_keys).to(device) if dropout_keys else torch.zeros(len(models), 0, dtype=torch.int64)

    def one_run(parameters: dict, run_masks: dict, run_inputs: dict, run_labels: torch.Tensor, key: torch.Tensor):
        attend = run_inputs["attention_mask"].bool()  # a prepared 4D mask: transformers' own checks it under vmap
        kwargs = {**run_inputs, "attention_mask": attend[:, None, None, :].expand(-1, 1, length, length)}
        for name, mask in slots.items():
            mask.given = run_masks[name]
        try:
            with keyed_dropout.keyed(key) if dropout_keys else nullcontext():
                output = functional_call(base, parameters, (), {**kwargs, "labels": run_labels})
        finally:
            for mask in slots.values():
                mask.given = None
        return output.loss, output.logits

    try:
        with precision():
            randomness = "error" if dropout_keys else "different"  # keyed: no draw from torch's generator is left
            losses, logits = vmap(one_run, randomness=randomness)(stacked, masks, inputs, labels, run_keys)
    finally:
        weights = methods.petl_weights(base)
        if weights is not None:  # its caches hold the stacked tensors of this pass
            weights.invalidate()
    return losses, logits.detach()
