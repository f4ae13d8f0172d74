"""Reading one checkpoint file of any common layout into a flat state dict.

- Format from content: torch zip archives (``.pt/.pth/.ckpt/.bin``), legacy
  torch pickles, safetensors.  TorchScript archives are refused with advice.
- Layout: a raw state dict, or one under ``model``, ``state_dict``,
  ``model_state_dict``, ``net``, ``module``, ``ema`` (or ``key='a.b'``).
- Prefixes ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) are stripped
  repeatedly, in any order.
- Step from the contents (``step``, ``global_step``, ``iteration``, ``epoch``),
  else the file name, else the position in the run.

Every file is hostile input: it is opened without blocking (FIFOs, devices and
sockets are refused), memory-mapped once, verified (zip CRCs, safetensors
offsets) and unpickled only by the restricted loader of :mod:`.safe_pickle`;
the tensors of the state dict must be dense CPU tensors whose entries do not
overlap, and metadata is converted by the bounded :func:`.plaindata.plain`.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import CheckpointError
from .archive import TorchZip
from .files import RefusedFile, display, map_file, open_regular, printable, read_head
from .plaindata import key_text, plain
from .placeholders import Placeholder
from .rebuild_guard import span, strided_problem
from .safe_pickle import load_mapped
from .safetensors_file import load_safetensors

STATE_KEYS = ("model", "state_dict", "model_state_dict", "net", "module", "ema")
STEP_KEYS = ("step", "global_step", "iteration", "epoch")
HPARAM_KEYS = ("hparams", "hyper_parameters", "hyperparameters", "args", "config", "cfg", "opt")
STRIP_PREFIXES = ("module.", "_orig_mod.")
MAX_PREFIXES = 16  # more nested wrappers than any real training stack
MAX_EXTRA_KEYS = 100
_SCAN_CHUNK = 2**24  # elements per step of the non-finite scan
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
        """``{tensor name: number of NaN/Inf entries}`` for tensors that have any.

        Bounded by the bytes stored, not by the view: in chunks of ``2^24``
        elements, and a tensor whose entries overlap (zero or overlapping
        strides) is counted over the storage it spans instead of its expansion.
        """
        bad = {}
        for name, t in self.state.items():
            if t.is_floating_point() or t.is_complex():
                n = _count_nonfinite(t)
                if n:
                    bad[name] = n
        return bad

    def sha256(self) -> str:
        return file_sha256(self.path)


def _span(t: Tensor) -> int:
    """Elements of storage from ``t``'s offset to its last entry (0 when empty)."""
    return span(tuple(t.shape), t.stride())


def overlap_problem(t: Tensor) -> str | None:
    """Why ``t`` is refused as a weight, or ``None``: not dense CPU data, zero or overlapping strides, storage too small."""
    if t.layout != torch.strided:
        return f"is a {str(t.layout).replace('torch.', '')} tensor, not a dense one"
    if t.device.type != "cpu":
        return "has no data (a meta tensor)" if t.device.type == "meta" else f"is on {t.device}"
    problem = strided_problem(tuple(t.shape), t.stride())
    if problem:
        return problem
    if t.numel() and (t.storage_offset() + _span(t)) * t.element_size() > t.untyped_storage().nbytes():
        return f"needs more storage than it has (shape {tuple(t.shape)}, stride {t.stride()})"
    return None


def _count_nonfinite(t: Tensor) -> int:
    if t.numel() == 0:
        return 0
    if overlap_problem(t) is not None:  # count what is stored, never the expansion
        span = min(_span(t), t.untyped_storage().nbytes() // t.element_size() - t.storage_offset())
        t = torch.empty(0, dtype=t.dtype).set_(t.untyped_storage(), t.storage_offset(), (max(span, 0),))
    if t.dim() == 0:
        return int(not torch.isfinite(t))
    flat = t.reshape(-1) if t.is_contiguous() else None
    if flat is not None:
        return sum(int((~torch.isfinite(flat[i:i + _SCAN_CHUNK])).sum()) for i in range(0, flat.numel(), _SCAN_CHUNK))
    rows = max(1, _SCAN_CHUNK // max(1, t[0].numel()))
    return sum(int((~torch.isfinite(t[i:i + rows])).sum()) for i in range(0, t.shape[0], rows))


def file_sha256(path: str | Path, chunk: int = 2**20) -> str:
    """sha256 of a regular file (FIFOs and devices are refused, never read), or of a Hugging Face folder."""
    if Path(path).is_dir():  # a Hugging Face folder checkpoint (loading/hf.py)
        from .hf import folder_sha256
        return folder_sha256(path)
    try:
        fd, _ = open_regular(path)
    except RefusedFile as exc:
        raise CheckpointError(f"{display(path)}: {exc}") from None
    h = hashlib.sha256()
    with os.fdopen(fd, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------ formats
def _sniff(head: bytes) -> str:
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if len(head) >= 9:  # before the pickle test: a header length of 640 starts with 0x80 0x02 too
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n < 100 * 2**20 and head[8:9] == b"{":
            return "safetensors"
    if len(head) >= 9 and head[0] == 0x80 and head[1] in (2, 3, 4, 5):
        return "torch-legacy"
    return "unknown"


def _refused(path: str | Path, exc: RefusedFile) -> CheckpointError:
    """The one-line error for a refused file; ``--trust-checkpoint`` is offered only for the user's own objects."""
    if exc.kind == "foreign":
        return CheckpointError(f"{display(path)}: cannot be read safely: {exc}; if you wrote this file yourself, "
                               "pass --trust-checkpoint")
    return CheckpointError(f"{display(path)}: {exc}")


def detect_format(path: str | Path) -> str:
    """``torch-zip``, ``truncated-zip``, ``torchscript``, ``torch-legacy``, ``safetensors`` or ``unknown``."""
    try:
        fmt = _sniff(read_head(path, 16))
        if fmt != "torch-zip":
            return fmt
        try:
            return "torchscript" if TorchZip(map_file(path), verify=False).torchscript else "torch-zip"
        except RefusedFile:
            return "truncated-zip"
    except RefusedFile as exc:
        raise _refused(path, exc) from None


def read_object(path: str | Path, *, trust: bool = False) -> tuple[str, Any, list[str], dict[str, str]]:
    """``(format, loaded object, placeholder globals, safetensors metadata)``."""
    try:
        mf = map_file(path)
        fmt = _sniff(bytes(mf.data[:16]))
        if fmt == "unknown":
            raise RefusedFile("not a checkpoint (neither a torch file nor safetensors)", "unsupported")
        if fmt == "safetensors":
            state, meta = load_safetensors(mf)
            return fmt, state, [], meta
        obj, placeholders = load_mapped(mf, archive=TorchZip(mf) if fmt == "torch-zip" else None, trust=trust)
    except RefusedFile as exc:
        raise _refused(path, exc) from None
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
                have = ", ".join(key_text(k) for k in list(cur)[:12]) if isinstance(cur, dict) else type(cur).__name__
                raise CheckpointError(printable(f"--key {key}: no entry {part!r} (found: {have})"))
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
        keys = ", ".join(key_text(k) for k in list(obj)[:12]) + (", ..." if len(obj) > 12 else "")
        raise CheckpointError(printable(f"no tensors found (top-level keys: {keys}); point at the weights with --key "
                                        "NAME"))
    state = _as_state(obj)
    if state is not None:
        return state, "module" if isinstance(obj, torch.nn.Module) else "state_dict"
    if isinstance(obj, Placeholder):
        raise CheckpointError(printable(
            f"no tensors found (the file holds a pickled {obj._sam_probe_global} object, kept as an inert placeholder "
            "and not loaded); re-save it as torch.save(model.state_dict(), path), or, if you wrote this file "
            "yourself, pass --trust-checkpoint"))
    raise CheckpointError(f"no tensors found (the file holds a {type(obj).__name__}); is it a checkpoint?")


def strip_prefixes(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Remove leading ``module.`` / ``_orig_mod.`` from every name, repeatedly, any order."""
    stripped: list[str] = []
    while state and len(stripped) < MAX_PREFIXES:
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


def _digits(s: str) -> int | None:
    return int(s) if s.isascii() and s.isdigit() and len(s) <= 19 else None


def find_step(obj: Any, meta: dict[str, str], path: str | Path) -> tuple[int | None, str]:
    """Step and where it came from: ``content:<key>``, ``filename`` or ``position``."""
    sources = [obj] if isinstance(obj, dict) else []
    if meta:
        sources.append(meta)
    for src in sources:
        for k in STEP_KEYS:
            if k in src:
                v = _digits(src[k]) if isinstance(src[k], str) else _as_int(src[k])
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


def _json_meta(meta: dict[str, str], key: str) -> Any:
    """A JSON value from safetensors metadata as bounded plain data (``None`` when absent or broken)."""
    if not meta.get(key):
        return None
    try:
        return plain(json.loads(meta[key]))
    except (ValueError, RecursionError):
        return None


def _extra_keys(obj: Any, holder: str) -> list[str]:
    if not isinstance(obj, dict):
        return []
    keys = [key_text(k) for k, v in obj.items() if not isinstance(v, Tensor) and not (type(k) is str and k == holder)]
    return keys if len(keys) <= MAX_EXTRA_KEYS else [*keys[:MAX_EXTRA_KEYS], f"... ({len(keys) - MAX_EXTRA_KEYS} more)"]


def check_tensors(path: str | Path, state: dict[str, Tensor]) -> None:
    """Refuse tensors an analysis cannot use as weights: sparse, meta, zero-stride or overlapping ones."""
    for name, t in state.items():
        problem = overlap_problem(t)
        if problem:
            raise CheckpointError(f"{display(path)}: tensor {printable(key_text(name))} {problem}; sam-probe only "
                                  "reads dense tensors whose entries are stored separately (re-save it with "
                                  ".contiguous())")


def load_checkpoint(path: str | Path, *, key: str | None = None, trust: bool = False) -> Checkpoint:
    """Read ``path`` safely and return its tensors with format, layout and step."""
    if Path(path).is_dir():  # a Hugging Face folder checkpoint (loading/hf.py)
        from .hf import load_folder
        return load_folder(path, key=key, trust=trust)
    fmt, obj, placeholders, meta = read_object(path, trust=trust)
    try:
        state, layout = find_state(obj, key)
    except CheckpointError as exc:
        raise CheckpointError(f"{display(path)}: {exc}") from None
    check_tensors(path, state)
    state, stripped = strip_prefixes(state)
    step, source = find_step(obj, meta, path)
    holder = {"lightning": "state_dict"}.get(layout, layout.split(":", 1)[-1].split(".")[0])
    spec = obj.get("model_spec") if isinstance(obj, dict) else None
    spec = plain(spec) if spec is not None else None
    if meta.get("model_spec"):
        spec = _json_meta(meta, "model_spec")
    hparams = find_hparams(obj)
    meta_hparams = _json_meta(meta, "hparams")
    if isinstance(meta_hparams, dict):
        hparams.update(meta_hparams)
    return Checkpoint(
        path=str(path), format=fmt, layout=layout, state=state, step=step, step_source=source,
        extra_keys=_extra_keys(obj, holder), hparams=hparams, model_spec=spec if isinstance(spec, dict) else None,
        placeholders=placeholders, stripped_prefixes=stripped, trusted=trust,
    )
