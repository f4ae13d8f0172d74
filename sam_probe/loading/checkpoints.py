"""Reading one checkpoint file of any common layout into a flat state dict.

- Format from content: torch zip archives (``.pt/.pth/.ckpt/.bin``), legacy
  torch pickles, safetensors.  TorchScript archives are refused with advice.
- Layout: a raw state dict, or one under ``model``, ``state_dict``,
  ``model_state_dict``, ``net``, ``module``, ``ema`` (or ``key='a.b'``).
- Prefixes ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) are stripped
  repeatedly, in any order.
- Step from the contents (``step``, ``global_step``, ``iteration``, ``epoch``),
  else the file name, else the position in the run.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import CheckpointError
from .safe_pickle import Placeholder, UnsafePickleError, safe_load

STATE_KEYS = ("model", "state_dict", "model_state_dict", "net", "module", "ema")
STEP_KEYS = ("step", "global_step", "iteration", "epoch")
HPARAM_KEYS = ("hparams", "hyper_parameters", "hyperparameters", "args", "config", "cfg", "opt")
STRIP_PREFIXES = ("module.", "_orig_mod.")
_NAME_STEP_RES = (
    re.compile(r"(?:^|[^a-z])step[=_-]?(\d+)", re.IGNORECASE),
    re.compile(r"(?:^|[^a-z])(?:iter|iteration|it)[=_-]?(\d+)", re.IGNORECASE),
    re.compile(r"(\d+)(?!.*\d)"),
)


@dataclass
class Checkpoint:
    """A loaded checkpoint: its tensors (prefix-free names) and what was found beside them."""

    path: str
    format: str
    layout: str
    state: dict[str, Tensor]
    step: int | None = None
    step_source: str = "position"
    extra_keys: list[str] = field(default_factory=list)
    hparams: dict[str, Any] = field(default_factory=dict)
    model_spec: dict[str, Any] | None = None
    placeholders: list[str] = field(default_factory=list)
    stripped_prefixes: list[str] = field(default_factory=list)
    trusted: bool = False

    @property
    def n_params(self) -> int:
        return sum(t.numel() for t in self.state.values() if t.is_floating_point() or t.is_complex())

    def nonfinite(self) -> dict[str, int]:
        """``{tensor name: number of NaN/Inf entries}`` for tensors that have any."""
        bad = {}
        for name, t in self.state.items():
            if t.is_floating_point() or t.is_complex():
                n = int((~torch.isfinite(t)).sum())
                if n:
                    bad[name] = n
        return bad

    def sha256(self) -> str:
        return file_sha256(self.path)


def file_sha256(path: str | Path, chunk: int = 2**20) -> str:
    if Path(path).is_dir():  # a Hugging Face folder checkpoint (loading/hf.py)
        from .hf import folder_sha256
        return folder_sha256(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------ formats
def detect_format(path: str | Path) -> str:
    """``torch-zip``, ``truncated-zip``, ``torchscript``, ``torch-legacy``, ``safetensors`` or ``unknown``."""
    p = Path(path)
    with open(p, "rb") as f:
        head = f.read(16)
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(p) as zf:
                names = zf.namelist()
        except zipfile.BadZipFile:
            return "truncated-zip"
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            return "torchscript"
        return "torch-zip"
    if len(head) >= 9 and head[0] == 0x80 and head[1] in (2, 3, 4, 5):
        return "torch-legacy"
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n < 100 * 2**20 and head[8:9] == b"{":
            return "safetensors"
    return "unknown"


def _load_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        meta = header.get("__metadata__") or {}
        return load_file(str(path)), meta
    except (SafetensorError, ValueError, OSError, struct.error) as exc:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({_short(exc)}); re-export it") from None


def _short(exc: BaseException) -> str:
    """First sentence of an exception's message (library messages can run long)."""
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return msg.split(". ")[0][:160]


def read_object(path: str | Path, *, trust: bool = False) -> tuple[str, Any, list[str], dict[str, str]]:
    """``(format, loaded object, placeholder globals, safetensors metadata)``."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file")
    if p.is_dir():
        raise CheckpointError(f"{p}: is a directory; give a checkpoint file")
    if p.stat().st_size == 0:
        raise CheckpointError(f"{p}: empty file (0 bytes); the save was probably interrupted")
    fmt = detect_format(p)
    if fmt == "torchscript":
        raise CheckpointError(
            f"{p}: TorchScript archive, not a checkpoint; load it with torch.jit.load and torch.save(m.state_dict(), ...)")
    if fmt == "unknown":
        raise CheckpointError(f"{p}: not a checkpoint (neither a torch file nor safetensors)")
    if fmt == "truncated-zip":
        raise CheckpointError(f"{p}: truncated or corrupt file (its zip directory is missing); re-save or re-copy it")
    if fmt == "safetensors":
        state, meta = _load_safetensors(p)
        return fmt, state, [], meta
    try:
        obj, placeholders = safe_load(str(p), mmap=(fmt == "torch-zip"), trust=trust)
    except UnsafePickleError as exc:
        raise CheckpointError(
            f"{p}: refused: its pickle references {exc.global_name}, which would run code on load "
            "(nothing was executed); if you wrote this file yourself, pass --trust-checkpoint") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, Exception) as exc:  # noqa: BLE001
        text = str(exc)
        if "central directory" in text or "zip archive" in text or isinstance(exc, (EOFError, zipfile.BadZipFile)):
            raise CheckpointError(f"{p}: truncated or corrupt file ({_short(exc)}); re-save or re-copy it") from None
        if "Unsupported operand" in text or "weights_only" in text.lower():
            raise CheckpointError(
                f"{p}: cannot be read safely ({_short(exc)}); re-save it as torch.save(model.state_dict(), path), "
                "or, only if you wrote it yourself, pass --trust-checkpoint") from None
        raise CheckpointError(f"{p}: cannot be read ({_short(exc)})") from None
    return fmt, obj, placeholders, {}


# ------------------------------------------------------------------ layouts
def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and any(isinstance(v, Tensor) for v in obj.values()) \
        and all(isinstance(k, str) for k in obj)


def _as_state(obj: Any) -> dict[str, Tensor] | None:
    if isinstance(obj, torch.nn.Module):
        return dict(obj.state_dict())
    if _is_tensor_dict(obj):
        return {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    return None


def find_state(obj: Any, key: str | None = None) -> tuple[dict[str, Tensor], str]:
    """The state dict inside ``obj`` and the layout name that located it."""
    if key:
        cur = obj
        for part in key.split("."):
            if isinstance(cur, dict) and part in cur:
                cur = cur[part]
            else:
                have = ", ".join(map(str, list(cur)[:12])) if isinstance(cur, dict) else type(cur).__name__
                raise CheckpointError(f"--key {key}: no entry {part!r} (found: {have})")
        state = _as_state(cur)
        if state is None:
            raise CheckpointError(f"--key {key}: that entry holds no tensors")
        return state, f"key:{key}"
    if isinstance(obj, dict):
        tensors = sum(isinstance(v, Tensor) for v in obj.values())
        nested = [k for k in STATE_KEYS if k in obj and _as_state(obj[k]) is not None]
        # a 0-dim tensor beside a nested state is metadata (e.g. a tensor step), not weights
        weights = sum(isinstance(v, Tensor) and v.dim() > 0 for v in obj.values())
        biggest = max((len(_as_state(obj[k]) or {}) for k in nested), default=0)
        if tensors and (not nested or weights > biggest):
            layout = "lightning" if "pytorch-lightning_version" in obj else "state_dict"
            return _as_state(obj), layout  # type: ignore[return-value]
        for k in STATE_KEYS:
            if k in nested:
                layout = "lightning" if "pytorch-lightning_version" in obj else f"key:{k}"
                return _as_state(obj[k]), layout  # type: ignore[return-value]
        # one level deeper, e.g. {'ema': {'model': {...}}}
        for k in STATE_KEYS:
            inner = obj.get(k)
            if isinstance(inner, dict):
                for k2 in STATE_KEYS:
                    if k2 in inner and _as_state(inner[k2]) is not None:
                        return _as_state(inner[k2]), f"key:{k}.{k2}"  # type: ignore[return-value]
        keys = ", ".join(map(str, list(obj)[:12]))
        raise CheckpointError(f"no tensors found (top-level keys: {keys}); point at the weights with --key NAME")
    state = _as_state(obj)
    if state is not None:
        return state, "module" if isinstance(obj, torch.nn.Module) else "state_dict"
    raise CheckpointError(f"no tensors found (the file holds a {type(obj).__name__}); is it a checkpoint?")


def strip_prefixes(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Remove leading ``module.`` / ``_orig_mod.`` from every name, repeatedly, any order."""
    stripped: list[str] = []
    while state:
        for pre in STRIP_PREFIXES:
            if all(k.startswith(pre) for k in state):
                state = {k[len(pre):]: v for k, v in state.items()}
                stripped.append(pre)
                break
        else:
            break
    # torch.compile inside DDP may leave _orig_mod. after another prefix (e.g. 'model._orig_mod.')
    if any("._orig_mod." in k for k in state):
        state = {k.replace("._orig_mod.", "."): v for k, v in state.items()}
        stripped.append("*._orig_mod.")
    return state, stripped


# ------------------------------------------------------------------ extras
def plain(obj: Any, depth: int = 0) -> Any:
    """A JSON-able copy of hyper-parameter-like data (placeholders unwrapped)."""
    if depth > 6:
        return repr(obj)[:80]
    if isinstance(obj, Placeholder):
        return plain(obj.plain(), depth + 1)
    if isinstance(obj, dict):
        return {str(k): plain(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v, depth + 1) for v in obj]
    if isinstance(obj, (bool, int, str)) or obj is None:
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, Tensor):
        return obj.item() if obj.numel() == 1 else f"<tensor {tuple(obj.shape)}>"
    try:
        import numpy as np
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist() if obj.size <= 64 else f"<array {obj.shape}>"
    except ImportError:  # pragma: no cover
        pass
    return repr(obj)[:80]


def _as_int(v: Any) -> int | None:
    v = plain(v)
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return None


def step_from_name(path: str | Path) -> int | None:
    stem = Path(path).name
    for ext in (".safetensors", ".ckpt", ".pth", ".pt", ".bin"):
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
    for rx in _NAME_STEP_RES:
        m = rx.search(stem)
        if m:
            return int(m.group(1))
    return None


def find_step(obj: Any, meta: dict[str, str], path: str | Path) -> tuple[int | None, str]:
    """Step and where it came from: ``content:<key>``, ``filename`` or ``position``."""
    sources = [obj] if isinstance(obj, dict) else []
    if meta:
        sources.append(meta)
    for src in sources:
        for k in STEP_KEYS:
            if k in src:
                v = _as_int(src[k]) if not isinstance(src[k], str) else (int(src[k]) if src[k].isdigit() else None)
                if v is not None:
                    return v, f"content:{k}"
    s = step_from_name(path)
    if s is not None:
        return s, "filename"
    return None, "position"


def find_hparams(obj: Any) -> dict[str, Any]:
    """Hyper-parameters saved beside the weights, as plain data."""
    if not isinstance(obj, dict):
        return {}
    out: dict[str, Any] = {}
    for k in HPARAM_KEYS:
        if k in obj:
            v = plain(obj[k])
            if isinstance(v, dict):
                out.update(v)
    return out


def load_checkpoint(path: str | Path, *, key: str | None = None, trust: bool = False) -> Checkpoint:
    """Read ``path`` safely and return its tensors with format, layout and step."""
    if Path(path).is_dir():  # a Hugging Face folder checkpoint (loading/hf.py)
        from .hf import load_folder
        return load_folder(path, key=key, trust=trust)
    fmt, obj, placeholders, meta = read_object(path, trust=trust)
    try:
        state, layout = find_state(obj, key)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    state, stripped = strip_prefixes(state)
    step, source = find_step(obj, meta, path)
    holder = {"lightning": "state_dict"}.get(layout, layout.split(":", 1)[-1].split(".")[0])
    extra = [str(k) for k, v in obj.items() if not isinstance(v, Tensor) and k != holder] if isinstance(obj, dict) else []
    spec = obj.get("model_spec") if isinstance(obj, dict) else None
    spec = plain(spec) if spec is not None else None
    if meta.get("model_spec"):
        try:
            spec = json.loads(meta["model_spec"])
        except ValueError:
            spec = None
    hparams = find_hparams(obj)
    if meta.get("hparams"):
        try:
            hparams.update(json.loads(meta["hparams"]))
        except ValueError:
            pass
    return Checkpoint(
        path=str(path), format=fmt, layout=layout, state=state, step=step, step_source=source,
        extra_keys=extra, hparams=hparams, model_spec=spec if isinstance(spec, dict) else None,
        placeholders=placeholders, stripped_prefixes=stripped, trusted=trust,
    )
