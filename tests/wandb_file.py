"""Reading an offline W&B run's `.wandb` file back (the SDK ships no Python reader): a LevelDB-style log
of protobuf `Record`s — a 7-byte file header, then 32 KiB blocks of chunks, each with a 7-byte header
(crc32, length, type: 1 full, 2 first, 3 middle, 4 last)."""
from __future__ import annotations

import json
import struct
import time
from pathlib import Path

BLOCK, HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    """Every Record in the file, in order."""
    from wandb.proto import wandb_internal_pb2

    data, position, pending = Path(path).read_bytes(), HEADER, b""
    assert data[:4] == b":W&B", data[:4]
    while position + HEADER <= len(data):
        left_in_block = BLOCK - position % BLOCK
        if left_in_block < HEADER:                       # a block's tail too short for a header: padding
            position += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + HEADER])
        chunk = data[position + HEADER:position + HEADER + length]
        position += HEADER + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def history(path: Path, until=None, attempts: int = 60) -> list[dict]:
    """The run's history rows: {"_step": step, key: value, ...} as logged. With `until`, read again (every half second,
    `attempts` times at most) until until(rows) holds: on a loaded machine W&B's service may still be writing the file
    after `wandb.finish()` returned (seen once in a full test run: the per-step rows missing)."""
    for _ in range(attempts):
        rows = []
        try:
            for record in records(path):
                if record.WhichOneof("record_type") == "history":
                    items = record.history.item
                    rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items})
        except Exception:  # a record still being written
            if until is None:
                raise
            rows = []
        if until is None or until(rows):
            break
        time.sleep(0.5)
    return rows


def run_record(path: Path):
    """The run's RunRecord (name, tags, ...)."""
    return next(r.run for r in records(path) if r.WhichOneof("record_type") == "run")
