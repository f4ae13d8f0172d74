"""One bounded pass over an unpickled object graph, replacing some of its objects.

Containers (dicts and their subclasses torch allows, lists, tuples, sets and
placeholders' arguments and state) are visited once each, shared references and
cycles included, with an explicit stack (never recursion): the work is linear
in the number of distinct objects and references, which the pre-scan bounds.
Lists and dicts are changed in place; tuples and sets that hold a replaced
object are rebuilt (a tuple inside a cycle keeps its original items).
"""
from __future__ import annotations

from collections import Counter, OrderedDict
from typing import Any, Callable

from .placeholders import Placeholder

_MAPPINGS = (dict, OrderedDict, Counter)
_LEAVES = (str, int, float, bool, bytes, bytearray, complex, type(None))


def _children(obj: Any) -> list:
    t = type(obj)
    if t in _MAPPINGS:
        return [*obj.keys(), *obj.values()]
    if t in (list, tuple, set, frozenset):
        return list(obj)
    if isinstance(obj, Placeholder):
        return [obj.args, obj.state]
    return []


def _hashable(new_key: Any, old_key: Any) -> Any:
    """``new_key`` if it can key a dict or set, else the (inert) original."""
    try:
        hash(new_key)
        return new_key
    except TypeError:
        return old_key


def _rebuilt(obj: Any, new: dict[int, Any]) -> Any:
    """``obj`` with its children replaced by their new values (lists and dicts in place)."""
    t = type(obj)
    get = new.get
    if t is list:
        for i, v in enumerate(obj):
            r = get(id(v), v)
            if r is not v:
                obj[i] = r
        return obj
    if t in _MAPPINGS:
        if any(get(id(k), k) is not k for k in obj):
            items = [(_hashable(get(id(k), k), k), get(id(v), v)) for k, v in obj.items()]
            obj.clear()
            for k, v in items:
                obj[k] = v
        else:
            for k, v in obj.items():
                r = get(id(v), v)
                if r is not v:
                    obj[k] = r
        return obj
    if t is tuple:
        items = [get(id(v), v) for v in obj]
        return obj if all(a is b for a, b in zip(items, obj)) else tuple(items)
    if t in (set, frozenset):
        items = [_hashable(get(id(v), v), v) for v in obj]
        return obj if all(a is b for a, b in zip(items, obj)) else t(items)
    if isinstance(obj, Placeholder):
        for name in ("args", "state"):
            v = getattr(obj, name)
            r = get(id(v), v)
            if r is not v:
                object.__setattr__(obj, name, r)
    return obj


def replace_all(root: Any, pick: Callable[[Any], Any]) -> Any:
    """``root`` with every object ``o`` for which ``pick(o)`` is not ``None`` replaced by ``pick(o)``.

    ``pick`` is asked about every reachable object that is not a plain scalar,
    before its children are looked at; a replaced object's children are not visited.
    """
    new: dict[int, Any] = {}
    open_: set[int] = set()
    keep: list[Any] = []  # every visited object stays alive, so no id is reused during the walk
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        obj, closing = stack.pop()
        oid = id(obj)
        if closing:
            open_.discard(oid)
            new[oid] = _rebuilt(obj, new)
            continue
        if oid in new or oid in open_:
            continue
        replacement = pick(obj)
        if replacement is not None:
            keep.append(obj)
            new[oid] = replacement
            continue
        kids = _children(obj)
        if not kids:
            continue
        keep.append(obj)
        open_.add(oid)
        stack.append((obj, True))
        stack.extend((k, False) for k in kids if type(k) not in _LEAVES)
    return new.get(id(root), root)
