"""The settings a stored unit was computed with: grouping results by them, and naming them in captions.

``report`` attaches each unit's stored attributes to its result under
:data:`META` (config, data and model specs, versions, command, host, sha256);
a result fresh from a command has none and its own keys (``rho``, ``k``, ...)
are used instead.  Results whose :func:`group_key` differs were computed with
different settings and are never shown in one table or on one axis.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

META = "_meta"  # key of the unit attributes ``report`` attaches to a result (never in JSON/CSV output)

# meta attributes that change what a number means (the rest -- host, device, time -- do not)
GROUPING_META = ("config", "data_spec", "dtype", "bn_mode", "analysis_version")
# config keys that only tune output or bookkeeping, not the quantities
NON_SETTINGS = frozenset({"pairwise", "warm_start", "cold_check", "save_vectors"})


def meta(result: dict[str, Any]) -> dict[str, Any]:
    return result.get(META) or {}


def config(result: dict[str, Any]) -> dict[str, Any]:
    """The analysis configuration: the stored config, else the settings the result itself names."""
    cfg = meta(result).get("config")
    if isinstance(cfg, dict):
        return cfg
    keys = ("rho", "variant", "m", "k", "which", "top_k", "category", "faithful", "eta", "backend", "trace_method",
            "curvature", "ref", "strength_method", "method", "minor_fraction")
    return {k: result[k] for k in keys if k in result}


def group_key(result: dict[str, Any]) -> str:
    """Results with equal keys were computed with the same settings (config, data, dtype, BN mode, version)."""
    m = meta(result)
    cfg = {k: v for k, v in (config(result) or {}).items() if k not in NON_SETTINGS}
    return json.dumps([cfg] + [m.get(k) for k in GROUPING_META[1:]], sort_keys=True, default=str)


def group(results: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Results split by :func:`group_key`, the largest group first (ties: first seen)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault(group_key(r), []).append(r)
    return sorted(groups.values(), key=lambda g: -len(g))


def fmt_value(v: Any) -> str:
    if v is None:
        return "none"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return ",".join(fmt_value(x) for x in v)
    return str(v)


def describe(cfg: dict[str, Any]) -> str:
    """``key=value`` of every setting that is set (None and False left out)."""
    return ", ".join(f"{k}={fmt_value(v)}" for k, v in cfg.items()
                     if v is not None and v is not False and k not in NON_SETTINGS)


def differences(groups: list[list[dict[str, Any]]]) -> list[str]:
    """Per group, the settings in which it differs from the others (``top_k=1, density=True``)."""
    cfgs = [config(g[0]) for g in groups]
    extra = [{f"data.{k}": v for k, v in (meta(g[0]).get("data_spec") or {}).items()}
             | {k: meta(g[0]).get(k) for k in ("dtype", "bn_mode", "analysis_version")} for g in groups]
    full = [{**c, **e} for c, e in zip(cfgs, extra)]
    keys = list(dict.fromkeys(k for f in full for k in f))
    varying = [k for k in keys if len({json.dumps(f.get(k), default=str) for f in full}) > 1]
    return [", ".join(f"{k}={fmt_value(f.get(k))}" for k in varying) for f in full]


FILE_DATA = (".pt", ".pth", ".npz", ".h5", ".hdf5")  # data files hold one set of samples: no split applies


def data_text(results: Iterable[dict[str, Any]]) -> str:
    """``data: digits (train split, all 1,437 samples)`` from the stored data spec or the result.

    The split is named only for data that has splits (not for a user's ``val.pt``); the
    sample count reads the same whether the result or the stored spec carries it.
    """
    results = list(results)
    if not results:
        return ""
    r = results[0]
    spec = meta(r).get("data_spec") or {}
    data = spec.get("data") or r.get("data")
    n = r.get("n_samples", spec.get("n_samples"))
    ms = spec.get("max_samples", r.get("max_samples")) if spec or "max_samples" in r else None
    parts = []
    split = spec.get("split", r.get("split"))
    if split and not (isinstance(data, str) and data.lower().endswith(FILE_DATA)):
        parts.append(f"{split} split")
    if ms is not None:
        parts.append((f"{int(n):,} samples" if n is not None else f"≤{int(ms):,} samples") + ", seeded selection")
    elif n is not None:
        parts.append(f"all {int(n):,} samples")
    elif spec:
        parts.append("all samples")
    if spec.get("seed") not in (None, 0):
        parts.append(f"seed {spec['seed']}")
    if not data and not parts:
        return ""
    name = data if data else "as named by the checkpoint"
    return f"data: {name}" + (f" ({', '.join(parts)})" if parts else "")


def numerics_text(results: Iterable[dict[str, Any]]) -> str:
    results = list(results)
    if not results:
        return ""
    m = meta(results[0])
    bits = [m.get("dtype"), f"BatchNorm {m['bn_mode']}" if m.get("bn_mode") else None]
    return ", ".join(b for b in bits if b)


def setting(cfg: dict[str, Any], r: dict[str, Any], k: str, default: Any = None) -> Any:
    """Setting ``k`` from the stored config, else from the result itself, else ``default``."""
    v = cfg.get(k)
    return r.get(k, default) if v is None else v


def sam_text(cfg: dict[str, Any], r: dict[str, Any]) -> str:
    rho, variant, m = setting(cfg, r, "rho"), setting(cfg, r, "variant"), setting(cfg, r, "m")
    if rho is None or rho == 0:  # --rho 0: no SAM quantity was computed
        return ""
    return f"SAM {variant or 'l2'} ρ={fmt_value(rho)}" + (f", m={m}" if m else "")


def curvature_name(cfg: dict[str, Any], r: dict[str, Any]) -> str:
    """How the curvature operator of a result is named in words (``Hessian`` when not recorded)."""
    c = str(setting(cfg, r, "curvature") or "hessian")
    return CURVATURE_NAMES.get(c, c)


CURVATURE_NAMES = {"hessian": "Hessian", "ggn": "GGN", "fisher": "Fisher", "ef": "empirical Fisher"}


def caption(view_text: str, results: list[dict[str, Any]], extra: str = "", data: bool = True) -> str:
    """One line naming every setting a figure of ``results`` was computed with: the view's own
    settings in words (each view's ``caption``), the data (``data=False`` for analyses that use
    none), the numerics and ``extra``."""
    parts = [view_text, data_text(results) if data else "", numerics_text(results), extra]
    return " · ".join(p for p in parts if p)


# ----------------------------------------------------------------- where steps came from
def sources(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The checkpoint ``source`` record(s) of a result (``source`` per checkpoint, ``sources`` per run)."""
    src = result.get("source")
    if isinstance(src, dict):
        return [src]
    many = result.get("sources")
    return [s for s in many if isinstance(s, dict)] if isinstance(many, list) else []


def step_kind(results: Iterable[dict[str, Any]]) -> str:
    """``"step"``, ``"epoch"`` (every checkpoint counts epochs) or ``"step/epoch"`` (mixed)."""
    kinds = set()
    for r in results:
        for s in sources(r):
            ss = str(s.get("step_source") or "")
            kinds.add("epoch" if ss.endswith("epoch") else "step")
    if kinds == {"epoch"}:
        return "epoch"
    return "step/epoch" if len(kinds) > 1 else "step"


def step_axis(results: Iterable[dict[str, Any]]) -> str:
    """x-axis label of a quantity over checkpoints."""
    kind = step_kind(results)
    return {"epoch": "epoch", "step": "training step", "step/epoch": "training step or epoch (see sources)"}[kind]


def run_path(result: dict[str, Any]) -> str:
    return str(result.get("run") or Path(str(result.get("path", ""))).parent)
