"""Files on disk: written atomically, and folders sealed with a manifest of sha256 sums checked on reading.
Writing: `atomic_write_text` (a temporary name, then a rename) and `write_folder_atomically` (a folder built beside its
place, then swapped in): a crash never leaves half a file or half a folder. A write the file system refuses (read-only
folder, lost permissions, full disk) is one line (WriteError) naming the path.
Sealing: `seal(folder)` writes `manifest.json` = {"sha256": {file name: hex digest}} for every file of the folder (not
its sub-folders, which carry their own), last, inside the folder being built. `check_seal` hashes each file once and
refuses (CheckpointError, one line naming the file) a changed, missing or unlisted file, or a manifest that is not one.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

MANIFEST_FILE = "manifest.json"


class CheckpointError(Exception):
    """One-line, user-facing error about a checkpoint (or any sealed folder)."""


class WriteError(OSError):
    """One-line, user-facing error: the file system refused a write (names the path and the reason)."""


def _raise_if_refused(path: Path, error: BaseException) -> None:
    """An OSError while writing `path` (not one already told) becomes a WriteError; anything else goes on as it was."""
    if isinstance(error, OSError) and not isinstance(error, WriteError):
        reason = error.strerror or str(error).splitlines()[0]
        raise WriteError(f"cannot write {path}: {reason}; check the folder's permissions and free space") from None


# ----------------------------------------------------------------------------- atomic writes

def unwritable(folder: Path) -> str | None:
    """Why a run could not write into `folder` (or create it), in one line; None if it can."""
    folder = Path(folder).absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        return f"{existing} is not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file in the same folder and rename: readers never see half a file."""
    path = Path(path)
    tmp = None
    try:
        handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(handle, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        _raise_if_refused(path, error)
        raise


def recover_folder_swap(directory: Path) -> bool:
    """After a kill between the two renames of write_folder_atomically's swap, `directory` is missing and
    its previous version waits in `.<name>.old`: put that back. True if it did."""
    directory = Path(directory)
    old = directory.with_name(f".{directory.name}.old")
    if directory.exists() or not old.is_dir():
        return False
    os.replace(old, directory)
    return True


def write_folder_atomically(directory: Path, build) -> Path:
    """build(folder) in a temporary folder beside `directory`, then renamed in place of the old one (if any)."""
    directory = Path(directory)
    building = None
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        recover_folder_swap(directory)
        building = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.", suffix=".tmp"))
        os.chmod(building, 0o755)                   # mkdtemp makes it owner-only
        build(building)
        old = directory.with_name(f".{directory.name}.old")
        if directory.exists():                      # the previous folder steps aside, and goes once the new one is in
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
        os.replace(building, directory)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException as error:
        if building is not None:
            shutil.rmtree(building, ignore_errors=True)
        _raise_if_refused(directory, error)
        raise
    return directory


# ----------------------------------------------------------------------------- manifests

def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _listed(folder: Path) -> list[Path]:
    """The files a manifest covers: the folder's own files (no sub-folders), hidden ones and itself excepted."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name != MANIFEST_FILE and not p.name.startswith("."))


def seal(folder: Path) -> None:
    """Write `folder`/manifest.json with the sha256 of each of its files: last, inside the folder being built."""
    folder = Path(folder)
    digests = {p.name: sha256_of(p) for p in _listed(folder)}
    (folder / MANIFEST_FILE).write_text(json.dumps({"sha256": digests}, indent=1) + "\n")


def _read_manifest(path: Path) -> dict[str, str]:
    try:
        manifest = json.loads(path.read_bytes())
    except (OSError, ValueError) as error:          # ValueError: not UTF-8 or not JSON
        raise CheckpointError(f"cannot read {path}: {str(error).splitlines()[0]}") from None
    digests = manifest.get("sha256") if isinstance(manifest, dict) else None
    if not isinstance(digests, dict) or not all(isinstance(name, str) and isinstance(digest, str)
                                                and name == Path(name).name and name not in ("", ".", "..")
                                                for name, digest in digests.items()):
        raise CheckpointError(f"{path} is not a manifest (expected {{\"sha256\": {{file name: hex digest}}}})")
    return digests


def check_seal(folder: Path, required: bool, hint: str = "") -> bool:
    """Check `folder` against its manifest.json: True if all files match; False if it has none and `required` is false
    (an older propetl's folder); else a one-line CheckpointError naming the file, then `hint` (what the user can do)."""
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    hint = f"; {hint}" if hint else ""
    if not path.exists():
        if required:
            raise CheckpointError(f"{folder} has no {MANIFEST_FILE} (written by an older propetl, or not by "
                                  f"propetl){hint}")
        return False
    digests = _read_manifest(path)
    for name, digest in digests.items():
        file = folder / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing (listed in {path}){hint}")
        if sha256_of(file) != digest:
            raise CheckpointError(f"{file} is corrupted or was changed after saving: its sha256 differs from "
                                  f"{path}'s{hint}")
    for file in _listed(folder):
        if file.name not in digests:
            raise CheckpointError(f"{file} is not listed in {path}: a file this folder was not saved with; "
                                  f"remove it{hint}")
    return True
