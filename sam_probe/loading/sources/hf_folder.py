"""Source ``hf-folder``: a Hugging Face ``save_pretrained`` folder (``config.json`` + weights).

The weights are ``model.safetensors``, sharded ``model-0000x-of-0000y.safetensors``
with ``model.safetensors.index.json``, or ``pytorch_model.bin`` (also sharded with
``pytorch_model.bin.index.json``); every weight file is read by :mod:`...formats`
(safetensors, or the restricted torch loader with inert placeholders), hashed and
scanned in one pass.  Shard names come from the index and must be plain file
names of regular files inside the folder (not links leading out of it).  The step
is ``global_step`` of ``trainer_state.json`` (a Trainer checkpoint), else the
``checkpoint-N`` folder name.  The model is built from ``config.json`` by
:mod:`...hf` (``--model hf``, automatic for these folders).
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

from ...errors import CheckpointError
from ..files import display, read_json
from ..hf import CONFIG
from .base import FOLDER, Source

SINGLE = ("model.safetensors", "pytorch_model.bin")
INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SHARD_RE = re.compile(r"^(model|pytorch_model)-(\d+)-of-(\d+)\.(safetensors|bin)$")
RUN_DIR_RE = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"
MAX_SHARDS = 100_000
MAX_LISTED = 100


def _inside(folder: Path, f: Path) -> bool:
    """``f`` is a regular file whose real location is directly inside ``folder`` (no link leads out)."""
    try:
        return f.is_file() and f.resolve().parent == folder.resolve()
    except OSError:
        return False


def _checked(folder: Path, files: list[Path], where: str) -> list[Path]:
    outside = [f.name for f in files if f.exists() and not _inside(folder, f)]
    if outside:
        raise CheckpointError(f"{display(folder)}: weight file {outside[0]!r} ({where}) is not a regular file inside "
                              "the folder (a link leading out of it, or not a file); refused")
    return files


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a folder checkpoint, in shard order ([] when it has none)."""
    for name in INDEXES:
        idx = folder / name
        if idx.exists():
            wm = read_json(idx, "shard index").get("weight_map")
            if not isinstance(wm, dict) or not wm:
                raise CheckpointError(f"{display(idx)}: no weight_map; re-save the model")
            shards = sorted({str(v) for v in wm.values()})
            if len(shards) > MAX_SHARDS:
                raise CheckpointError(f"{display(idx)}: names {len(shards):,} shard files; refused")
            bad = [s for s in shards if Path(s).name != s or s in ("", ".", "..") or "\0" in s]
            if bad:
                raise CheckpointError(f"{display(idx)}: shard name {bad[0][:80]!r} is not a plain file name in the "
                                      "folder; refused")
            files = _checked(folder, [folder / s for s in shards], name)
            absent = [f.name for f in files if not f.exists()]
            if absent:
                raise CheckpointError(f"{display(folder)}: shard {absent[0]} listed in {name} is missing "
                                      f"({len(absent)} of {len(files)}); copy the whole folder")
            return files
    for name in SINGLE:
        if (folder / name).exists():
            return _checked(folder, [folder / name], name)
    found: list[tuple[bool, str, str, str, Path]] = []  # safetensors first, then by name
    for f in folder.iterdir():
        m = SHARD_RE.match(f.name)
        if m is not None:
            found.append((m.group(4) != "safetensors", f.name, m.group(4), m.group(3), f))
    found.sort(key=lambda t: t[:2])
    if found:
        _, _, ext, total, _ = found[0]
        paths = [f for _, _, e, _, f in found if e == ext]
        if len(paths) != int(total[:12]):
            raise CheckpointError(f"{display(folder)}: {len(paths)} of {int(total[:12])} shards present and no index; "
                                  "copy the whole folder")
        return _checked(folder, paths, "shard")
    return []


def claims(path: Path) -> bool:
    """A directory holding ``config.json`` and weights (see module docstring)."""
    if not path.is_dir() or not os.path.lexists(path / CONFIG):
        return False
    return any(os.path.lexists(path / n) for n in SINGLE + INDEXES) or any(SHARD_RE.match(f.name)
                                                                           for f in path.iterdir())


def trainer_step(folder: Path) -> tuple[int | None, str]:
    """``global_step`` of ``trainer_state.json``, else the ``checkpoint-N`` name, else none."""
    from ..steps import as_step

    ts = folder / TRAINER_STATE
    if os.path.lexists(ts):
        gs = read_json(ts, TRAINER_STATE).get("global_step")
        if isinstance(gs, int) and as_step(gs) is not None:
            return gs, "content:trainer_state.global_step"
    m = RUN_DIR_RE.match(folder.name)
    if m and as_step(m.group(1)) is not None:
        return int(m.group(1)), "filename"
    return None, "position"


def _trainer_hparams(folder: Path) -> dict[str, Any]:
    """The learning rate of the last logged step (trainer_state.json), as ``lr``."""
    ts = folder / TRAINER_STATE
    if not os.path.lexists(ts):
        return {}
    logs = read_json(ts, TRAINER_STATE).get("log_history")
    if isinstance(logs, list):
        for entry in reversed(logs):
            if isinstance(entry, dict) and isinstance(entry.get("learning_rate"), (int, float)) \
                    and not isinstance(entry.get("learning_rate"), bool):
                return {"lr": float(entry["learning_rate"])}
    return {}


def _architectures(folder: Path) -> Any:
    cfg = folder / CONFIG
    return read_json(cfg, CONFIG).get("architectures") if os.path.lexists(cfg) else None


def load(folder: Path, *, key: str | None = None, trust: bool = False):
    """A folder checkpoint as one :class:`~sam_probe.loading.state.Checkpoint` (shards merged)."""
    from ..formats import finish, read_file
    from ..state import Checkpoint, check_tensors, find_state, strip_prefixes

    files = weight_files(folder)
    if not files:
        raise CheckpointError(f"{display(folder)}: is a directory without weights (no {', '.join(SINGLE)} or "
                              "shards); give a checkpoint file or a save_pretrained folder")
    state: dict[str, Any] = {}
    formats, placeholders, counts = set(), [], {}
    for f in files:
        r = read_file(f, trust=trust)
        try:
            part, _layout = find_state(r.obj, key)
        except CheckpointError as exc:
            raise CheckpointError(f"{display(f)}: {exc}") from None
        check_tensors(f, part)
        dup = next((k for k in part if k in state), None)
        if dup is not None:
            raise CheckpointError(f"{display(f)}: tensor {dup[:120]} is also in another shard; the folder is "
                                  "inconsistent")
        _, found = finish(f, r, part)
        counts.update({id(part[n]): c for n, c in found.items()})
        state.update(part)
        formats.add(r.format)
        placeholders += r.placeholders
    state, stripped = strip_prefixes(state)
    step, source = trainer_step(folder)
    extra = sorted(f.name for f in folder.iterdir() if f.is_file() and f not in files)
    if len(extra) > MAX_LISTED:
        extra = [*extra[:MAX_LISTED], f"... ({len(extra) - MAX_LISTED} more)"]
    return Checkpoint(
        path=str(folder), format="+".join(sorted(formats)), layout="hf-sharded" if len(files) > 1 else "hf-folder",
        state=state, step=step, step_source=source, extra_keys=extra, hparams=_trainer_hparams(folder),
        model_spec={"name": "hf", "args": {}, "architectures": _architectures(folder)},
        placeholders=placeholders, stripped_prefixes=stripped, trusted=trust, source=SOURCE.name,
        digest=digest(folder), scanned={n: counts[id(t)] for n, t in state.items() if id(t) in counts})


def files(folder: Path) -> list[Path]:
    return ([folder / CONFIG] if os.path.lexists(folder / CONFIG) else []) + weight_files(folder)


def digest(folder: Path) -> str:
    """sha256 over the names and sha256s of ``config.json`` and the weight files."""
    from .torch_file import file_digest

    h = hashlib.sha256()
    for f in files(folder):
        h.update(f.name.encode("utf-8", "surrogateescape") + b"\0" + file_digest(f).encode() + b"\n")
    return h.hexdigest()


SOURCE = Source(
    name="hf-folder", kind=FOLDER, order=10,
    summary="Hugging Face save_pretrained folder: config.json + model.safetensors / pytorch_model.bin, sharded "
            "with or without an index",
    load=load, digest=digest, files=files, claims=claims,
    step="trainer_state.json global_step, else the checkpoint-N folder name",
)
