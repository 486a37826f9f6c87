"""T5-base's storage figures (../shared/paper.md §3.3) from its shapes alone: no weights, no network.

    python scripts/storage_t5.py

T5-base is built from a T5Config on the meta device (222,903,552 parameters, embeddings tied). Its adapter sites are
the 12 encoder + 12 decoder feed-forward blocks; a Pfeiffer adapter there is propetl's adapter (methods/adapter.py
specs, the same shapes as the reference's). Counts as accounting.py counts: the prototype's fp32 once, 1 bit a mask
entry (fp32-equivalent = bits / 32), bit-packed bytes by accounting.mask_bytes. accounting.plain_petl_params needs a
built run (a ModelSetup); the plain module here is the same sum, over the specs, times the sites.
Multi-task GLUE (rf 12, 8 tasks): masks = one per task + one per site (§2.3); 31 score tensors train, since encoder
block 0's site mask is the last task's (the reference's aliasing), while 32 masks are counted as stored, as §3.3 does.
"""

from __future__ import annotations

import json

import torch
from transformers import T5Config, T5ForConditionalGeneration

from propetl.methods.adapter import AdapterConfig, specs
from propetl.storage import accounting

T5_BASE = T5Config(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12)
SETTINGS = {  # name: (ProPETL's reduction factor, plain adapter's, tasks, masks beyond one per site)
    "glue_multitask": (12, 12, 8, 8),  # 8 task masks shared by every site + 24 site masks
    "xsum_wmt16": (1, 8, 1, 0),  # one mask per site
}


def t5_params(config: T5Config) -> int:
    with torch.device("meta"):
        return accounting.count(T5ForConditionalGeneration(config).parameters())


def adapter_sizes(hidden: int, reduction_factor: int) -> tuple[int, list[int]]:
    """(the adapter's parameters, the entries of each masked tensor) at bottleneck hidden / reduction_factor."""
    shapes = specs(AdapterConfig(bottleneck=hidden // reduction_factor), hidden).values()
    return sum(s.numel for s in shapes), [s.numel for s in shapes if s.masked]


def figures(config: T5Config = T5_BASE) -> dict[str, dict]:
    backbone, hidden, sites = t5_params(config), config.d_model, config.num_layers + config.num_decoder_layers
    out: dict[str, dict] = {"t5": {"params": backbone, "sites": sites}}
    for name, (rf, plain_rf, tasks, extra_masks) in SETTINGS.items():
        prototype, masked = adapter_sizes(hidden, rf)
        plain = sites * adapter_sizes(hidden, plain_rf)[0]
        masks = sites + extra_masks
        bits = masks * sum(masked)
        stored = prototype + bits / 32
        trained_masks = masks - 1 if extra_masks else masks  # multi-task: site 0's mask aliases a task's
        out[name] = {
            "plain_adapter": plain,
            "plain_adapter_%": 100 * plain / backbone,
            "plain_adapter_%_per_task": 100 * plain / backbone / tasks,
            "prototype": prototype,
            "prototype_%": 100 * prototype / backbone,
            "masks": masks,
            "mask_entries_per_mask": sum(masked),
            "mask_bits": bits,
            "storage_fp32_eq": stored,
            "storage_%": 100 * stored / backbone,
            "storage_%_per_task": 100 * stored / backbone / tasks,
            "ratio_to_plain_adapter": stored / plain,
            "bytes": 4 * prototype + accounting.mask_bytes(masks * masked),
            "trainable": prototype + trained_masks * sum(masked),
            "trainable_%": 100 * (prototype + trained_masks * sum(masked)) / backbone,
        }
    return out


if __name__ == "__main__":
    print(json.dumps(figures(), indent=2))
