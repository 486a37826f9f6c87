"""propetl-upgrade OLD NEW: a checkpoint of formats 1-3 rewritten into checkpoint.FORMAT_VERSION, the only one read.
OLD is checked as the old loaders did (1-2 unsealed only with --allow-unsealed); every tensor is kept losslessly; NEW is
written as an export is (files.write_output_folder), sealed, and predicts what OLD predicted."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from safetensors.torch import save_file

from propetl import methods
from propetl.configs import ConfigError, add_config_dir_argument, config_dirs
from propetl.storage import checkpoint
from propetl.storage.accounting import UNNAMED_TASK, MaskFile
from propetl.storage.files import CheckpointError, OutputError, WriteError, check_seal, seal, write_output_folder

FLAT_MASKS_FILE = "masks.safetensors"  # a flat checkpoint's layer masks
FORMAT_1_STORAGE = {"mask_coding": "bits", "dtype": "fp32"}  # how format 1 stored, before it said so
HEAD_NAMES = (  # a flat checkpoint's head names (a transformers model's) -> TaskHead's
    ("classifier.out_proj.", "classifier."),  # RoBERTa
    ("classifier.dense.", "dense."),
    ("classifier.", "classifier."),  # BERT
)


def check_unsealed(folder: Path, version: int, allow_unsealed: bool) -> None:
    """A folder of OLD against its manifest: format 3 carries one; one of format 1-2 without it is read only when
    allowed (a deleted manifest and a lowered format_version are no way around the seal)."""
    if check_seal(folder, required=version >= 3, hint=f"format {version} checkpoints carry one") or allow_unsealed:
        return
    raise CheckpointError(
        f"{folder} has no manifest.json (format {version}: written before checkpoints were sealed in format 3, "
        f"or edited); pass --allow-unsealed to upgrade an unsealed checkpoint"
    )


def task_head_name(name: str, path: Path) -> str:
    """A flat checkpoint's head tensor name (a transformers model's) as TaskHead names it (dense.*, classifier.*)."""
    prefix, pooler, rest = name.partition(".pooler.dense.")
    if pooler and "." not in prefix:  # BERT's pooler: <base_model_prefix>.pooler.dense.*
        return f"dense.{rest}"
    for old, new in HEAD_NAMES:
        if name.startswith(old):
            return new + name[len(old) :]
    raise CheckpointError(f"{path}: head tensor {name!r} is neither BERT's (pooler, classifier) nor RoBERTa's")


def old_format(config: dict, path: Path) -> int:
    """An old propetl.json's (`path`) format_version: 1, 2 or 3, else one line."""
    version = config.get("format_version")
    if version == checkpoint.FORMAT_VERSION:
        raise CheckpointError(f"{path.parent} is in format {version} already: nothing to upgrade")
    if not (type(version) is int and version in checkpoint.UPGRADABLE_FORMATS):
        allowed = ", ".join(map(str, checkpoint.UPGRADABLE_FORMATS))
        raise CheckpointError(f"{path}: format_version={version!r} is invalid; allowed: {allowed}")
    return version


def upgraded_config(config: dict, path: Path) -> dict:
    """An old propetl.json (`path`) in today's keys, checked by today's rules (checkpoint.check_config)."""
    new = {**config, "format_version": checkpoint.FORMAT_VERSION, "storage": config.get("storage", FORMAT_1_STORAGE)}
    if isinstance(config.get("mask"), dict):
        new["mask"] = {"combine": "or", **config["mask"]}  # older checkpoints lack it: they combined with "or"
    if "tasks" not in config:  # flat: one task, layer masks only
        task = new.pop("task", None)
        if not isinstance(task, dict):
            raise CheckpointError(f"{path}: task={task!r} is invalid; allowed: an object")
        name = UNNAMED_TASK if task.get("name") is None else task["name"]  # the Python API's saves name none
        new.update(tasks=[name], num_labels={name: task.get("num_labels")}, task_masks=False)
    new.setdefault("task_masks", True)
    checkpoint.check_config(new, path)
    return new


def upgrade(old, new, allow_unsealed: bool = False) -> Path:
    """Rewrite the checkpoint folder `old` (format 1-3) into `new` in today's format; CheckpointError when it cannot."""
    old = Path(old)
    flat = not (old / checkpoint.SHARED_DIR).is_dir()
    shared = old if flat else old / checkpoint.SHARED_DIR
    config = checkpoint.read_json(shared / checkpoint.CONFIG_FILE)
    version = old_format(config, shared / checkpoint.CONFIG_FILE)
    check_unsealed(shared, version, allow_unsealed)
    config = upgraded_config(config, shared / checkpoint.CONFIG_FILE)
    parts = {task: old if flat else old / checkpoint.TASKS_DIR / task for task in config["tasks"]}
    for part in () if flat else parts.values():
        check_unsealed(part, version, allow_unsealed)
    method, coding = config["method"]["name"], str(config["storage"]["mask_coding"])
    dense = methods.PEFT_FILES if method == "peft" else (checkpoint.DENSE_FILE[method],)
    layer_masks = shared / (FLAT_MASKS_FILE if flat else checkpoint.LAYER_MASKS_FILE)

    def recode(source: Path, target: Path, as_rows: bool = False) -> None:  # format 1's [*shape] rows: [1, *shape]
        masks = checkpoint.read_masks(source)
        checkpoint.save_masks(MaskFile({n: m.unsqueeze(0) if as_rows else m for n, m in masks.items()}), target, coding)

    def build(folder: Path) -> None:
        into = folder / checkpoint.SHARED_DIR
        into.mkdir()
        for name in dense:  # none of a frozen prototype
            if (shared / name).exists():
                shutil.copyfile(shared / name, into / name)
        if layer_masks.exists():
            recode(layer_masks, into / checkpoint.LAYER_MASKS_FILE)
        for task, part in parts.items():
            target = folder / checkpoint.TASKS_DIR / task
            target.mkdir(parents=True)
            head = part / checkpoint.HEAD_FILE
            if flat:
                tensors, _ = checkpoint.read_safetensors(head)
                renamed = {task_head_name(n, head): t.contiguous() for n, t in tensors.items()}
                save_file(renamed, str(target / checkpoint.HEAD_FILE))
            else:
                shutil.copyfile(head, target / checkpoint.HEAD_FILE)
            if config["task_masks"]:
                recode(part / checkpoint.TASK_MASK_FILE, target / checkpoint.TASK_MASK_FILE, as_rows=version == 1)
            labels = config["num_labels"][task]
            (target / "task.json").write_text(json.dumps({"task": task, "num_labels": labels}))
            seal(target)
        (into / checkpoint.CONFIG_FILE).write_text(json.dumps(config, indent=2))
        seal(into)

    return write_output_folder(Path(new), build, f"propetl-upgrade {old.resolve()}", {"the old checkpoint": old})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="propetl-upgrade",
        description="Rewrite a checkpoint of formats 1-3 into today's format, which propetl loads.",
        epilog="example: propetl-upgrade outputs/runs/rte/propetl-lora/<time>/checkpoint rte-checkpoint",
    )
    parser.add_argument("old", metavar="OLD_FOLDER", help="a checkpoint folder of format 1, 2 or 3")
    parser.add_argument("new", metavar="NEW_FOLDER", help="the folder to write (new, or empty)")
    unsealed_help = "upgrade a checkpoint of format 1-2 that has no manifest.json (its files are not checked)"
    parser.add_argument("--allow-unsealed", action="store_true", help=unsealed_help)
    add_config_dir_argument(parser)
    args = parser.parse_args(argv)
    try:
        with config_dirs(args.config_dir):
            written = upgrade(args.old, args.new, args.allow_unsealed)
    except (CheckpointError, OutputError, WriteError, ConfigError) as error:
        print(f"propetl-upgrade: error: {error}", file=sys.stderr)
        sys.exit(2)
    print(written)


if __name__ == "__main__":
    main()
