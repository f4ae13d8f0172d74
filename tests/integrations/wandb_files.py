"""Read a W&B offline run back without network: the ``.wandb`` file (LevelDB log framing of
``wandb_internal_pb2.Record`` protobufs, behind a 7-byte ``:W&B`` header) as its history rows."""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

BLOCK = 32768


def records(path: Path) -> list[Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, buf, out = 7, b"", []
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST fragment
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def history(run_dir: Path) -> list[dict[str, Any]]:
    """Every ``wandb.log`` row of the offline run in ``run_dir`` (``_step`` included)."""
    (file,) = Path(run_dir).glob("run-*.wandb")
    return [{(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
            for r in records(file) if r.WhichOneof("record_type") == "history"]


def config(run_dir: Path) -> dict[str, Any]:
    (file,) = Path(run_dir).glob("run-*.wandb")
    out: dict[str, Any] = {}
    for r in records(file):
        if r.WhichOneof("record_type") == "run":
            out.update({u.key: json.loads(u.value_json) for u in r.run.config.update})
    return out


def run_name(run_dir: Path) -> str:
    (file,) = Path(run_dir).glob("run-*.wandb")
    return next(r.run.display_name for r in records(file) if r.WhichOneof("record_type") == "run")
