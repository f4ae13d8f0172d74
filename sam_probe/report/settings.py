"""The settings a stored result was computed with, for captions, table headers and grouping.

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


def _fmt(v: Any) -> str:
    if v is None:
        return "none"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return ",".join(_fmt(x) for x in v)
    return str(v)


def describe(cfg: dict[str, Any]) -> str:
    """``key=value`` of every setting that is set (None and False left out)."""
    return ", ".join(f"{k}={_fmt(v)}" for k, v in cfg.items()
                     if v is not None and v is not False and k not in NON_SETTINGS)


def differences(groups: list[list[dict[str, Any]]]) -> list[str]:
    """Per group, the settings in which it differs from the others (``top_k=1, density=True``)."""
    cfgs = [config(g[0]) for g in groups]
    extra = [{f"data.{k}": v for k, v in (meta(g[0]).get("data_spec") or {}).items()}
             | {k: meta(g[0]).get(k) for k in ("dtype", "bn_mode", "analysis_version")} for g in groups]
    full = [{**c, **e} for c, e in zip(cfgs, extra)]
    keys = list(dict.fromkeys(k for f in full for k in f))
    varying = [k for k in keys if len({json.dumps(f.get(k), default=str) for f in full}) > 1]
    return [", ".join(f"{k}={_fmt(f.get(k))}" for k in varying) for f in full]


def data_text(results: Iterable[dict[str, Any]]) -> str:
    """``data digits (train split, all samples, seed 0)`` from the stored data spec or the result."""
    results = list(results)
    if not results:
        return ""
    r = results[0]
    spec = meta(r).get("data_spec") or {}
    data = spec.get("data") or r.get("data")
    n = r.get("n_samples")
    parts = []
    if spec or "split" in r:
        parts.append(f"{spec.get('split', r.get('split'))} split")
    if n is not None:
        parts.append(f"n={int(n):,} samples")
    elif spec:
        ms = spec.get("max_samples")
        parts.append("all samples" if ms is None else f"≤{int(ms):,} samples, seeded selection")
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


def _g(cfg: dict[str, Any], r: dict[str, Any], k: str, default: Any = None) -> Any:
    v = cfg.get(k)
    return r.get(k, default) if v is None else v


def sam_text(cfg: dict[str, Any], r: dict[str, Any]) -> str:
    rho, variant, m = _g(cfg, r, "rho"), _g(cfg, r, "variant"), _g(cfg, r, "m")
    if rho is None or rho == 0:  # --rho 0: no SAM quantity was computed
        return ""
    return f"SAM {variant or 'l2'} ρ={_fmt(rho)}" + (f", m={m}" if m else "")


def analysis_text(analysis: str, results: list[dict[str, Any]]) -> str:
    """The analysis-specific settings, in words."""
    if not results:
        return ""
    r = results[0]
    cfg = config(r)
    curv = cfg.get("curvature") or r.get("curvature") or "Hessian"
    if analysis == "sharpness":
        k = cfg.get("top_k") or max((len(x.get("eigenvalues") or []) for x in results), default=0)
        which = _g(cfg, r, "which", "LA")
        backend = _g(cfg, r, "backend", "lanczos")
        tol = cfg.get("tol")
        bits = [f"top-{k} {which} {curv} eigenvalues ({backend}" + (f", tol {tol:g})" if tol else ")")]
        if cfg.get("trace") or any(x.get("trace") is not None for x in results):
            tm = _g(cfg, r, "trace_method", "hutch++")
            tt = cfg.get("trace_tol")
            bits.append(f"trace {tm}" + (f" (rel. SE tol {tt:g})" if tt else ""))
        if cfg.get("density") or any(x.get("density") for x in results):
            bits.append(f"SLQ density ({cfg.get('density_steps', '?')} steps, {cfg.get('density_probes', '?')} probes)")
        bits.append(sam_text(cfg, r))
        return ", ".join(b for b in bits if b)
    if analysis == "ratios":
        return ", ".join(b for b in (sam_text(cfg, r), "faithful" if _g(cfg, r, "faithful") else "") if b)
    if analysis == "overlap":
        anchor = (r.get("anchor") or {}).get("step")
        return ", ".join(b for b in (f"category {r.get('category', cfg.get('category'))}",
                                     f"anchor step {anchor}" if anchor is not None else "",
                                     f"IRE rank {cfg['ire_rank']:g}" if cfg.get("ire_rank") else "",
                                     sam_text(cfg, r)) if b)
    if analysis == "alignment":
        k = _g(cfg, r, "k")
        return ", ".join(b for b in (f"top-{k} {curv} eigenspace" if k else f"{curv} eigenspace",
                                     f"η={_fmt(_g(cfg, r, 'eta'))}" if _g(cfg, r, "eta") is not None else "",
                                     f"minibatch {_g(cfg, r, 'minibatch_size', r.get('batch_size'))}",
                                     sam_text(cfg, r)) if b)
    if analysis == "distance":
        ref = r.get("ref_step", cfg.get("ref"))
        return f"reference: step {_fmt(ref)}" if ref is not None else ""
    if analysis == "interpolate":
        pts = cfg.get("points") or len(r.get("alphas") or [])
        rng = cfg.get("range")
        return f"{pts} points" + (f" on α ∈ [{_fmt(rng[0])}, {_fmt(rng[1])}]" if rng else "")
    if analysis == "features":
        return ", ".join(b for b in (f"{r.get('method', cfg.get('importance'))} importance",
                                     f"{r.get('strength_method', cfg.get('strength'))} strength",
                                     f"minor = weakest {_fmt(r.get('minor_fraction', cfg.get('minor_fraction')))}")
                         if b)
    if analysis == "subspace":
        k = _g(cfg, r, "k")
        return f"top-{k} {curv} eigenspace" if k else f"{curv} eigenspace"
    return describe(cfg)


def caption(analysis: str, results: list[dict[str, Any]], extra: str = "") -> str:
    """One line naming every setting a figure of ``results`` was computed with."""
    parts = [analysis_text(analysis, results), data_text(results), numerics_text(results), extra]
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
