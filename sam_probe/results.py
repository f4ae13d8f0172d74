"""Results as plain JSON data: what ``--json`` prints, ``report`` reads and the store round-trips.

Torch-free: a tensor can only exist once torch is imported, so this module looks
torch up in ``sys.modules`` instead of importing it (``report`` never loads torch).
"""
from __future__ import annotations

import math
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

PACKED_KEYS = ("codes", "ire_flat", "eigenvectors")  # packed numpy arrays that analyses read back as they are


def without_packed(result: dict[str, Any]) -> dict[str, Any]:
    """A result without its packed arrays (they stay in the store; JSON and tables leave them out)."""
    return {k: v for k, v in result.items() if k not in PACKED_KEYS}


def from_store(result: dict[str, Any]) -> dict[str, Any]:
    """A stored result as the command computed it: plain lists and numbers (packed arrays kept)."""
    return {k: v if k in PACKED_KEYS else jsonable(v) for k, v in result.items()}


def _is_tensor(obj: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)


def jsonable(obj: Any) -> Any:
    """Plain JSON types (numpy arrays/tensors to lists, NaN/Inf to None, paths to strings, dataclasses to dicts)."""
    import numpy as np

    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if _is_tensor(obj):
        return jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return jsonable(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "__dataclass_fields__") and not isinstance(obj, type):
        return jsonable(asdict(obj))
    return obj
