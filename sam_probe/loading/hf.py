"""Hugging Face checkpoints: ``save_pretrained`` folders, Trainer runs, and their models.

- A *folder checkpoint* holds ``config.json`` and the weights: ``model.safetensors``,
  sharded ``model-0000x-of-0000y.safetensors`` with ``model.safetensors.index.json``,
  or ``pytorch_model.bin`` (also sharded with ``pytorch_model.bin.index.json``).
  Every weight file is read by :mod:`sam_probe.loading.checkpoints`' safe
  loaders (safetensors, or ``torch.load(weights_only=True)`` with inert
  placeholders): nothing is ever unpickled unsafely.  Shard names come from the
  index and must be plain file names inside the folder.
- A *Trainer run* is a directory of ``checkpoint-N/`` folders; the step is
  ``global_step`` of the folder's ``trainer_state.json``, else ``N``.
- The model (``--model hf``, or automatically for folders) is built from
  ``config.json`` with ``transformers``: class from ``config.architectures``
  (``--model hf:ClassName`` overrides), ``--model-arg key=value`` overriding
  config fields (``attn_implementation=eager`` chooses the attention code).
  Only classes defined by ``transformers`` itself are used: ``auto_map`` /
  remote code is never run, nothing is downloaded (``HF_HUB_OFFLINE``), and the
  architecture is first built on the meta device to refuse a ``config.json``
  that describes a model much larger than its weights.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, SpecError

CONFIG = "config.json"
SINGLE = ("model.safetensors", "pytorch_model.bin")
INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SHARD_RE = re.compile(r"^(model|pytorch_model)-(\d+)-of-(\d+)\.(safetensors|bin)$")
RUN_DIR_RE = re.compile(r"^checkpoint-(\d+)$")
MAX_JSON = 64 * 2**20  # bytes read from config / index / trainer_state files
SIZE_SLACK = 2.0  # a config may describe at most this many times the parameters its weights hold (+ 1M)


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        size = path.stat().st_size
        if size > MAX_JSON:
            raise CheckpointError(f"{path}: {what} is {size / 2**20:.0f} MiB, over the {MAX_JSON // 2**20} MiB limit")
        with open(path, "rb") as f:
            obj = json.loads(f.read(MAX_JSON + 1))
    except CheckpointError:
        raise
    except (OSError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: unreadable {what} ({type(exc).__name__}); re-save it") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: {what} is not a JSON object")
    return obj


# ------------------------------------------------------------------ folders
def weight_files(folder: Path) -> list[Path]:
    """The weight files of a folder checkpoint, in shard order ([] when it has none)."""
    for name in INDEXES:
        idx = folder / name
        if idx.is_file():
            wm = _read_json(idx, "shard index").get("weight_map")
            if not isinstance(wm, dict) or not wm:
                raise CheckpointError(f"{idx}: no weight_map; re-save the model")
            shards = sorted({str(v) for v in wm.values()})
            bad = [s for s in shards if Path(s).name != s or s in ("", ".", "..")]
            if bad:
                raise CheckpointError(f"{idx}: shard name {bad[0]!r} is not a plain file name in the folder; refused")
            files = [folder / s for s in shards]
            absent = [f.name for f in files if not f.is_file()]
            if absent:
                raise CheckpointError(f"{folder}: shard {absent[0]} listed in {name} is missing ({len(absent)} of "
                                      f"{len(files)}); copy the whole folder")
            return files
    for name in SINGLE:
        if (folder / name).is_file():
            return [folder / name]
    shards = sorted((f for f in folder.iterdir() if f.is_file() and SHARD_RE.match(f.name)),
                    key=lambda f: (SHARD_RE.match(f.name).group(4) != "safetensors", f.name))
    if shards:
        kind = SHARD_RE.match(shards[0].name)
        files = [f for f in shards if SHARD_RE.match(f.name).group(4) == kind.group(4)]
        if len(files) != int(kind.group(3)):
            raise CheckpointError(f"{folder}: {len(files)} of {int(kind.group(3))} shards present and no index; "
                                  "copy the whole folder")
        return files
    return []


def is_folder_checkpoint(path: str | Path) -> bool:
    """A directory holding ``config.json`` and weights (see module docstring)."""
    p = Path(path)
    if not p.is_dir() or not (p / CONFIG).is_file():
        return False
    return any((p / n).is_file() for n in SINGLE + INDEXES) or any(SHARD_RE.match(f.name) for f in p.iterdir())


def config_path(path: str | Path) -> Path | None:
    """``config.json`` of a folder checkpoint or beside a weight file, if any."""
    p = Path(path)
    c = p / CONFIG if p.is_dir() else p.parent / CONFIG
    return c if c.is_file() else None


def discover_run(target: Path) -> list[Path] | None:
    """Checkpoint folders of ``target`` when it is a folder checkpoint or a Trainer run, else ``None``.

    A Trainer run's folders are sorted by the step in their names (``checkpoint-500`` before
    ``checkpoint-1000``)."""
    if not target.is_dir():
        return None
    if is_folder_checkpoint(target):
        return [target]
    runs = [(int(m.group(1)), d) for d in target.iterdir()
            if d.is_dir() and (m := RUN_DIR_RE.match(d.name)) and is_folder_checkpoint(d)]
    return [d for _, d in sorted(runs)] or None


def trainer_step(folder: Path) -> tuple[int | None, str]:
    """``global_step`` of ``trainer_state.json``, else the ``checkpoint-N`` name, else none."""
    ts = folder / "trainer_state.json"
    if ts.is_file():
        gs = _read_json(ts, "trainer_state.json").get("global_step")
        if isinstance(gs, int) and not isinstance(gs, bool) and gs >= 0:
            return gs, "content:trainer_state.global_step"
    m = RUN_DIR_RE.match(folder.name)
    if m:
        return int(m.group(1)), "filename"
    return None, "position"


def _trainer_hparams(folder: Path) -> dict[str, Any]:
    """The learning rate of the last logged step (trainer_state.json), as ``lr``."""
    ts = folder / "trainer_state.json"
    if not ts.is_file():
        return {}
    logs = _read_json(ts, "trainer_state.json").get("log_history")
    if isinstance(logs, list):
        for entry in reversed(logs):
            if isinstance(entry, dict) and isinstance(entry.get("learning_rate"), (int, float)) \
                    and not isinstance(entry.get("learning_rate"), bool):
                return {"lr": float(entry["learning_rate"])}
    return {}


def load_folder(folder: str | Path, *, key: str | None = None, trust: bool = False):
    """A folder checkpoint as one :class:`~sam_probe.loading.checkpoints.Checkpoint` (shards merged)."""
    from .checkpoints import Checkpoint, find_state, read_object, strip_prefixes

    folder = Path(folder)
    files = weight_files(folder)
    if not files:
        raise CheckpointError(f"{folder}: is a directory without weights (no {', '.join(SINGLE)} or shards); "
                              "give a checkpoint file or a save_pretrained folder")
    state: dict[str, Any] = {}
    formats, placeholders = set(), []
    for f in files:
        fmt, obj, ph, _ = read_object(f, trust=trust)
        try:
            part, _layout = find_state(obj, key)
        except CheckpointError as exc:
            raise CheckpointError(f"{f}: {exc}") from None
        dup = next((k for k in part if k in state), None)
        if dup is not None:
            raise CheckpointError(f"{f}: tensor {dup} is also in another shard; the folder is inconsistent")
        state.update(part)
        formats.add(fmt)
        placeholders += ph
    state, stripped = strip_prefixes(state)
    step, source = trainer_step(folder)
    cfg = config_path(folder)
    arch = _read_json(cfg, "config.json").get("architectures") if cfg else None
    return Checkpoint(
        path=str(folder), format="+".join(sorted(formats)), layout="hf-sharded" if len(files) > 1 else "hf-folder",
        state=state, step=step, step_source=source,
        extra_keys=sorted(f.name for f in folder.iterdir() if f.is_file() and f not in files),
        hparams=_trainer_hparams(folder), model_spec={"name": "hf", "args": {}, "architectures": arch},
        placeholders=placeholders, stripped_prefixes=stripped, trusted=trust)


def folder_sha256(folder: str | Path) -> str:
    """sha256 over the names and contents of ``config.json`` and the weight files."""
    from .checkpoints import file_sha256

    folder = Path(folder)
    h = hashlib.sha256()
    for f in ([folder / CONFIG] if (folder / CONFIG).is_file() else []) + weight_files(folder):
        h.update(f.name.encode() + b"\0" + file_sha256(f).encode() + b"\n")
    return h.hexdigest()


# ------------------------------------------------------------------- models
def is_hf_spec(name: str | None) -> bool:
    return bool(name) and (name == "hf" or name.startswith("hf:"))


def _transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the network
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers
    except ImportError:
        raise SpecError("--model hf needs transformers: pip install 'sam-probe[hf]' "
                        "(or pip install torch==<your torch> transformers)") from None
    transformers.logging.set_verbosity_error()  # its advice lines would interleave with ours
    return transformers


def build_model(path: str | Path, spec: str = "hf", args: dict[str, Any] | None = None,
                expected_numel: int | None = None):
    """The ``transformers`` model described by the ``config.json`` of ``path`` (module docstring)."""
    tf = _transformers()
    cfg_file = config_path(path)
    if cfg_file is None:
        raise SpecError(f"--model hf: no config.json beside {path}; give the save_pretrained folder "
                        "(config.json + weights) or use --model pkg.module:factory")
    raw = _read_json(cfg_file, "config.json")
    args = dict(args or {})
    attn = args.pop("attn_implementation", None)
    name = spec.partition(":")[2] or None
    archs = raw.get("architectures")
    if name is None:
        if not (isinstance(archs, list) and archs and isinstance(archs[0], str)):
            raise SpecError(f"{cfg_file}: no 'architectures' entry; name the class with --model hf:ClassName "
                            "(e.g. hf:BertForSequenceClassification)")
        name = archs[0]
    cls = getattr(tf, name, None) if name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, tf.PreTrainedModel)):
        hint = " (custom code via auto_map is never run; use --model pkg.module:factory)" if raw.get("auto_map") else ""
        raise SpecError(f"--model hf: {name!r} is not a transformers model class{hint}; "
                        "use --model hf:ClassName with a class from transformers")
    model_type = raw.get("model_type")
    mapping = tf.CONFIG_MAPPING
    if not isinstance(model_type, str) or model_type not in mapping:
        raise SpecError(f"{cfg_file}: unknown model_type {model_type!r} for this transformers "
                        f"{tf.__version__}; upgrade transformers or use --model pkg.module:factory")
    fields = {k: v for k, v in raw.items() if k not in ("auto_map", "_name_or_path")}
    fields.update(args)
    fields["use_cache"] = False  # no key/value cache: one forward per chunk, nothing kept

    def config():
        try:
            return mapping[model_type].from_dict(dict(fields))
        except Exception as exc:  # noqa: BLE001 - a bad config is the user's input
            raise SpecError(f"{cfg_file}: cannot build the config ({type(exc).__name__}: {str(exc)[:160]})") from None

    kw = {"attn_implementation": attn} if attn else {}
    import torch

    try:
        if expected_numel is not None:
            with torch.device("meta"):
                shell = cls._from_config(config(), **kw)
            n = sum(p.numel() for p in shell.parameters())
            del shell
            if n > SIZE_SLACK * expected_numel + 2**20:
                raise CheckpointError(f"{cfg_file}: describes {n:,} parameters but the weights hold "
                                      f"{expected_numel:,}; config and weights do not belong together")
        model = cls._from_config(config(), **kw)
    except (SpecError, CheckpointError):
        raise
    except Exception as exc:  # noqa: BLE001
        raise SpecError(f"--model hf: building {name} failed ({type(exc).__name__}: {str(exc)[:160]})") from None
    return model.eval()
