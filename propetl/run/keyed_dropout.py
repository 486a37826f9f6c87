"""Dropout for fused runs (issue 28): each run's own stream, a function of its seed, its optimizer step, the dropout
site (the n-th dropout of the forward pass) and each entry's position — no generator state at all.

Fused runs share one forward pass (run/fused.py: one vmap over the runs), where torch's generator would hand each run
draws that depend on which other runs share the pass, in what order, and how far each has got: a run resumed after a
kill that caught its group's runs between their saves would not repeat its uninterrupted draws. Here a run's mask at
(seed, step, site, position) is the same whatever shares the pass, however long the others' padded batches are (the
position is the entry's coordinates, not its offset in a padded tensor), and after any resume.

While `keyed(keys)` is active in a thread, torch.nn.functional.dropout and scaled_dot_product_attention (with a
dropout_p, i.e. in training) draw from the key (a tensor [seed, step]; inside the vmap, each run's own); everywhere
else, and in every other thread, they are torch's own. The attention then runs as its math form (softmax of the
scaled scores plus the mask, dropout on the probabilities, times the values; in fp32), as torch's math backend.
A fused run's dropout is therefore not bit for bit that of the run made alone (torch's generator); with dropout off
the two are the same computation.
"""

from __future__ import annotations

import math
import threading
from contextlib import contextmanager

import torch
from torch.nn import functional

_torch_dropout = functional.dropout
_torch_sdpa = functional.scaled_dot_product_attention
_state = threading.local()  # .key: the [seed, step] tensor of the pass under way here; .site: dropouts so far
_installed = threading.Lock()
_users = 0  # threads inside keyed(): the two functions are swapped while any is

_M32 = 0xFFFFFFFF


def _mix(h: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (two multiply-xorshift rounds) in int64 arithmetic: entries in [0, 2^32)."""
    h = h & _M32
    h = ((h >> 16) ^ h) * 0x45D9F3B & _M32
    h = ((h >> 16) ^ h) * 0x45D9F3B & _M32
    return (h >> 16) ^ h


def threshold(p: float) -> int:
    """Hashes below this are dropped: p of the 2^32 values (p must lie in [0, 1], as torch's dropout requires)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    return min(int(p * 2**32), 2**32)


def keep_mask(key: torch.Tensor, site: int, shape: torch.Size, p: float, device) -> torch.Tensor:
    """Bool [shape]: True where an entry is kept (probability 1 - p), from hash(seed, step, site, coordinates)."""
    h = _mix(_mix(_mix(key[0]) + key[1]) + site)
    for dim, size in enumerate(shape):
        view = [1] * len(shape)
        view[dim] = size
        h = _mix(h + torch.arange(size, device=device, dtype=torch.int64).view(view))
    return h >= threshold(p)


def _current():
    return getattr(_state, "key", None)


def dropout(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> torch.Tensor:
    """torch.nn.functional.dropout; keyed inside `keyed()` in this thread. The kept entries are scaled by the inverse
    of their exact keep probability (1 - p up to 2^-32)."""
    key = _current()
    if key is None or not training or p == 0.0:
        return _torch_dropout(input, p, training, inplace)
    _state.site += 1
    cut = threshold(p)
    if cut == 2**32:
        return input.zero_() if inplace else input * 0.0
    keep = keep_mask(key.to(input.device), _state.site, input.shape, p, input.device)
    scale = 2**32 / (2**32 - cut)
    if inplace:
        return input.masked_fill_(~keep, 0.0).mul_(scale)
    return input.masked_fill(~keep, 0.0) * scale  # autograd keeps the bool mask, not a float copy


def scaled_dot_product_attention(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
):
    """torch.nn.functional.scaled_dot_product_attention; with a dropout_p inside `keyed()` in this thread, its math
    form with keyed dropout on the attention probabilities: in fp32 whatever the inputs (as torch's math backend),
    the result in the autocast dtype or the query's; a row whose every key is masked gives zeros (as torch)."""
    if _current() is None or dropout_p == 0.0:
        return _torch_sdpa(
            query,
            key,
            value,
            attn_mask=attn_mask,
            dropout_p=dropout_p,
            is_causal=is_causal,
            scale=scale,
            enable_gqa=enable_gqa,
        )
    device = query.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else query.dtype
    with torch.autocast(device, enabled=False):
        query, key, value = query.float(), key.float(), value.float()
        if enable_gqa and key.shape[-3] != query.shape[-3]:
            repeat = query.shape[-3] // key.shape[-3]
            key, value = key.repeat_interleave(repeat, dim=-3), value.repeat_interleave(repeat, dim=-3)
        scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
        scores = query @ key.transpose(-2, -1) * scale
        if is_causal:
            causal = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device).tril()
            scores = scores.masked_fill(~causal, -math.inf)
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, -math.inf) if attn_mask.dtype == torch.bool else scores + attn_mask
        dead = torch.isneginf(scores).all(dim=-1, keepdim=True)  # every key masked: zeros, not NaN
        probs = torch.softmax(scores.clamp_min(torch.finfo(scores.dtype).min), dim=-1).masked_fill(dead, 0.0)
        return (dropout(probs, dropout_p) @ value).to(dtype)


@contextmanager
def keyed(key: torch.Tensor):
    """Within: this thread's dropout draws from `key` ([seed, step], int64; inside a vmap, each run's own)."""
    global _users
    with _installed:
        if _users == 0:
            functional.dropout = dropout
            functional.scaled_dot_product_attention = scaled_dot_product_attention
        _users += 1
    previous = (_current(), getattr(_state, "site", 0))
    _state.key, _state.site = key, 0
    try:
        yield
    finally:
        _state.key, _state.site = previous
        with _installed:
            _users -= 1
            if _users == 0:
                functional.dropout = _torch_dropout
                functional.scaled_dot_product_attention = _torch_sdpa


def run_key(seed: int, step: int) -> torch.Tensor:
    """A run's key for the pass of its optimizer step `step` (the steps it had taken before it)."""
    return torch.tensor([seed & _M32, step & _M32], dtype=torch.int64)
