"""Source ``peft-adapter``: a PEFT LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).

An adapter holds only the low-rank factors ``A`` (``[r, in]``) and ``B`` (``[out, r]``) of the
modules it adapts, named ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight``; the
model it adapts is the *base model* the user names with ``--base-model`` (:mod:`..peft` builds
it and either adds the adapter -- the factors are then the parameters analysed -- or merges it,
``--merge-adapter``).

``adapter_config.json`` is untrusted JSON (at most :data:`MAX_CONFIG` bytes): only the keys
sam-probe uses are read and checked (``peft_type`` LORA, ``r``, ``lora_alpha``, ``use_rslora``,
``fan_in_fan_out``, ``target_modules``, and the features it does not implement -- ``use_dora``,
``bias``, ``lora_bias``, ``modules_to_save``, ``rank_pattern``, ``alpha_pattern`` -- refused
when set); the rest (``auto_mapping``, ``base_model_name_or_path``, ...) is ignored, and nothing
it names is ever imported.  The weights are read by the hardened safetensors reader, hashed and
scanned in one pass.  Step: ``trainer_state.json`` of a Trainer ``checkpoint-N/`` folder, else its name.
"""
from __future__ import annotations

import hashlib
import math
import os
import re
from pathlib import Path
from typing import Any

from ...errors import CheckpointError
from ..files import display, read_json
from .base import FOLDER, Source

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
MAX_CONFIG = 2**20
MAX_RANK = 2**16
MAX_TARGETS = 4096
KEY_RE = re.compile(r"^base_model\.model\.([A-Za-z0-9_][A-Za-z0-9_.]{0,1000})\.lora_([AB])\.weight$")
UNSUPPORTED = {  # key -> the value that means the feature is off
    "use_dora": False, "lora_bias": False, "bias": "none", "modules_to_save": None, "rank_pattern": {},
    "alpha_pattern": {}, "layer_replication": None, "target_parameters": None, "trainable_token_indices": None,
}


def _inside(folder: Path, name: str) -> Path:
    f = folder / name
    try:
        ok = f.is_file() and f.resolve().parent == folder.resolve()
    except OSError:
        ok = False
    if not ok:
        raise CheckpointError(f"{display(folder)}: {name} is not a regular file inside the folder (a link leading out "
                              "of it, or not a file); refused")
    return f


def claims(path: Path) -> bool:
    return path.is_dir() and os.path.lexists(path / CONFIG) and os.path.lexists(path / WEIGHTS)


def read_config(folder: Path) -> dict[str, Any]:
    """The checked LoRA settings of ``adapter_config.json``:
    ``{r, lora_alpha, scaling, use_rslora, fan_in_fan_out, target_modules}`` (plain values)."""
    f = _inside(folder, CONFIG)
    raw = read_json(f, CONFIG, MAX_CONFIG)
    where = display(f)

    def bad(key: str, text: str) -> CheckpointError:
        return CheckpointError(f"{where}: {key} {text}; re-save the adapter with peft")

    kind = raw.get("peft_type", "LORA")
    if kind != "LORA":
        raise bad("peft_type", f"is {str(kind)[:40]!r}; sam-probe reads LoRA adapters only")
    r = raw.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= MAX_RANK:
        raise bad("r", f"must be an integer in 1..{MAX_RANK}, got {str(r)[:40]!r}")
    alpha = raw.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise bad("lora_alpha", f"must be a finite number, got {str(alpha)[:40]!r}")
    flags = {}
    for key in ("use_rslora", "fan_in_fan_out"):
        v = raw.get(key, False)
        if not isinstance(v, bool):
            raise bad(key, f"must be true or false, got {str(v)[:40]!r}")
        flags[key] = v
    targets = raw.get("target_modules")
    if isinstance(targets, list):
        if len(targets) > MAX_TARGETS or not all(isinstance(t, str) and 0 < len(t) <= 200 for t in targets):
            raise bad("target_modules", f"must be at most {MAX_TARGETS} module names")
    elif targets is not None and not (isinstance(targets, str) and len(targets) <= 2000):
        raise bad("target_modules", "must be a list of module names or one pattern")
    for key, off in UNSUPPORTED.items():
        v = raw.get(key, off)
        if v not in (off, None, False, {}, []):
            raise CheckpointError(f"{where}: {key} = {str(v)[:60]} is a PEFT feature sam-probe does not implement "
                                  "(plain LoRA factors only)")
    scaling = alpha / (math.sqrt(r) if flags["use_rslora"] else r)
    return {"r": r, "lora_alpha": alpha, "scaling": scaling, **flags, "target_modules": targets}


def load(folder: Path, *, key: str | None = None, trust: bool = False):
    """The adapter's factors as a :class:`~sam_probe.loading.state.Checkpoint` (names without
    ``base_model.model.``), its LoRA settings in ``hparams["lora"]``-prefixed entries."""
    from ..formats import finish, read_file
    from ..state import Checkpoint, check_tensors, find_state
    from .hf_folder import trainer_step

    cfg = read_config(folder)
    f = _inside(folder, WEIGHTS)
    r = read_file(f, trust=trust)
    if r.format != "safetensors":
        raise CheckpointError(f"{display(f)}: is not a safetensors file ({r.format}); re-save the adapter with peft")
    part, _layout = find_state(r.obj, key)
    check_tensors(f, part)
    _, found = finish(f, r, part)
    counts = {id(part[n]): c for n, c in found.items()}
    state: dict[str, Any] = {}
    modules: dict[str, dict[str, Any]] = {}
    for name, t in part.items():
        m = KEY_RE.match(name)
        if m is None:
            raise CheckpointError(f"{display(f)}: tensor {name[:120]!r} is not a LoRA factor "
                                  "(base_model.model.<module>.lora_A.weight / lora_B.weight); other PEFT tensors are "
                                  "not supported")
        if t.dim() != 2 or not t.is_floating_point():
            raise CheckpointError(f"{display(f)}: {name[:120]} has shape {tuple(t.shape)} ({t.dtype}); LoRA factors "
                                  "are 2-D floating-point matrices")
        modules.setdefault(m.group(1), {})[m.group(2)] = t
        state[name[len(PREFIX):]] = t
    if not modules:
        raise CheckpointError(f"{display(f)}: holds no LoRA factors")
    for mod, ab in modules.items():
        if set(ab) != {"A", "B"}:
            raise CheckpointError(f"{display(f)}: module {mod[:120]} has lora_{'A' if 'A' in ab else 'B'} without "
                                  f"lora_{'B' if 'A' in ab else 'A'}; the adapter is incomplete")
        a, b = ab["A"], ab["B"]
        if a.shape[0] != cfg["r"] or b.shape[1] != cfg["r"]:
            raise CheckpointError(f"{display(f)}: {mod[:120]}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do "
                                  f"not have the rank r = {cfg['r']} of {CONFIG}")
    step, source = trainer_step(folder)
    hparams = {"peft_type": "LORA", "lora_r": cfg["r"], "lora_alpha": cfg["lora_alpha"],
               "lora_scaling": cfg["scaling"], "use_rslora": cfg["use_rslora"], "fan_in_fan_out": cfg["fan_in_fan_out"],
               "target_modules": cfg["target_modules"]}
    extra = sorted(x.name for x in folder.iterdir() if x.is_file() and x.name not in (CONFIG, WEIGHTS))[:100]
    return Checkpoint(
        path=str(folder), format="safetensors", layout="peft-lora", state=state, step=step, step_source=source,
        extra_keys=extra, hparams=hparams, model_spec=None, stripped_prefixes=[PREFIX], trusted=trust,
        source=SOURCE.name, digest=digest(folder), scanned={n[len(PREFIX):]: counts[id(t)] for n, t in part.items()
                                                            if id(t) in counts})


def files(folder: Path) -> list[Path]:
    return [folder / n for n in (CONFIG, WEIGHTS) if os.path.lexists(folder / n)]


def digest(folder: Path) -> str:
    """sha256 over the names and sha256s of ``adapter_config.json`` and the weights."""
    from .torch_file import file_digest

    h = hashlib.sha256()
    for f in files(folder):
        h.update(f.name.encode("utf-8", "surrogateescape") + b"\0" + file_digest(_inside(folder, f.name)).encode()
                 + b"\n")
    return h.hexdigest()


SOURCE = Source(
    name="peft-adapter", kind=FOLDER, order=5,
    summary="PEFT LoRA adapter folder: adapter_config.json + adapter_model.safetensors, on the base model named "
            "with --base-model",
    load=load, digest=digest, files=files, claims=claims,
    step="trainer_state.json global_step, else the checkpoint-N folder name",
)
