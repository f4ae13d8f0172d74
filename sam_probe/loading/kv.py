"""``key=value`` option values (``--model-arg hidden=64,64``), parsed without importing torch."""
from __future__ import annotations

from typing import Any

from ..errors import SpecError


def parse_value(text: str) -> Any:
    """``"3"`` -> 3, ``"0.1"`` -> 0.1, ``"true"`` -> True, ``"none"`` -> None,
    ``"64,64"`` -> [64, 64]; anything else stays a string."""
    if "," in text:
        return [parse_value(p.strip()) for p in text.split(",") if p.strip()]
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_kv(items: list[str] | None) -> dict[str, Any]:
    """Repeated ``key=value`` strings -> dict (values via :func:`parse_value`; last wins)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SpecError(f"expected key=value, got {item!r} (e.g. --model-arg hidden=64,64)")
        out[key] = parse_value(value.strip())
    return out
