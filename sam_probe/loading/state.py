"""A loaded checkpoint, whatever its source: tensors, layout, step and what was saved beside them.

- Layout: a raw state dict, or one under ``model``, ``state_dict``,
  ``model_state_dict``, ``net``, ``module``, ``ema`` (or ``key='a.b'``).
- Prefixes ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) are stripped
  repeatedly, in any order.
- Step from the contents (``step``, ``global_step``, ``iteration``, ``epoch``),
  else the file name, else the position in the run; a step is an integer in
  ``[0, 2^63)`` (what the store keeps), anything else is not a step.

Everything here works on objects already read by a source (:mod:`.sources`); the
tensors of the state dict must be dense CPU tensors whose entries do not
overlap, and metadata is converted by the bounded :func:`.plaindata.plain`.
Nothing here reads a file or imports a source.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import CheckpointError
from .files import display, printable
from .plaindata import key_text, plain
from .placeholders import Placeholder, names_code
from .rebuild_guard import span, strided_problem
from .steps import MAX_STEP, as_step, step_from_name  # noqa: F401 - re-exported

STATE_KEYS = ("model", "state_dict", "model_state_dict", "net", "module", "ema")
STEP_KEYS = ("step", "global_step", "iteration", "epoch")
HPARAM_KEYS = ("hparams", "hyper_parameters", "hyperparameters", "args", "config", "cfg", "opt")
STRIP_PREFIXES = ("module.", "_orig_mod.")
MAX_PREFIXES = 16  # more nested wrappers than any real training stack
MAX_EXTRA_KEYS = 100
_SCAN_CHUNK = 2**24  # elements per step of the non-finite scan


@dataclass
class Checkpoint:
    """A loaded checkpoint: its tensors (prefix-free names) and what was found beside them.

    ``source``: the registered checkpoint source that read it (:mod:`.sources`);
    ``digest``: the sha256 identifying its bytes (set by the source, from the same
    pass that verified and scanned them); ``scanned``: non-finite counts per tensor
    from that pass (``None``: not scanned yet); ``lazy``: set for a checkpoint read lazily
    (``--shard-model`` on a DCP folder): ``state`` then holds meta tensors (names, shapes,
    dtypes) and ``lazy`` reads their rows (:class:`LazyRows`); the non-finite scan is of
    the rows read.
    """

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
    source: str = ""
    digest: str | None = None
    scanned: dict[str, int] | None = field(default=None, repr=False)
    lazy: LazyRows | None = field(default=None, repr=False)

    @property
    def n_params(self) -> int:
        return sum(t.numel() for t in self.state.values() if t.is_floating_point() or t.is_complex())

    def nonfinite(self) -> dict[str, int]:
        """``{tensor name: number of NaN/Inf entries}`` for tensors that have any.

        From the source's one verification pass when it scanned the tensors,
        else counted here: bounded by the bytes stored, not by the view (in
        chunks of ``2^24`` elements; a tensor whose entries overlap is counted
        over the storage it spans instead of its expansion).
        """
        if self.scanned is not None:
            return {n: c for n, c in self.scanned.items() if c and n in self.state}
        bad = {}
        for name, t in self.state.items():
            if t.is_floating_point() or t.is_complex():
                n = count_nonfinite(t)
                if n:
                    bad[name] = n
        return bad

    def sha256(self) -> str:
        if self.digest is None:
            raise CheckpointError(f"{display(self.path)}: no digest was computed for this checkpoint")
        return self.digest


class LazyRows:
    """How a lazy checkpoint's meta tensors get values: ``read(stored name, r0, r1)`` returns rows
    ``[r0, r1)`` of dimension 0 of a stored tensor (``None``: all of it), verifying the bytes it reads.

    The meta tensors of :attr:`Checkpoint.state` are known by identity (matching renames them but
    passes the same objects on), so :meth:`rows` takes the tensor a model name was matched to.
    ``bytes_read``: bytes of stored items this reader copied and verified; ``bytes_kept``: bytes of
    the rows it returned.
    """

    def __init__(self, read: Callable[[str, int | None, int | None], Tensor], names: dict[str, Tensor]):
        self._read = read
        self._by_id = {id(t): (n, t) for n, t in names.items()}  # the tensors are kept alive here
        self.bytes_read = 0
        self.bytes_kept = 0

    def owns(self, t: Tensor) -> bool:
        return id(t) in self._by_id and self._by_id[id(t)][1] is t

    def rows(self, t: Tensor, r0: int | None = None, r1: int | None = None) -> Tensor:
        """Rows ``[r0, r1)`` of the stored tensor behind meta tensor ``t`` (all of it without rows; a 0-d
        tensor is read whole)."""
        name = self._by_id[id(t)][0]
        if t.dim() == 0:  # read whole, as one row
            out = self._read(name, None, None).reshape(1)
            out = out.reshape(()) if r0 is None else out[r0:r1]
        else:
            out = self._read(name, r0, r1)
        self.bytes_kept += out.numel() * out.element_size()
        return out


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


def count_nonfinite(t: Tensor) -> int:
    """NaN/Inf entries of ``t`` (over the storage it spans when its entries overlap)."""
    if t.numel() == 0:
        return 0
    if overlap_problem(t) is not None:  # count what is stored, never the expansion
        n = min(_span(t), t.untyped_storage().nbytes() // t.element_size() - t.storage_offset())
        t = torch.empty(0, dtype=t.dtype).set_(t.untyped_storage(), t.storage_offset(), (max(n, 0),), (1,))
    if t.dim() == 0:
        return count_flat(t.reshape(1))
    flat = t.reshape(-1) if t.is_contiguous() else None
    if flat is not None:
        return sum(count_flat(flat[i:i + _SCAN_CHUNK]) for i in range(0, flat.numel(), _SCAN_CHUNK))
    rows = max(1, _SCAN_CHUNK // max(1, t[0].numel()))
    return sum(count_flat(t[i:i + rows].reshape(-1)) for i in range(0, t.shape[0], rows))


def count_flat(x: Tensor) -> int:
    """NaN/Inf entries of a 1-d floating tensor: one summation (a finite sum has none), counted only when not."""
    if x.is_complex():
        x = torch.view_as_real(x).reshape(-1)
    elif x.element_size() == 1:  # float8 kinds: not every reduction is implemented for them
        x = x.float()
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if torch.isfinite(x.sum(dtype=acc)):  # any NaN or Inf makes an IEEE sum NaN or Inf
        return 0
    return int(torch.count_nonzero(~torch.isfinite(x)))


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
        advice = "" if names_code(obj._sam_probe_global) else \
            ", or, if you wrote this file yourself, pass --trust-checkpoint"
        raise CheckpointError(printable(
            f"no tensors found (the file holds a pickled {obj._sam_probe_global} object, kept as an inert placeholder "
            f"and not loaded); re-save it as torch.save(model.state_dict(), path){advice}"))
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


def check_tensors(path: str | Path, state: dict[str, Tensor]) -> None:
    """Refuse tensors an analysis cannot use as weights: sparse, meta, zero-stride or overlapping ones."""
    for name, t in state.items():
        problem = overlap_problem(t)
        if problem:
            raise CheckpointError(f"{display(path)}: tensor {printable(key_text(name))} {problem}; sam-probe only "
                                  "reads dense tensors whose entries are stored separately (re-save it with "
                                  ".contiguous())")


# ------------------------------------------------------------------ steps
def find_step(obj: Any, meta: dict[str, str], path: str | Path) -> tuple[int | None, str]:
    """Step and where it came from: ``content:<key>``, ``filename`` or ``position``."""
    sources = [obj] if isinstance(obj, dict) else []
    if meta:
        sources.append(meta)
    for src in sources:
        for k in STEP_KEYS:
            if k in src:
                v = as_step(src[k])
                if v is not None:
                    return v, f"content:{k}"
    s = step_from_name(path)
    if s is not None:
        return s, "filename"
    return None, "position"


# ------------------------------------------------------------------ extras
# config entries that choose which code runs (transformers' attention/expert kernels, which may come from the
# Hub's ``kernels`` package; quantizers that fetch kernels): a file may not choose them, only the user's
# --model-arg (issue 23 #9)
_SELECTOR_RE = re.compile(r"^_*(?:[A-Za-z0-9]+_)*implementation(?:_internal)?$")
CODE_SELECTING_KEYS = ("quantization_config",)


def is_code_selector(key: Any) -> bool:
    """Whether a config/model-argument name selects an implementation (``attn_implementation``,
    ``_attn_implementation_internal``, ``experts_implementation``, ``quantization_config``)."""
    return isinstance(key, str) and (key in CODE_SELECTING_KEYS or bool(_SELECTOR_RE.match(key)))


def without_selectors(args: dict[str, Any], depth: int = 0) -> tuple[dict[str, Any], list[str]]:
    """``args`` without implementation selectors at any depth (sub-configs), and the names dropped."""
    out: dict[str, Any] = {}
    dropped: list[str] = []
    for k, v in args.items():
        if is_code_selector(k):
            dropped.append(str(k))
        elif isinstance(v, dict) and depth < 16:
            out[k], inner = without_selectors(v, depth + 1)
            dropped += [f"{k}.{n}" for n in inner]
        else:
            out[k] = v
    return out, dropped


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


def json_meta(meta: dict[str, str], key: str) -> Any:
    """A JSON value from safetensors metadata as bounded plain data (``None`` when absent or broken)."""
    if not meta.get(key):
        return None
    try:
        return plain(json.loads(meta[key]))
    except (ValueError, RecursionError):
        return None


def saved_model_spec(obj: Any, meta: dict[str, str]) -> dict[str, Any] | None:
    """The ``model_spec`` a checkpoint names (plain data), without implementation selectors in its args."""
    spec = obj.get("model_spec") if isinstance(obj, dict) else None
    spec = plain(spec) if spec is not None else None
    if meta.get("model_spec"):
        spec = json_meta(meta, "model_spec")
    if not isinstance(spec, dict):
        return None
    if isinstance(spec.get("args"), dict):
        spec = {**spec, "args": without_selectors(spec["args"])[0]}
    return spec


def extra_keys(obj: Any, holder: str) -> list[str]:
    if not isinstance(obj, dict):
        return []
    keys = [key_text(k) for k, v in obj.items() if not isinstance(v, Tensor) and not (type(k) is str and k == holder)]
    return keys if len(keys) <= MAX_EXTRA_KEYS else [*keys[:MAX_EXTRA_KEYS], f"... ({len(keys) - MAX_EXTRA_KEYS} more)"]


def from_object(path: str | Path, fmt: str, obj: Any, placeholders: list[str], meta: dict[str, str], *,
                key: str | None, trust: bool, source: str) -> Checkpoint:
    """A :class:`Checkpoint` from the object one file holds (its state dict located, checked and prefix-free)."""
    try:
        state, layout = find_state(obj, key)
    except CheckpointError as exc:
        raise CheckpointError(f"{display(path)}: {exc}") from None
    check_tensors(path, state)
    state, stripped = strip_prefixes(state)
    step, step_source = find_step(obj, meta, path)
    holder = {"lightning": "state_dict"}.get(layout, layout.split(":", 1)[-1].split(".")[0])
    hparams = find_hparams(obj)
    meta_hparams = json_meta(meta, "hparams")
    if isinstance(meta_hparams, dict):
        hparams.update(meta_hparams)
    return Checkpoint(
        path=str(path), format=fmt, layout=layout, state=state, step=step, step_source=step_source,
        extra_keys=extra_keys(obj, holder), hparams=hparams, model_spec=saved_model_spec(obj, meta),
        placeholders=placeholders, stripped_prefixes=stripped, trusted=trust, source=source,
    )
