"""Files on disk: written atomically, and folders sealed with a manifest of sha256 sums checked on reading.
`atomic_write_text` and `write_folder_atomically` (built beside as `.<name>.<random>.tmp`, swapped in, old kept as
`.<name>.old` until recovered or cleaned) never leave half a file; a refused write is one line (WriteError).
`write_output_folder` replaces only files listed in its OUTPUT_MARKER (else OutputError). `seal` writes
`manifest.json` over a folder's files; `check_seal` refuses a changed, missing or unlisted file in one line."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

MANIFEST_FILE = "manifest.json"
OUTPUT_MARKER = ".propetl-output.json"  # in every export / save_propetl folder: {"written_by": ..., "files": [...]}
SHOWN = 5  # foreign entries named in a refusal, then "and N more"


class CheckpointError(Exception):
    """One-line, user-facing error about a checkpoint (or any sealed folder)."""


class OutputError(Exception):
    """One-line, user-facing refusal of an output folder (an export's OUT, save_propetl's folder): nothing written."""


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
    atomic_write(path, lambda f: f.write(text.encode()))


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """atomic_write_text's way for any content: `write(binary file)` fills the temporary file."""
    path = Path(path)
    tmp = None
    try:
        handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(handle, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        _raise_if_refused(path, error)
        raise


def recover_folder_swap(directory: Path) -> bool:
    """After a kill inside write_folder_atomically's swap: `directory`'s `.<name>.old` put back; True if it was."""
    directory = Path(directory)
    old = directory.with_name(f".{directory.name}.old")
    if directory.exists() or not old.is_dir():
        return False
    os.replace(old, directory)
    return True


def clean_stale(directory: Path) -> None:
    """Remove a killed write_folder_atomically's `.tmp` builds and, once `directory` is back (recover first), `.old`."""
    directory = Path(directory)
    building = re.compile(rf"\.{re.escape(directory.name)}\.[a-z0-9_]{{8}}\.tmp")  # tempfile.mkdtemp's names
    stale = [p for p in directory.parent.iterdir() if building.fullmatch(p.name)]
    for path in stale + [directory.with_name(f".{directory.name}.old")] * directory.exists():
        shutil.rmtree(path, ignore_errors=True)


def write_folder_atomically(directory: Path, build) -> Path:
    """build(folder) in a temporary folder beside `directory`, then renamed in place of the old one (if any)."""
    directory = Path(directory)
    building = None
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        recover_folder_swap(directory)
        clean_stale(directory)
        building = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.", suffix=".tmp"))
        os.chmod(building, 0o755)  # mkdtemp makes it owner-only
        build(building)
        old = directory.with_name(f".{directory.name}.old")
        if directory.exists():  # the previous folder steps aside, and goes once the new one is in
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


# ----------------------------------------------------------------------------- output folders (exports, saves)


def shown(names: list[str]) -> str:
    """The first SHOWN names, then how many more."""
    return ", ".join(names[:SHOWN]) + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")


def _all_files(folder: Path) -> set[str]:
    """Every file (and link) under `folder`, as a relative POSIX path; links to folders are not followed."""
    found: set[str] = set()
    for root, dirs, names in os.walk(folder):
        entries = names + [d for d in dirs if os.path.islink(os.path.join(root, d))]
        found.update(Path(root, name).relative_to(folder).as_posix() for name in entries)
    return found


def foreign_files(out: Path) -> list[str]:
    """What in folder `out` propetl did not write (sorted): files its OUTPUT_MARKER does not list, else every entry."""
    try:
        written = json.loads((out / OUTPUT_MARKER).read_bytes()).get("files")
    except (OSError, ValueError, AttributeError):  # no marker, not JSON, not an object
        written = None
    if not isinstance(written, list) or not all(isinstance(name, str) for name in written):
        return sorted(p.name + "/" * (p.is_dir() and not p.is_symlink()) for p in out.iterdir())
    return sorted(_all_files(out) - set(written) - {OUTPUT_MARKER})


def output_refusal(out: Path, protected: dict[str, Path] | None = None, overwrite: bool = True) -> str | None:
    """Why an export or save may not (re)write `out`, or None; `protected`: folders OUT may not be, be in or hold."""
    out, cwd = Path(out).resolve(), Path.cwd().resolve()
    named = [(what, Path(folder).resolve()) for what, folder in (protected or {}).items()]
    named.append(("the working folder", cwd))
    clashes = (
        [("is", what, folder) for what, folder in named if out == folder]
        + [("is inside", what, folder) for what, folder in named if folder in out.parents and folder != cwd]
        + [("holds", what, folder) for what, folder in reversed(named) if out in folder.parents]
    )  # the outermost first
    if clashes:
        relation, what, folder = clashes[0]
        hint = "a new folder inside it or elsewhere" if folder == cwd else f"an OUT outside {folder}"
        return f"{out} {relation} {what} {folder}: writing it would replace that; choose {hint}"
    if out.exists() and not out.is_dir():
        return f"{out} is a file, not a folder propetl wrote; choose another OUT"
    if not out.is_dir() or not any(out.iterdir()):
        return None
    if foreign := foreign_files(out):
        return f"{out} holds files propetl did not write: {shown(foreign)}; choose another OUT"
    return None if overwrite else f"{out} exists (a previous export or save); choose another OUT or pass --overwrite"


def write_output_folder(
    out: Path, build, written_by: str, protected: dict[str, Path] | None = None, overwrite: bool = True
) -> Path:
    """write_folder_atomically into a user's folder, with OUTPUT_MARKER, if output_refusal allows; else OutputError."""
    out = Path(out).resolve()
    try:
        if out.name:  # (not /, which output_refusal refuses)
            recover_folder_swap(out)  # a kill inside the last export's swap: the old one is back first
        reason = output_refusal(out, protected, overwrite)
    except OSError as error:  # an OUT that cannot be read or renamed
        _raise_if_refused(out, error)
        raise
    if reason:
        raise OutputError(reason)

    def build_marked(folder: Path) -> None:
        build(folder)
        marker = {"written_by": written_by, "files": sorted(_all_files(folder))}
        (folder / OUTPUT_MARKER).write_text(json.dumps(marker, indent=1) + "\n")

    return write_folder_atomically(out, build_marked)


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
    except (OSError, ValueError) as error:  # ValueError: not UTF-8 or not JSON
        raise CheckpointError(f"cannot read {path}: {str(error).splitlines()[0]}") from None
    digests = manifest.get("sha256") if isinstance(manifest, dict) else None
    if not isinstance(digests, dict) or not all(
        isinstance(name, str) and isinstance(digest, str) and name == Path(name).name and name not in ("", ".", "..")
        for name, digest in digests.items()
    ):
        raise CheckpointError(f'{path} is not a manifest (expected {{"sha256": {{file name: hex digest}}}})')
    return digests


def check_seal(folder: Path, required: bool, hint: str = "") -> bool:
    """`folder` against its manifest.json: True if all files match; False without one unless `required`; else a
    one-line CheckpointError naming the file, then `hint` (what the user can do)."""
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    hint = f"; {hint}" if hint else ""
    if not path.exists():
        if required:
            raise CheckpointError(
                f"{folder} has no {MANIFEST_FILE} (written by an older propetl, or not by propetl){hint}"
            )
        return False
    digests = _read_manifest(path)
    for name, digest in digests.items():
        file = folder / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing (listed in {path}){hint}")
        if sha256_of(file) != digest:
            raise CheckpointError(
                f"{file} is corrupted or was changed after saving: its sha256 differs from {path}'s{hint}"
            )
    for file in _listed(folder):
        if file.name not in digests:
            raise CheckpointError(
                f"{file} is not listed in {path}: a file this folder was not saved with; remove it{hint}"
            )
    return True
