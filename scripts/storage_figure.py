"""The 12-layer storage figure: on-disk size of ProPETL against plain PETL on a roberta-base-shaped model,
for each prototype, mask sparsity, mask coding and dtype.

    python scripts/storage_figure.py                       # prints the table, writes results/storage_figure.md
    python scripts/storage_figure.py --out -               # print only

The model is transformers' RobertaForSequenceClassification(RobertaConfig(), num_labels=2): roberta-base's
shapes (hidden 768, 12 layers), random weights, nothing downloaded. Storage depends on shapes alone
(the masks have exactly n - floor(s·n) ones each, trained or not). For every prototype (adapter, LoRA,
prefix at the reference's sizes: conf/prototype with model=roberta-base) it writes, through
checkpoint.save_checkpoint, a plain PETL checkpoint in each dtype and a ProPETL checkpoint at sparsity 0.5 and
0.9 in each dtype and mask coding, and reads the files' sizes back (head excluded: head.safetensors).
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import propetl  # noqa: E402,F401
from propetl import methods
from propetl.configs import ModelSetup, compose  # noqa: E402
from propetl.models import backbone  # noqa: E402
from propetl.storage import accounting, checkpoint, files, mask_coding  # noqa: E402

PROTOTYPES = ("adapter", "lora", "prefix")
SPARSITIES = (0.5, 0.9)
DTYPES = tuple(accounting.STORAGE_DTYPES)
REPO = Path(__file__).resolve().parent.parent


def config(*overrides: str):
    return compose(["model=roberta-base", *overrides])


def roberta_base():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    return RobertaForSequenceClassification(RobertaConfig(num_labels=2))


def attached(base, *overrides: str):
    """A copy of `base` with the method of config(*overrides) attached (as loading a checkpoint builds it)."""
    model = copy.deepcopy(base)
    methods.attach(model, backbone.encoder_layers(model), ModelSetup.from_config(config(*overrides)),
                   backbone.head_parameter_names(model), for_training=False)
    return model


def written(model, folder: Path, *overrides: str) -> dict:
    """Save `model`'s checkpoint with config(*overrides) (its storage settings); the files' sizes."""
    checkpoint.save_checkpoint(model, ModelSetup.from_config(config(*overrides)), folder)
    return checkpoint.file_sizes(folder)


def measure(work: Path) -> list[dict]:
    base = roberta_base()
    rows = []
    for prototype in PROTOTYPES:
        petl_run = (f"prototype={prototype}", "method=petl")
        model = attached(base, *petl_run)
        plain = {dtype: written(model, work / f"petl-{prototype}-{dtype}", *petl_run, f"storage.dtype={dtype}")["file_bytes"]
                 for dtype in DTYPES}
        for sparsity in SPARSITIES:
            propetl_run = (f"prototype={prototype}", "method=propetl", f"mask.sparsity={sparsity}")
            model = attached(base, *propetl_run)
            masks = accounting.stored_masks(model)
            entries = sum(m.numel() for m in masks.values())
            bound = mask_coding.information_bits_of(masks) / entries
            for coding in mask_coding.CODINGS:
                for dtype in DTYPES:
                    sizes = written(model, work / f"propetl-{prototype}-{sparsity}-{coding}-{dtype}", *propetl_run,
                                    f"storage.mask_coding={coding}", f"storage.dtype={dtype}")
                    rows.append({"prototype": prototype, "sparsity": sparsity, "coding": coding, "dtype": dtype,
                                 "propetl_bytes": sizes["file_bytes"], "petl_bytes": plain[dtype],
                                 "ratio": sizes["file_bytes"] / plain[dtype],
                                 "ratio_to_fp32_petl": sizes["file_bytes"] / plain["fp32"],
                                 "mask_bits_per_entry": 8 * sizes[f"file_bytes/{checkpoint.SHARED_DIR}/{checkpoint.LAYER_MASKS_FILE}"] / entries,
                                 "bound_bits_per_entry": bound})
    return rows


def summary(rows: list[dict]) -> list[str]:
    """One line per prototype, sparsity and coding: the ratios in each dtype side by side."""
    lines = ["| prototype | sparsity | masks | mask bits/entry | log2 C(n,k)/entry | ratio fp32 | ratio bf16 | ratio fp16 "
             "| bf16 to fp32 PETL | ProPETL bytes fp32 | ProPETL bytes bf16 |", "|" + "---|" * 11]
    cells = {(r["prototype"], r["sparsity"], r["coding"], r["dtype"]): r for r in rows}
    for prototype, sparsity, coding in dict.fromkeys((r["prototype"], r["sparsity"], r["coding"]) for r in rows):
        by = {dtype: cells[(prototype, sparsity, coding, dtype)] for dtype in DTYPES}
        lines.append(f"| {prototype} | {sparsity:g} | {coding} | {by['fp32']['mask_bits_per_entry']:.4f} | "
                     f"{by['fp32']['bound_bits_per_entry']:.4f} | "
                     + " | ".join(f"{by[d]['ratio']:.4f}" for d in DTYPES)
                     + f" | {by['bf16']['ratio_to_fp32_petl']:.4f} | {by['fp32']['propetl_bytes']:,} | {by['bf16']['propetl_bytes']:,} |")
    return lines


def markdown(rows: list[dict], seconds: float) -> str:
    lines = ["# Storage on roberta-base's shapes (12 layers, hidden 768)", "",
             "`python scripts/storage_figure.py`: ProPETL checkpoints against plain PETL checkpoints of the same prototype, "
             "both written by `checkpoint.save_checkpoint` on `RobertaForSequenceClassification(RobertaConfig(), num_labels=2)` "
             "(random weights: sizes depend on shapes only), files without the head. *ratio*: ProPETL's files over plain "
             "PETL's in the same dtype; *to fp32 PETL*: over plain PETL in fp32. *mask bits/entry*: the masks file "
             "(header included) over the mask entries; *log2 C(n,k)*: the information bound per entry. "
             "Adapter: bottleneck 64; LoRA: r 32 on query and value; prefix: 64 key/value positions.", "",
             *summary(rows), "", "Every checkpoint:", "",
             "| prototype | sparsity | masks | dtype | ProPETL bytes | PETL bytes | ratio | to fp32 PETL | mask bits/entry | log2 C(n,k)/entry |",
             "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['prototype']} | {r['sparsity']:g} | {r['coding']} | {r['dtype']} | {r['propetl_bytes']:,} | "
                     f"{r['petl_bytes']:,} | {r['ratio']:.4f} | {r['ratio_to_fp32_petl']:.4f} | "
                     f"{r['mask_bits_per_entry']:.4f} | {r['bound_bits_per_entry']:.4f} |")
    lines += ["", f"1/12 + 1/32 = {1 / 12 + 1 / 32:.4f} (fp32 and one bit an entry); 1/12 + H(0.1)/32 = "
              f"{1 / 12 + (-(0.1 * math.log2(0.1) + 0.9 * math.log2(0.9))) / 32:.4f} (fp32 and the bound at sparsity 0.9). "
              f"Written in {seconds:.0f} s, torch {torch.__version__}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "results" / "storage_figure.md"), help="markdown file, or - for none")
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        rows = measure(Path(work))
    text = markdown(rows, time.perf_counter() - started)
    print(text)
    if args.out != "-":
        files.atomic_write_text(Path(args.out), text)
        print(f"written to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
