"""Compact storage of per-parameter category codes and 1-bit membership masks.

Codes (see :mod:`.categories`) are 3-bit numbers ``c = b0 + 2 b1 + 4 b2``::

    C1=000  C2=001  C3=010  C4=011  boundary=100  undefined=101

so ``b1`` = sign flip, ``b0`` = perturbed smaller (for C1..C4), and ``b2`` marks
the rare exceptions (boundary/undefined), where ``b0`` tells which one.

Format ``version 1`` (:func:`pack_codes`), a dict of numpy arrays and ints that
the store writes as HDF5 datasets/attributes::

    version    int    1
    n          int    P, the number of codes
    lo         uint8  [ceil(P/8)]  bit plane b0, ``np.packbits`` layout (MSB first,
                                   last byte zero-padded)
    hi         uint8  [ceil(P/8)]  bit plane b1, same layout
    exc_dense  int    1: ``exc`` is the bit plane b2 (same layout as ``lo``);
                      0: ``exc`` is the sorted indices where b2 = 1
                         (uint32 if P <= 2**32, else uint64)
    exc        uint8 [ceil(P/8)] or uint32/uint64 [k]

The exception representation is whichever is smaller, so a checkpoint costs
``2 + min(1, 32 k / P)`` bits per parameter (2 bits plus 4 bytes per exception
when exceptions are rarer than 1 in 32).

A *packed mask* is a set of parameter indices as ``np.packbits`` of a length-P
boolean vector (1 bit per parameter, pad bits zero).  :func:`membership_mask`
derives it from packed codes with byte-wise logic only (no unpacking), and
:func:`popcount` counts its bits (``np.bitwise_count`` on 64-bit words when
numpy >= 2, else a 256-entry lookup table).
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from .categories import CATEGORIES, CODE

VERSION = 1
_INDEX_LIMIT = 2 ** 32
_LUT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
_HAS_BITWISE_COUNT = hasattr(np, "bitwise_count")

Packed = dict[str, Any]


# ------------------------------------------------------------------ masks
def n_bytes(n: int) -> int:
    """Bytes of a packed mask of ``n`` bits: ``ceil(n / 8)``."""
    return (int(n) + 7) // 8


def tail_mask(n: int) -> int:
    """Byte with ones on the valid bits of the last byte of an ``n``-bit packed mask."""
    r = int(n) % 8
    return 0xFF if r == 0 else (0xFF << (8 - r)) & 0xFF


def clear_tail(packed: np.ndarray, n: int) -> np.ndarray:
    """Zero the pad bits of the last byte (in place) and return ``packed``."""
    if packed.size and n % 8:
        packed[-1] &= np.uint8(tail_mask(n))
    return packed


def pack_mask(mask: Any) -> np.ndarray:
    """Boolean vector (numpy or torch) -> packed mask (``np.packbits``)."""
    return np.packbits(_numpy(mask).reshape(-1).astype(bool, copy=False))


def unpack_mask(packed: np.ndarray, n: int) -> np.ndarray:
    """Packed mask -> boolean vector of ``n`` entries."""
    return np.unpackbits(packed, count=int(n)).astype(bool)


def popcount(packed: np.ndarray) -> int:
    """Number of set bits of a uint8 array."""
    a = np.ascontiguousarray(packed, dtype=np.uint8).reshape(-1)
    if not _HAS_BITWISE_COUNT:
        return int(_LUT[a].sum(dtype=np.int64))
    n8 = a.size - a.size % 8
    total = int(np.bitwise_count(a[:n8].view(np.uint64)).sum(dtype=np.int64)) if n8 else 0
    if n8 < a.size:
        total += int(np.bitwise_count(a[n8:]).sum(dtype=np.int64))
    return total


def and_count(a: np.ndarray, b: np.ndarray, buf: np.ndarray | None = None) -> int:
    """``|A ∩ B|`` = popcount(a & b) of two packed masks (``buf``: optional scratch, same size)."""
    if buf is None:
        buf = np.empty_like(a)
    np.bitwise_and(a, b, out=buf)
    return popcount(buf)


# ------------------------------------------------------------------ codes
def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def pack_codes(codes: Any) -> Packed:
    """Category codes (uint8 ``[P]``, values 0..5, numpy or torch) -> format v1 dict."""
    c = _numpy(codes).reshape(-1)
    if c.size and int(c.max()) >= len(CATEGORIES):
        raise ValueError(f"category codes must be in 0..{len(CATEGORIES) - 1}, got {int(c.max())}")
    c = c.astype(np.uint8, copy=False)
    n = int(c.size)
    lo = np.packbits(c & 1)
    hi = np.packbits(c & 2)
    exc_bits = c >= 4
    idx = np.flatnonzero(exc_bits)
    itype = np.uint32 if n <= _INDEX_LIMIT else np.uint64
    dense = idx.size * np.dtype(itype).itemsize > n_bytes(n)
    exc = np.packbits(exc_bits) if dense else idx.astype(itype)
    return {"version": VERSION, "n": n, "lo": lo, "hi": hi, "exc_dense": int(dense), "exc": exc}


def _check(packed: Packed) -> int:
    if int(packed.get("version", VERSION)) != VERSION:
        raise ValueError(f"unsupported packed-codes version {packed.get('version')!r}")
    n = int(packed["n"])
    b = n_bytes(n)
    for key in ("lo", "hi"):
        if np.asarray(packed[key]).size != b:
            raise ValueError(f"plane {key!r} has {np.asarray(packed[key]).size} bytes, expected {b} for n={n}")
    if int(packed["exc_dense"]) and np.asarray(packed["exc"]).size != b:
        raise ValueError(f"dense exception plane has {np.asarray(packed['exc']).size} bytes, expected {b}")
    return n


def exception_plane(packed: Packed) -> np.ndarray:
    """Bit plane b2 (boundary or undefined) as a packed mask (a new array)."""
    n = _check(packed)
    exc = np.asarray(packed["exc"])
    if int(packed["exc_dense"]):
        return exc.astype(np.uint8, copy=True)
    plane = np.zeros(n_bytes(n), dtype=np.uint8)
    if exc.size:
        idx = exc.astype(np.int64, copy=False)
        if int(idx.max()) >= n or int(idx.min()) < 0:
            raise ValueError("exception index out of range")
        np.bitwise_or.at(plane, idx >> 3, (0x80 >> (idx & 7)).astype(np.uint8))
    return plane


def unpack_codes(packed: Packed) -> np.ndarray:
    """Format v1 dict -> category codes (uint8 ``[P]``); exact inverse of :func:`pack_codes`."""
    n = _check(packed)
    c = np.unpackbits(np.asarray(packed["lo"]), count=n)
    c |= np.unpackbits(np.asarray(packed["hi"]), count=n) << 1
    c |= np.unpackbits(exception_plane(packed), count=n) << 2
    return c


def _code_of(category: str | int) -> int:
    if isinstance(category, str):
        if category not in CODE:
            raise ValueError(f"unknown category {category!r}; choose one of {', '.join(CATEGORIES)}")
        return CODE[category]
    code = int(category)
    if not 0 <= code < len(CATEGORIES):
        raise ValueError(f"category code must be in 0..{len(CATEGORIES) - 1}, got {code}")
    return code


def membership_mask(packed: Packed, category: str | int | Iterable[str | int]) -> np.ndarray:
    """Packed mask of the parameters in ``category`` (a name, a code, or several: their union).

    Byte-wise logic on the planes: e.g. C1 = ~(lo | hi | exc), undefined = exc & lo.
    """
    cats = [category] if isinstance(category, (str, int, np.integer)) else list(category)
    n = _check(packed)
    lo = np.asarray(packed["lo"], dtype=np.uint8)
    hi = np.asarray(packed["hi"], dtype=np.uint8)
    exc = exception_plane(packed)
    out = np.zeros_like(lo)
    tmp = np.empty_like(lo)
    for cat in cats:
        code = _code_of(cat)
        # AND over the planes of (plane if the code's bit is set else ~plane)
        np.copyto(tmp, exc if code & 4 else ~exc)
        tmp &= lo if code & 1 else ~lo
        if not code & 4:  # exceptions are told apart by b0 only
            tmp &= hi if code & 2 else ~hi
        out |= tmp
    return clear_tail(out, n)


def packed_nbytes(packed: Packed) -> int:
    """Bytes held by the arrays of a packed dict."""
    return int(sum(np.asarray(v).nbytes for v in packed.values() if isinstance(v, np.ndarray)))


def bits_per_param(packed: Packed) -> float:
    """Array bits per parameter of a packed dict (2 + exceptions)."""
    n = int(packed["n"])
    return 8.0 * packed_nbytes(packed) / n if n else 0.0
