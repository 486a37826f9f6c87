"""Mask coding: a checkpoint's 0/1 masks to bytes and back, numpy only (the reports need no torch).
A stored mask tensor is [count, *shape]. A mask of n entries with k ones carries log2 C(n, k) bits (`information_bits`).
Format 2: a safetensors file with ONE uint8 tensor, `masks` (a 32-byte SHA-256 digest, then the payload), and metadata
    masks    JSON {"coding": "bits" | "entropy", "layout": [[name, shape, ones], ...]}
Codings: `bits` packs 8 entries a byte (numpy packbits, big-endian); `entropy` range-codes (`constriction`) each entry
as a Bernoulli symbol of p = k/n, ≈ log2 C(n, k) bits a mask; a ratio of integers quantises identically everywhere.
The digest covers metadata, payload and decoded entries, each length-prefixed; reading checks it and each mask's ones:
a corrupted file is refused in one line (MaskCodingError). Format 1 (still read): one bit-packed tensor per name."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

LAYER_MASKS_FILE = "layer_masks.safetensors"  # a checkpoint's layer masks: shared/ (checkpoint.py names the others)
MASKS_FILE = "masks.safetensors"  # the same in the flat layout of a one-task checkpoint, formats 1-3
CODINGS = ("bits", "entropy")
BLOB = "masks"
DIGEST_BYTES = 32


class MaskCodingError(ValueError):
    """One line: why coded masks cannot be read (the caller names the file)."""


# ----------------------------------------------------------------------------- information content


def information_bits(n: int, k: int) -> float:
    """log2 C(n, k): the bits that say which k of n entries are ones (math.lgamma: no big integers)."""
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)


def _count_entries(shape) -> tuple[int, int]:
    """(masks, entries per mask) of a stored mask tensor of `shape`: the first dimension counts the masks."""
    return (shape[0], math.prod(shape[1:])) if len(shape) >= 2 else (1, math.prod(shape))


def _as_rows(values: np.ndarray, shape) -> np.ndarray:
    return values.reshape(_count_entries(shape))


def _rows(masks) -> np.ndarray:
    """A stored mask tensor as a bool array [count, entries]; refuses anything but zeros and ones."""
    values = np.asarray(masks, dtype=np.float32)
    bits = values.astype(bool)
    if not np.array_equal(bits, values):
        raise ValueError("a mask holds values other than 0 and 1")
    return _as_rows(bits, values.shape)


def information_bits_of(masks: dict) -> float:
    """Σ log2 C(n, k) over every mask of every tensor."""
    total = 0.0
    for tensor in masks.values():
        rows = _rows(tensor)
        total += sum(information_bits(rows.shape[1], int(k)) for k in rows.sum(axis=1))
    return total


# ----------------------------------------------------------------------------- the entropy coder


def _probabilities(layout: list) -> np.ndarray:
    """Every entry's Bernoulli probability, k/n of its mask, in payload order."""
    parts = []
    for _, shape, ones in layout:
        count, n = _count_entries(shape)
        ones = np.broadcast_to(np.asarray(ones, dtype=np.int64), (count,))
        parts.append(np.repeat(ones / max(n, 1), n))
    return np.concatenate(parts) if parts else np.zeros(0)


def _bernoulli():
    import constriction  # late import: only coding needs it

    return constriction, constriction.stream.model.Bernoulli(perfect=False)


def _entropy_encode(bits: np.ndarray, p: np.ndarray) -> bytes:
    constriction, model = _bernoulli()
    live = (p > 0) & (p < 1)  # all-zero / all-one masks: nothing to say
    encoder = constriction.stream.queue.RangeEncoder()
    if live.any():
        encoder.encode(bits[live].astype(np.int32), model, p[live])
    return encoder.get_compressed().astype("<u4").tobytes()


def _entropy_decode(payload: bytes, p: np.ndarray) -> np.ndarray:
    constriction, model = _bernoulli()
    if len(payload) % 4:
        raise MaskCodingError(f"coded masks of {len(payload)} bytes, not whole 32-bit words (corrupted file)")
    live = (p > 0) & (p < 1)
    bits = p >= 1
    if live.any():
        words = np.frombuffer(payload, dtype="<u4").astype(np.uint32)
        try:
            bits[live] = constriction.stream.queue.RangeDecoder(words).decode(model, p[live]) != 0
        except Exception as error:  # noqa: BLE001 (the coder's own complaint about a broken stream)
            raise MaskCodingError(f"coded masks do not decode ({str(error).splitlines()[0]}; corrupted file)") from None
    return bits


# ----------------------------------------------------------------------------- format 2


def _digest(metadata: dict[str, str], payload: bytes, bits: np.ndarray) -> bytes:
    h = hashlib.sha256()
    for part in (metadata["masks"].encode(), payload, np.packbits(bits).tobytes()):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.digest()


def encode(masks: dict, coding: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """0/1 mask tensors -> (the safetensors tensors, the metadata) of a format-2 masks file."""
    if coding not in CODINGS:
        raise ValueError(f"storage.mask_coding={coding!r} is not one of: {', '.join(CODINGS)}")
    rows = {name: _rows(m) for name, m in masks.items()}
    layout = []
    for name, m in masks.items():
        ones = rows[name].sum(axis=1).tolist()
        layout.append([name, list(m.shape), ones[0] if ones and len(set(ones)) == 1 else ones])
    metadata = {"masks": json.dumps({"coding": coding, "layout": layout}, separators=(",", ":"))}
    bits = np.concatenate([r.reshape(-1) for r in rows.values()]) if rows else np.zeros(0, dtype=bool)
    payload = np.packbits(bits).tobytes() if coding == "bits" else _entropy_encode(bits, _probabilities(layout))
    return {BLOB: np.frombuffer(_digest(metadata, payload, bits) + payload, dtype=np.uint8).copy()}, metadata


def file_coding(metadata: dict[str, str]) -> str:
    """The coding of a masks file from its metadata: format 1 is `bits`."""
    if "masks" not in metadata:
        return "bits"
    try:
        return str(json.loads(metadata["masks"])["coding"])
    except (ValueError, TypeError, KeyError) as error:
        raise MaskCodingError(f"mask layout missing or malformed in the metadata ({error})") from None


def _layout(metadata: dict[str, str]) -> list:
    try:
        layout = json.loads(metadata["masks"])["layout"]
        for name, shape, ones in layout:
            count, _ = _count_entries(shape)
            ones = ones if isinstance(ones, list) else [ones] * count
            if not (
                isinstance(name, str)
                and all(isinstance(d, int) and d >= 0 for d in shape)
                and len(ones) == count
                and all(isinstance(k, int) for k in ones)
            ):
                raise ValueError(name)
        return layout
    except (KeyError, ValueError, TypeError) as error:
        raise MaskCodingError(f"mask layout missing or malformed in the metadata ({error})") from None


def decode(tensors: dict, metadata: dict[str, str]) -> dict[str, np.ndarray]:
    """The tensors and metadata of a masks file (format 1 or 2) -> {name: float32 0/1 array}."""
    if "masks" not in metadata:
        return _decode_format1(tensors, metadata)
    coding = file_coding(metadata)
    if coding not in CODINGS:
        raise MaskCodingError(f"unknown mask coding {coding!r}; this propetl reads: {', '.join(CODINGS)}")
    layout = _layout(metadata)
    if set(tensors) != {BLOB}:
        raise MaskCodingError(f"expected one tensor '{BLOB}', found {sorted(tensors)[:3]}")
    blob = np.asarray(tensors[BLOB], dtype=np.uint8).tobytes()
    if len(blob) < DIGEST_BYTES:
        raise MaskCodingError(f"coded masks of {len(blob)} bytes, shorter than their digest (corrupted file)")
    digest, payload = blob[:DIGEST_BYTES], blob[DIGEST_BYTES:]
    total = sum(math.prod(shape) for _, shape, _ in layout)
    if coding == "bits":
        if len(payload) != math.ceil(total / 8):
            raise MaskCodingError(
                f"{len(payload)} bytes of packed masks, {math.ceil(total / 8)} expected (corrupted file)"
            )
        bits = np.unpackbits(np.frombuffer(payload, dtype=np.uint8), count=total).astype(bool)
    else:
        bits = _entropy_decode(payload, _probabilities(layout))
    if _digest(metadata, payload, bits) != digest:
        raise MaskCodingError("coded masks fail their SHA-256 check (corrupted file)")
    out, start = {}, 0
    for name, shape, ones in layout:
        n = math.prod(shape)
        values = bits[start : start + n]
        start += n
        found = _as_rows(values, shape).sum(axis=1)
        if not np.array_equal(found, np.broadcast_to(np.asarray(ones), found.shape)):
            raise MaskCodingError(f"mask '{name}' decodes to {found.tolist()} ones, the file says {ones}")
        out[name] = values.astype(np.float32).reshape(shape)
    return out


def _decode_format1(tensors: dict, metadata: dict[str, str]) -> dict[str, np.ndarray]:
    try:
        shapes = json.loads(metadata.get("shapes", "{}"))
        return {
            name: np.unpackbits(np.asarray(tensors[name], dtype=np.uint8), count=math.prod(shapes[name]))
            .astype(np.float32)
            .reshape(shapes[name])
            for name in tensors
        }
    except (KeyError, ValueError, TypeError) as error:
        raise MaskCodingError(f"mask shapes missing or wrong ({error})") from None


def layer_masks_file(checkpoint_dir) -> Path:
    """Where a checkpoint keeps its layer masks: shared/layer_masks.safetensors, or masks.safetensors (flat)."""
    shared = Path(checkpoint_dir) / "shared" / LAYER_MASKS_FILE
    return shared if shared.exists() else Path(checkpoint_dir) / MASKS_FILE


def read_file(path) -> dict[str, np.ndarray]:
    """A masks file (either format) -> {name: float32 0/1 array}, or a one-line MaskCodingError."""
    try:
        with safe_open(str(path), framework="np") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (a safetensors handle)
    except (SafetensorError, OSError, ValueError) as error:
        raise MaskCodingError(f"cannot read {path}: {str(error).splitlines()[0]}") from None
    return decode(tensors, metadata)
