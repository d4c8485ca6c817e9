"""Records of a W&B offline run's `run-<id>.wandb` file, read as `wandb sync` reads them: a
7-byte header, then LevelDB's log format (32 KiB blocks of records, each with a 7-byte header:
CRC, length, type FULL/FIRST/MIDDLE/LAST), each record a `wandb_internal_pb2.Record`."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def raw_records(data: bytes) -> Iterator[bytes]:
    position, pending = HEADER, b""
    while position + HEADER <= len(data):
        left = BLOCK - position % BLOCK
        if left < HEADER:  # a block's tail too short for a header is padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + HEADER])
        if kind == 0 and length == 0:  # zero padding to the end of the block
            position += left
            continue
        chunk = data[position + HEADER : position + HEADER + length]
        position += HEADER + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk


def records(path: Path) -> Iterator:
    from wandb.proto import wandb_internal_pb2

    for raw in raw_records(path.read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        yield record


def history(path: Path) -> list[dict[str, str]]:
    """Each history row of the run: key -> JSON value."""
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {
                    item.key or "/".join(item.nested_key): item.value_json
                    for item in record.history.item
                }
            )
    return rows


def config(path: Path) -> dict[str, str]:
    """The run's config: key -> JSON value."""
    values = {}
    for record in records(path):
        if record.WhichOneof("record_type") == "config":
            values.update({item.key: item.value_json for item in record.config.update})
    return values


def finished(path: Path, timeout: float = 60.0) -> Path:
    """`path` once its run's exit record (W&B writes it last) is in it. The file is written by
    W&B's service process, not the one that called `wandb.finish()`; a reader that does not wait
    for the exit record can see a file cut short."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        kinds = [record.WhichOneof("record_type") for record in records(path)]
        if "exit" in kinds:
            return path
        if time.monotonic() > deadline:
            raise AssertionError(f"{path}: no exit record after {timeout:.0f} s; records: {kinds}")
        time.sleep(0.2)
