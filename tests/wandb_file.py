"""Reading an offline W&B run's `.wandb` file back (the SDK ships no Python reader): a LevelDB-style log
of protobuf `Record`s — a 7-byte file header, then 32 KiB blocks of chunks, each with a 7-byte header
(crc32, length, type: 1 full, 2 first, 3 middle, 4 last)."""
from __future__ import annotations

import json
import struct
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


def history(path: Path) -> list[dict]:
    """The run's history rows: {"_step": step, key: value, ...} as logged."""
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            rows.append(row)
    return rows


def run_record(path: Path):
    """The run's RunRecord (name, tags, ...)."""
    return next(r.run for r in records(path) if r.WhichOneof("record_type") == "run")
