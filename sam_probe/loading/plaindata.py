"""Checkpoint metadata as plain, bounded, JSON-able data.

:func:`plain` turns what a checkpoint holds beside its weights (hyper-parameter
dicts, placeholders, numpy scalars, small tensors) into ``None``/bool/int/float/
str, lists and string-keyed dicts, and never does unbounded work on it:

- at most ``MAX_DEPTH`` levels and ``MAX_NODES`` values in all (shared
  references count each time they are reached, so a memo bomb or a cycle ends
  in ``"<...>"`` markers instead of expanding);
- strings cut at ``MAX_STR`` characters (and made encodable: lone surrogates
  escaped), bytes shown as ``"<bytes 12: 0a0b...>"`` (hex only up to 16 bytes),
  integers beyond 1024 bits as ``"<int of N bits>"``, non-finite floats as text;
- numpy arrays and tensors become nested lists only when they are of a plain
  numeric dtype and hold at most ``MAX_ARRAY`` values, element by element (never
  ``.tolist()``, never ``repr()``); larger ones as ``"<array (3, 4) float32>"``;
- any other object as ``"<module.Type>"``.
"""
from __future__ import annotations

import math
import sys
from typing import Any

from .placeholders import Placeholder

MAX_DEPTH = 32
MAX_NODES = 20_000
MAX_STR = 4096
MAX_ARRAY = 64
MAX_INT_BITS = 1024


class _Budget:
    __slots__ = ("left",)

    def __init__(self, n: int):
        self.left = n


def text(s: str) -> str:
    """``s`` cut to ``MAX_STR`` characters and always encodable as UTF-8."""
    if len(s) > MAX_STR:
        s = f"{s[:MAX_STR]}... <{len(s)} chars>"
    if not s.isascii():
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:
            s = s.encode("utf-8", "backslashreplace").decode("utf-8")
    return s


def _type_name(obj: Any) -> str:
    t = type(obj)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def _int(v: int) -> Any:
    return v if v.bit_length() <= MAX_INT_BITS else f"<int of {v.bit_length()} bits>"


def _bytes(b: bytes | bytearray) -> str:
    return f"<bytes {len(b)}: {bytes(b).hex()}>" if len(b) <= 16 else f"<bytes {len(b)}>"


def key_text(k: Any) -> str:
    """A dict key as a short string (never ``repr`` of a large or nested object)."""
    t = type(k)
    if t is str:
        return text(k)
    if k is None or t in (bool, float):
        return str(k)
    if t is int:
        return str(_int(k))
    if t in (bytes, bytearray):
        return _bytes(k)
    return f"<{_type_name(k)}>"


def _nest(flat: list, shape: tuple[int, ...]) -> Any:
    if not shape:
        return flat[0]
    if len(shape) == 1:
        return flat
    step = len(flat) // shape[0] if shape[0] else 0
    return [_nest(flat[i * step:(i + 1) * step], shape[1:]) for i in range(shape[0])]


def _numbers(values, shape: tuple[int, ...], depth: int, b: _Budget) -> Any:
    flat = [_plain(v, depth + 1, b) for v in values]
    return _nest(flat, shape)


def _array(arr: Any, depth: int, b: _Budget) -> Any:
    dt = arr.dtype
    if dt.kind in "biufc" and dt.fields is None and dt.subdtype is None and arr.size <= MAX_ARRAY and arr.ndim <= 8:
        return _numbers((v.item() for v in arr.reshape(-1)), tuple(arr.shape), depth, b)
    return f"<array {tuple(arr.shape)} {text(str(dt))[:40]}>"


def _tensor(t: Any, depth: int, b: _Budget) -> Any:
    import torch

    dense = t.layout == torch.strided and t.device.type == "cpu" and not t.is_quantized
    if dense and t.numel() == 1:
        try:
            return _plain(t.item(), depth + 1, b)
        except (RuntimeError, ValueError, TypeError):
            pass
    return f"<tensor {tuple(t.shape)} {str(t.dtype).replace('torch.', '')}>"


def _other(obj: Any, depth: int, b: _Budget) -> Any:
    np = sys.modules.get("numpy")
    if np is not None:
        if isinstance(obj, np.ndarray):
            return _array(obj, depth, b)
        if isinstance(obj, np.generic):
            kind = obj.dtype.kind
            if kind in "biuf":
                return _plain(obj.item(), depth + 1, b)
            if kind == "c":
                return str(complex(obj))
            return f"<numpy {text(str(obj.dtype))[:40]} scalar>"
        if isinstance(obj, np.dtype):
            return text(str(obj))[:80]
    torch = sys.modules.get("torch")
    if torch is not None:
        if isinstance(obj, torch.Tensor):
            return _tensor(obj, depth, b)
        if isinstance(obj, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
            return str(obj)
    if isinstance(obj, complex):
        return str(obj)
    if isinstance(obj, bool):
        return bool(obj)
    if isinstance(obj, int):
        return _int(int(obj))
    if isinstance(obj, float):
        return _plain(float(obj), depth, b)
    if isinstance(obj, str):
        return text(str(obj))
    return f"<{_type_name(obj)}>"


def _plain(obj: Any, depth: int, b: _Budget) -> Any:
    b.left -= 1
    if b.left < 0:
        return "<...>"
    t = type(obj)
    if obj is None or t is bool:
        return obj
    if t is int:
        return _int(obj)
    if t is float:
        return obj if math.isfinite(obj) else str(obj)
    if t is str:
        return text(obj)
    if t in (bytes, bytearray):
        return _bytes(obj)
    if depth >= MAX_DEPTH:
        return f"<{_type_name(obj)} nested deeper than {MAX_DEPTH} levels>"
    if isinstance(obj, Placeholder):
        return _plain(obj.plain(), depth + 1, b)
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            if b.left <= 0:
                out["..."] = f"<{len(obj) - len(out)} more entries>"
                break
            out[key_text(k)] = _plain(v, depth + 1, b)
        return out
    if isinstance(obj, (list, tuple, set, frozenset)):
        items: list[Any] = []
        for v in obj:
            if b.left <= 0:
                items.append(f"<{len(obj) - len(items)} more items>")
                break
            items.append(_plain(v, depth + 1, b))
        return items
    return _other(obj, depth, b)


def plain(obj: Any, depth: int = 0) -> Any:
    """A bounded, JSON-able copy of hyper-parameter-like data (placeholders unwrapped)."""
    return _plain(obj, depth, _Budget(MAX_NODES))
