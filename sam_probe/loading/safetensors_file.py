"""Reading a safetensors file whose header has been checked to describe its data exactly.

Layout: 8 bytes little-endian header length ``n``, ``n`` bytes of JSON header,
then the data section.  Before any tensor is made the header must be a JSON
object (no duplicate keys) of entries ``{"dtype", "shape", "data_offsets"}`` plus
an optional ``__metadata__`` of string values, where each entry's
``end - begin == prod(shape) x itemsize`` and the entries, sorted by offset,
cover the data section exactly: no gaps, no overlaps, nothing out of range.
Tensors are then views of the memory-mapped file (copied only when their
offset is not a multiple of the element size).  At most ``MAX_TENSORS`` entries.  safetensors has no checksum:
damaged bytes inside the data section cannot be detected.
"""
from __future__ import annotations

import json
import math
import struct
from typing import Any

from .files import MappedFile, RefusedFile

MAX_HEADER = 100 * 2**20
MAX_NDIM = 64
MAX_TENSORS = 2**17  # entries of one file (a 671B-parameter model holds ~1,000 per shard)
_DTYPES = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16", "I32": "int32",
           "U32": "uint32", "I64": "int64", "U64": "uint64", "F16": "float16", "BF16": "bfloat16",
           "F32": "float32", "F64": "float64", "C64": "complex64", "F8_E4M3": "float8_e4m3fn",
           "F8_E5M2": "float8_e5m2"}


def _corrupt(reason: str) -> RefusedFile:
    return RefusedFile(f"corrupt or truncated safetensors file ({reason}); re-export it")


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k[:80]!r}")
        out[k] = v
    return out


def _entry(name: str, e: Any) -> tuple[int, int, Any, tuple[int, ...]]:
    import torch

    label = name[:80]
    if type(e) is not dict or set(e) != {"dtype", "shape", "data_offsets"}:
        raise _corrupt(f"entry {label!r} is not {{dtype, shape, data_offsets}}")
    dtype = getattr(torch, _DTYPES.get(e["dtype"], "-"), None) if type(e["dtype"]) is str else None
    if dtype is None:
        raise _corrupt(f"entry {label!r} has unknown dtype {str(e['dtype'])[:20]!r}")
    shape, offsets = e["shape"], e["data_offsets"]
    if type(shape) is not list or len(shape) > MAX_NDIM or not all(type(d) is int and 0 <= d < 2**62 for d in shape):
        raise _corrupt(f"entry {label!r} has an invalid shape")
    if type(offsets) is not list or len(offsets) != 2 or not all(type(o) is int for o in offsets) \
            or not 0 <= offsets[0] <= offsets[1]:
        raise _corrupt(f"entry {label!r} has invalid data_offsets")
    need = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    if offsets[1] - offsets[0] != need:
        raise _corrupt(f"entry {label!r} needs {need} bytes for {e['dtype']} {tuple(shape)} but its offsets give "
                       f"{offsets[1] - offsets[0]}")
    return offsets[0], offsets[1], dtype, tuple(shape)


def load_safetensors(mf: MappedFile) -> tuple[dict[str, Any], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file (see module docstring)."""
    import torch

    mm, size = mf.data, mf.size
    if size < 8:
        raise _corrupt("shorter than its header length")
    (n,) = struct.unpack_from("<Q", mm, 0)
    if n > MAX_HEADER or 8 + n > size:
        raise _corrupt(f"its header length {n} runs past the end of the file")
    try:
        header = json.loads(bytes(mm[8:8 + n]).decode("utf-8"), object_pairs_hook=_unique)
    except RecursionError:
        raise _corrupt("its header nests too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise _corrupt(f"its header is not valid JSON: {str(exc)[:80]}") from None
    if type(header) is not dict:
        raise _corrupt("its header is not a JSON object")
    if len(header) > MAX_TENSORS + 1:
        raise RefusedFile(f"its header lists {len(header):,} tensors, more than the {MAX_TENSORS:,} sam-probe reads from "
                          "one file", "limit")
    meta = header.pop("__metadata__", None) or {}
    if type(meta) is not dict or not all(type(v) is str for v in meta.values()):
        raise _corrupt("its __metadata__ is not a map of strings")
    entries = [(*_entry(name, e), name) for name, e in header.items()]
    data_len = size - 8 - n
    pos = 0
    for begin, end, _, _, name in sorted(entries, key=lambda e: e[:2]):
        if begin != pos:
            what = "a gap before" if begin > pos else "an overlap at"
            raise _corrupt(f"its offsets leave {what} tensor {name[:80]!r}")
        pos = end
    if pos != data_len:
        raise _corrupt(f"its tensors cover {pos} bytes of a {data_len}-byte data section")
    state: dict[str, Any] = {}
    base = torch.frombuffer(mm, dtype=torch.uint8).untyped_storage() if entries else None
    for begin, end, dtype, shape, name in entries:  # in the header's order
        storage = base[8 + n + begin:8 + n + end]
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if (8 + n + begin) % itemsize:
            storage = storage.clone()
        strides = [1] * len(shape)
        for i in range(len(shape) - 2, -1, -1):
            strides[i] = strides[i + 1] * max(shape[i + 1], 1)
        state[name] = torch.empty(0, dtype=dtype).set_(storage, 0, shape, strides)
    return state, meta
