"""Mask coding benchmark: encode and decode every mask of a roberta-base ProPETL-LoRA checkpoint (12 layers,
r 32 on query and value: 48 masks, 1,179,648 entries) at mask sparsity 0.9 and 0.5, in each coding.

    python scripts/bench_mask_coding.py                      # median of 5, prints a table
    python scripts/bench_mask_coding.py --repeats 9 --json results/bench_mask_coding.json

The masks are those of the PETL store a roberta-base ProPETL-LoRA model builds (methods.make_weights with
model=roberta-base: the checkpoint's masks, without building the 125M-parameter backbone). Times: in memory
(mask_coding.encode / decode) and through the file (checkpoint.save_masks / read_masks: safetensors, SHA-256
and ones checks included). A benchmark: times only, no assertion on them.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import propetl  # noqa: E402,F401
from propetl import methods
from propetl.configs import MaskConfig, compose  # noqa: E402
from propetl.storage import accounting, checkpoint, files, mask_coding  # noqa: E402


def config(*overrides: str):
    return compose(["model=roberta-base", "prototype=lora", *overrides])


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def bench(sparsity: float, coding: str, repeats: int, folder: Path) -> dict:
    cfg = config(f"mask.sparsity={sparsity}", f"storage.mask_coding={coding}")
    torch.manual_seed(0)
    prototype, mask = methods.prototype_config(cfg.prototype), MaskConfig.from_config(cfg.mask)
    weights = methods.make_weights(cfg.method.name, prototype, mask, cfg.model.hidden_size, cfg.model.num_layers, False)
    masks = weights.binary_masks()
    tensors, metadata = mask_coding.encode(masks, coding)
    path = folder / f"masks-{sparsity}-{coding}.safetensors"
    entries = sum(m.numel() for m in masks.values())
    return {"sparsity": sparsity, "coding": coding, "masks": sum(m.shape[0] for m in masks.values()), "entries": entries,
            "coded_bytes": int(tensors[mask_coding.BLOB].numel()),
            "bound_bytes": mask_coding.information_bits_of(masks) / 8,
            "encode_s": median_seconds(lambda: mask_coding.encode(masks, coding), repeats),
            "decode_s": median_seconds(lambda: mask_coding.decode(tensors, metadata), repeats),
            "save_file_s": median_seconds(lambda: checkpoint.save_masks(accounting.MaskFile(masks), path, cfg.storage.mask_coding), repeats),
            "read_file_s": median_seconds(lambda: checkpoint.read_masks(path), repeats)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        rows = [bench(s, c, args.repeats, Path(work)) for s in (0.9, 0.5) for c in mask_coding.CODINGS]
    print(f"roberta-base ProPETL-LoRA masks: {rows[0]['masks']} masks, {rows[0]['entries']:,} entries; median of "
          f"{args.repeats}, torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs\n")
    print("| sparsity | coding | coded bytes | log2 C(n,k) bytes | encode s | decode s | save_masks s | read_masks s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['sparsity']:g} | {r['coding']} | {r['coded_bytes']:,} | {r['bound_bytes']:,.0f} | {r['encode_s']:.3f} | "
              f"{r['decode_s']:.3f} | {r['save_file_s']:.3f} | {r['read_file_s']:.3f} |")
    if args.json:
        machine = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg(),
                   "repeats": args.repeats, "torch": torch.__version__}
        files.atomic_write_text(args.json, json.dumps({**machine, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
