"""Read an offline wandb run back from its transaction log (<run>/run-<id>.wandb), for tests.

The wandb SDK of requirements.txt (0.31) writes the log from its Go core and ships no Python reader of it
any more, so this is the few lines of its format: a 7-byte header (":W&B", magic 0xBEE1, version), then
LevelDB-log records in 32 KiB blocks (crc32, length, type; a record split over blocks as first / middle /
last pieces), each one a protobuf `wandb.proto.wandb_internal_pb2.Record`, parsed with the SDK's own classes.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32768
HEADER = 7  # the file's and each record's
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list[wandb_internal_pb2.Record]:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb transaction log"
    records, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0:  # zero padding to the end of the block
            pos += left
            continue
        chunk, pos = data[pos + HEADER : pos + HEADER + length], pos + HEADER + length
        if kind == FULL:
            pending = chunk
        elif kind == FIRST:
            pending = chunk
            continue
        else:
            pending += chunk
            if kind == MIDDLE:
                continue
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        records.append(record)
    return records


def offline_run(run_dir: Path) -> tuple[Path, list[wandb_internal_pb2.Record]]:
    """The newest offline run under <run_dir>/wandb and its records."""
    runs = sorted((Path(run_dir) / "wandb").glob("offline-run-*"))
    assert runs, f"no offline wandb run in {run_dir}"
    return runs[-1], read_records(next(runs[-1].glob("run-*.wandb")))


def of_type(records: list, kind: str) -> list:
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


def history(records: list) -> list[dict]:
    """Each history row as {key: value}, nested keys joined with "/"."""
    rows = []
    for item_list in of_type(records, "history"):
        rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in item_list.item})
    return rows
