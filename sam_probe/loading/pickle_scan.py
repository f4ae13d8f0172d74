"""A bounded pre-scan of a pickle, before torch's restricted unpickler sees it.

``scan_pickle`` walks the opcodes of one pickle (never runs it) in a single
pass whose cost is a small constant per opcode, and

- names every global the pickle references (``GLOBAL`` is the only way: torch's
  ``weights_only`` unpickler reads no ``STACK_GLOBAL``, ``INST`` or ``OBJ``), with
  the same py2 -> py3 renaming torch applies, so they can be checked and turned into
  placeholders before anything is unpickled;
- refuses opcodes torch's restricted unpickler does not read (so the error names
  the opcode, not a half-built object);
- bounds the work torch and sam-probe will do on the result: at most
  ``MAX_PICKLE_BYTES`` bytes and ``MAX_OPS`` opcodes, at most ``MAX_FANOUT`` for the
  *memo fan-out*, tuples nested at most ``MAX_TUPLE_DEPTH`` deep and at most
  ``MAX_BIG_INTS`` integers of 8 bytes or more.

Memo fan-out: the scan keeps, for every value on the simulated stack, its
expanded size ``w`` (1 for a scalar, 1 + the sizes of the items for a tuple, list
or dict, 1 + the size of the arguments for a call).  Each memo fetch (``BINGET``)
adds the fetched value's ``w`` to the fan-out.  Without memo references a value is
built by its own opcodes, so every pass over its expansion (hashing a tuple key,
comparing keys, converting metadata) costs at most the opcode count; with them,
at most opcodes + fan-out.  A "billion laughs" pickle (a value referenced twice
at every level) has a fan-out of 2^depth and is refused after a few kilobytes.

Tuple depth is bounded because CPython hashes a tuple by C recursion over its
items: a dict key of a million nested tuples overflows the C stack (SIGSEGV).
Integers of 8 bytes or more are bounded because integers congruent modulo
2^61 - 1 share a hash: thousands of them as dict keys would make inserting them
quadratic.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

from .files import RefusedFile

MAX_PICKLE_BYTES = 128 * 2**20
MAX_OPS = 4_000_000
MAX_FANOUT = 16_000_000
MAX_BIG_INTS = 4096
MAX_TUPLE_DEPTH = 1000
_CAP = 4 * MAX_FANOUT  # weights are clipped here so they stay small integers
# A simulated value is a list ``[w]`` for a mutable container (lists and dicts grow after they are pushed) or
# the int ``w << _SHIFT | d`` for an immutable one, ``d`` its tuple nesting depth: CPython hashes nested tuples
# by plain C recursion, so a million nested tuples used as a dict key crash the interpreter.
_SHIFT = 12
_DEPTH = (1 << _SHIFT) - 1
_ONE = 1 << _SHIFT

# opcode categories, in order of how often torch.save writes them
(_PUT1, _PUT4, _STR4, _GLOBAL, _PUSH, _TUPLEN, _MARK, _TUPLE, _GET1, _GET4, _REDUCE, _SETITEM, _SETITEMS,
 _CELL, _STR1, _LONG1, _APPEND, _APPENDS, _NEWOBJ, _BUILD, _PERSID, _PROTO, _STOP) = range(1, 24)
_CATEGORY = [0] * 256
_SKIP = [0] * 256  # argument bytes of fixed-size pushes
for _op, _cat, _skip in (
        (b"q", _PUT1, 0), (b"r", _PUT4, 0), (b"X", _STR4, 0), (b"c", _GLOBAL, 0),
        (b"N", _PUSH, 0), (b"\x88", _PUSH, 0), (b"\x89", _PUSH, 0), (b")", _PUSH, 0),
        (b"K", _PUSH, 1), (b"M", _PUSH, 2), (b"J", _PUSH, 4), (b"G", _PUSH, 8),
        (b"\x85", _TUPLEN, 1), (b"\x86", _TUPLEN, 2), (b"\x87", _TUPLEN, 3), (b"(", _MARK, 0), (b"t", _TUPLE, 0),
        (b"h", _GET1, 0), (b"j", _GET4, 0), (b"R", _REDUCE, 0), (b"s", _SETITEM, 0), (b"u", _SETITEMS, 0),
        (b"]", _CELL, 0), (b"}", _CELL, 0), (b"\x8f", _CELL, 0), (b"U", _STR1, 0), (b"\x8a", _LONG1, 0),
        (b"a", _APPEND, 0), (b"e", _APPENDS, 0), (b"\x81", _NEWOBJ, 0), (b"b", _BUILD, 0), (b"Q", _PERSID, 0),
        (b"\x80", _PROTO, 0), (b".", _STOP, 0)):
    _CATEGORY[_op[0]] = _cat
    _SKIP[_op[0]] = _skip
_U32 = struct.Struct("<I").unpack_from


@dataclass
class PickleScan:
    """What one pickle references and how much work it is."""

    start: int
    end: int  # offset just past its STOP opcode
    globals: set[str] = field(default_factory=set)
    ops: int = 0
    fanout: int = 0


def _py3_globals(raw: set[tuple[str, str]]) -> set[str]:
    """``module.name`` of each global as torch's restricted unpickler looks it up (py2 names mapped)."""
    try:
        from torch._utils import IMPORT_MAPPING, NAME_MAPPING
    except ImportError:  # pragma: no cover - older torch
        from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
    out = set()
    for module, name in raw:
        if (module, name) in NAME_MAPPING:
            module, name = NAME_MAPPING[(module, name)]
        elif module in IMPORT_MAPPING:
            module = IMPORT_MAPPING[module]
        out.add(f"{module}.{name}")
    return out


def _w(v) -> int:
    return v >> _SHIFT if v.__class__ is int else v[0]


def _tuple(items: list, what: str) -> int:
    w, d = 1, 0
    for v in items:
        if v.__class__ is int:
            w += v >> _SHIFT
            if v & _DEPTH > d:
                d = v & _DEPTH
        else:
            w += v[0]
    if d >= MAX_TUPLE_DEPTH:
        raise RefusedFile(f"{what} nests tuples more than {MAX_TUPLE_DEPTH} deep (hashing them would overflow the C "
                          "stack); refusing to unpickle it", "limit")
    return min(w, _CAP) << _SHIFT | (d + 1)


def scan_pickle(buf, start: int = 0, *, what: str = "its pickle") -> PickleScan:
    """Scan the pickle that starts at ``buf[start]`` (bytes or mmap); raise :class:`RefusedFile`."""
    n = len(buf)
    limit = min(n, start + MAX_PICKLE_BYTES)
    category, skip = _CATEGORY, _SKIP
    stack: list = []
    marks: list[list] = []
    memo: dict[int, object] = {}
    names: set[tuple[str, str]] = set()
    i, ops, fanout, big = start, 0, 0, 0
    try:
        while True:
            if i >= limit:
                if limit < n:
                    raise RefusedFile(f"{what} is larger than {MAX_PICKLE_BYTES // 2**20} MiB, far more than a "
                                      "checkpoint's metadata; refusing to unpickle it", "limit")
                raise RefusedFile(f"{what} ends before its STOP opcode (truncated)")
            op = buf[i]
            i += 1
            ops += 1
            cat = category[op]
            if cat == _PUSH:
                i += skip[op]
                stack.append(_ONE)
            elif cat == _PUT1:
                memo[buf[i]] = stack[-1]
                i += 1
            elif cat == _PUT4:
                memo[_U32(buf, i)[0]] = stack[-1]
                i += 4
            elif cat == _STR4:
                i += 4 + _U32(buf, i)[0]
                stack.append(_ONE)
            elif cat == _GET1 or cat == _GET4:
                if cat == _GET1:
                    v = memo[buf[i]]
                    i += 1
                else:
                    v = memo[_U32(buf, i)[0]]
                    i += 4
                fanout += v >> _SHIFT if v.__class__ is int else v[0]
                if fanout > MAX_FANOUT:
                    raise RefusedFile(f"{what} references shared values more than {MAX_FANOUT:,} times over (a memo "
                                      "bomb: a few bytes that expand exponentially); refusing to unpickle it", "limit")
                stack.append(v)
            elif cat == _GLOBAL:
                j = buf.find(b"\n", i)
                k = buf.find(b"\n", j + 1) if j >= 0 else -1
                if k < 0 or k >= limit:
                    raise RefusedFile(f"{what} ends inside a GLOBAL opcode (truncated)")
                try:
                    module, name = bytes(buf[i:j]).decode("utf-8"), bytes(buf[j + 1:k]).decode("utf-8")
                except UnicodeDecodeError:
                    raise RefusedFile(f"{what} names a global that is not UTF-8 text") from None
                names.add((module, name))
                i = k + 1
                stack.append(_ONE)
            elif cat == _TUPLEN:
                m = skip[op]
                if len(stack) < m:
                    raise IndexError("stack underflow")
                v = _tuple(stack[-m:], what)
                del stack[-m:]
                stack.append(v)
            elif cat == _MARK:
                marks.append(stack)
                stack = []
            elif cat == _TUPLE:
                v = _tuple(stack, what)
                stack = marks.pop()
                stack.append(v)
            elif cat == _REDUCE:  # a call's result is hashed by identity or holds only numbers: depth 0
                args = stack.pop()
                stack[-1] = min(1 + _w(args), _CAP) << _SHIFT
            elif cat == _NEWOBJ:
                args = stack.pop()
                stack[-1] = min(1 + _w(args), _CAP) << _SHIFT
            elif cat == _SETITEM:
                v = stack.pop()
                k_ = stack.pop()
                target = stack[-1]
                if target.__class__ is list:
                    target[0] = min(target[0] + _w(k_) + _w(v), _CAP)
            elif cat == _SETITEMS or cat == _APPENDS:
                w = 0
                for v in stack:
                    w += v >> _SHIFT if v.__class__ is int else v[0]
                stack = marks.pop()
                target = stack[-1]
                if target.__class__ is list:
                    target[0] = min(target[0] + w, _CAP)
            elif cat == _APPEND:
                v = stack.pop()
                target = stack[-1]
                if target.__class__ is list:
                    target[0] = min(target[0] + _w(v), _CAP)
            elif cat == _CELL:
                stack.append([1])
            elif cat == _STR1:
                i += 1 + buf[i]
                stack.append(_ONE)
            elif cat == _LONG1:
                size = buf[i]
                i += 1 + size
                if size >= 8:
                    big += 1
                    if big > MAX_BIG_INTS:
                        raise RefusedFile(f"{what} holds more than {MAX_BIG_INTS} integers of 8 bytes or more (a "
                                          "hash-collision bomb); refusing to unpickle it", "limit")
                stack.append(_ONE)
            elif cat == _BUILD:
                stack.pop()
                stack[-1]  # noqa: B018 - BUILD needs an object below its state
            elif cat == _PERSID:
                stack[-1] = _ONE
            elif cat == _PROTO:
                i += 1
            elif cat == _STOP:
                stack.pop()
                if i > limit:
                    raise RefusedFile(f"{what} ends before its STOP opcode (truncated)")
                return PickleScan(start, i, _py3_globals(names), ops, fanout)
            else:
                raise RefusedFile(f"{what} uses pickle opcode {bytes([op])!r} at byte {i - 1 - start}, which "
                                  "sam-probe's safe loader does not read", "unsupported")
            if ops > MAX_OPS:
                raise RefusedFile(f"{what} has more than {MAX_OPS:,} opcodes, far more than a checkpoint's "
                                  "metadata; refusing to unpickle it", "limit")
    except (IndexError, KeyError, struct.error) as exc:
        if i >= limit or isinstance(exc, struct.error):
            raise RefusedFile(f"{what} ends before its STOP opcode (truncated)") from None
        what_went_wrong = "refers to a memo entry it never stored" if isinstance(exc, KeyError) else \
            "pops more values than it pushed"
        raise RefusedFile(f"{what} is malformed (at byte {i - start} it {what_went_wrong})") from None
