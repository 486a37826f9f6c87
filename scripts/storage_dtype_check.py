"""What storage.dtype and storage.mask_coding cost a trained model: re-save checkpoints in every dtype and
coding, reload them and score them on their task's test split against the checkpoint as it was.

    python scripts/storage_dtype_check.py CHECKPOINT [CHECKPOINT ...] --data-dir DIR --out results/storage_dtype_stsb.json

Each checkpoint (any format; it is copied to a temporary folder first, never written) is loaded and scored
as it is: the reference, a model exactly as trained (fp32, its masks). Then for each dtype (fp32, bf16,
fp16) and each mask coding (bits, entropy) it is saved again, reloaded and scored. Prints a table (test
metrics x100 and their change, bytes without and with the head) and writes every number as JSON.
The masks must come back identical in every re-save (the codings are lossless); only the dtype moves a
score. Scoring uses propetl.cli.evaluate (the propetl-eval path: masks merged away).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

import propetl  # noqa: E402,F401
from propetl.cli import upgrade  # noqa: E402
from propetl.cli.evaluate import evaluate_checkpoint  # noqa: E402
from propetl.configs import ModelSetup
from propetl.storage import accounting, checkpoint, files, mask_coding  # noqa: E402

DTYPES = tuple(accounting.STORAGE_DTYPES)


def shown(path: Path) -> str:
    """A checkpoint's path from its `outputs` folder on (a committed result names no machine's folders)."""
    parts = Path(path).resolve().parts
    return str(Path(*parts[parts.index("outputs"):])) if "outputs" in parts else str(path)


def resave(source: Path, target: Path, dtype: str, coding: str) -> dict:
    """Load `source`, write it to `target` in `dtype` and `coding`; return its masks as reloaded."""
    model, saved = checkpoint.load_checkpoint(source)
    cfg = OmegaConf.merge(saved, {"storage": {"dtype": dtype, "mask_coding": coding}})
    checkpoint.save_checkpoint(model, ModelSetup.from_config(cfg), target)
    return accounting.stored_masks(checkpoint.load_checkpoint(target)[0])


def check(checkpoint_dir: Path, work: Path, data_dir) -> dict:
    original = work / "original"
    version = checkpoint.upgradable_format(Path(checkpoint_dir)) or checkpoint.FORMAT_VERSION
    if version != checkpoint.FORMAT_VERSION:  # formats 1-3: rewritten into today's first
        upgrade.upgrade(checkpoint_dir, original, allow_unsealed=True)
    else:
        shutil.copytree(checkpoint_dir, original)
    model, saved = checkpoint.load_checkpoint(original)
    reference_masks = accounting.stored_masks(model)
    started = time.perf_counter()
    reference = evaluate_checkpoint(original, "test", data_dir=data_dir)
    names = [k for k in ("pearson", "spearman", "accuracy", "f1", "matthews") if k in reference]
    sizes = checkpoint.file_sizes(original)
    rows = [{"dtype": "as saved", "mask_coding": "as saved", "format_version": version,
             **{k: reference[k] for k in names}, "file_bytes": sizes["file_bytes"],
             "file_bytes_with_head": sizes["file_bytes_with_head"], "seconds": time.perf_counter() - started}]
    for dtype in DTYPES:
        for coding in mask_coding.CODINGS:
            target = work / f"{dtype}-{coding}"
            masks = resave(original, target, dtype, coding)
            if set(masks) != set(reference_masks) or not all(torch.equal(masks[n], reference_masks[n]) for n in masks):
                raise SystemExit(f"{checkpoint_dir}: masks changed by a {dtype}/{coding} re-save")
            started = time.perf_counter()
            scores = evaluate_checkpoint(target, "test", data_dir=data_dir)
            sizes = checkpoint.file_sizes(target)
            rows.append({"dtype": dtype, "mask_coding": coding, "format_version": checkpoint.FORMAT_VERSION,
                         **{k: scores[k] for k in names}, **{f"delta_{k}": scores[k] - reference[k] for k in names},
                         "file_bytes": sizes["file_bytes"], "file_bytes_with_head": sizes["file_bytes_with_head"],
                         **{k: v for k, v in sizes.items() if k.startswith("file_bytes/")},
                         "seconds": time.perf_counter() - started})
    return {"checkpoint": shown(checkpoint_dir), "task": saved.task.name, "method": saved.method.name,
            "prototype": saved.prototype.name, "mask_sparsity": float(saved.mask.sparsity), "split": "test",
            "examples": reference["examples"], "metrics": names, "rows": rows}


def table(result: dict) -> str:
    names = result["metrics"]
    header = ["dtype", "masks", *[f"{n} x100" for n in names], *[f"Δ {n} x100" for n in names],
              "bytes (no head)", "bytes (with head)"]
    lines = [f"{result['task']} test ({result['examples']} examples), ProPETL-{result['prototype']} at sparsity "
             f"{result['mask_sparsity']:g}: {result['checkpoint']}", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in result["rows"]:
        deltas = [f"{100 * row['delta_' + n]:+.4f}" if "delta_" + n in row else "reference" for n in names]
        lines.append("| " + " | ".join([row["dtype"], row["mask_coding"], *[f"{100 * row[n]:.4f}" for n in names],
                                        *deltas, f"{row['file_bytes']:,}", f"{row['file_bytes_with_head']:,}"]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", type=Path, help="checkpoint folders (read only; copied first)")
    parser.add_argument("--data-dir", default=None, help="GLUE folder (default as propetl-train)")
    parser.add_argument("--out", type=Path, default=None, help="write the numbers as JSON here")
    args = parser.parse_args()
    results = []
    for checkpoint_dir in args.checkpoints:
        with tempfile.TemporaryDirectory() as work:
            try:
                result = check(checkpoint_dir, Path(work), args.data_dir)
            except checkpoint.CheckpointError as error:
                sys.exit(f"storage_dtype_check: {error}")
        results.append(result)
        print(table(result) + "\n", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        files.atomic_write_text(args.out, json.dumps({"torch": torch.__version__, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
