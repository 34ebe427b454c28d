"""The one reader of W&B's offline run files (`wandb/offline-run-*/run-<id>.wandb`), read as data.

W&B ships no reader for its offline files. The format is LevelDB's log: a 7-byte file header (`:W&B`, a 2-byte
magic, a 1-byte version), then 32 KiB blocks of chunks, each with a 7-byte header (crc32, length, type:
1 full, 2 first, 3 middle, 4 last; 0 is zero padding at the end of a block). A record is one protobuf
`Record` of W&B's own class: nothing in the file is executed.

A torn record (a run killed mid-write) is skipped and the rest still read; an unreadable or newer-format file
reads as no records, never an error: the callers (artifact resolution, sweep reports) treat W&B files as
optional evidence.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BLOCK = 32768
HEADER = 7


def _chunks(data: bytes) -> Iterator[bytes]:
    """The raw records of a W&B run file's bytes, reassembled from their chunks."""
    pos, pending = HEADER, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:  # zero padding to the end of the block
            pos += BLOCK - pos % BLOCK if pos % BLOCK else 0
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            yield pending
            pending = b""


def records(path: Path) -> list[Any]:
    """The protobuf records (`wandb_internal_pb2.Record`) of the W&B run file `path`, in order."""
    from wandb.proto import wandb_internal_pb2

    try:
        data = Path(path).read_bytes()
    except OSError:
        return []
    if data[:4] != b":W&B":
        return []
    found = []
    for raw in _chunks(data):
        record = wandb_internal_pb2.Record()
        try:
            record.ParseFromString(raw)
        except Exception:  # noqa: BLE001 - a torn record of a killed run: the others still count
            continue
        found.append(record)
    return found


def history(path: Path) -> list[dict[str, Any]]:
    """The logged rows (`wandb.log` calls) of a W&B run file, each as {key: value}."""
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            row = {}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                try:
                    row[key] = json.loads(item.value_json)
                except ValueError:
                    continue
            rows.append(row)
    return rows
