"""Stored results as a pandas ``DataFrame``: ``sp.load_results("results/")``, one row per stored result.

Columns, in order:

* ``analysis``, ``run`` (the run label tables, figures and CSV use), ``step``, ``path`` (the checkpoint);
* the result's own fields: scalars as they are, nested dicts as dotted names (``solver.vectors``,
  ``source.hparams.lr``), lists of numbers or strings expanded one column per entry, named by the singular
  of the field (``eigenvalues`` -> ``eigenvalue_1 .. eigenvalue_k``, ``residuals`` -> ``residual_1 ..``,
  ``categories`` -> ``category_1 ..``; a field not ending in ``s`` keeps its name: ``converged_1 ..``);
* ``run_dir`` and ``unit`` (the run's directory and the store file the row was read from);
* the ``settings.*`` columns of ``sam-probe report --format csv`` (config, data spec, dtype, BN mode, version).

Left out (named in ``df.attrs["left_out"]``): packed arrays (ratio codes, eigenvectors: they stay in the
store), lists of dicts or of lists, and lists longer than ``max_list``.  Files that are not readable
units are skipped with a warning and listed in ``df.attrs["skipped"]`` as ``(file, reason)``.

The store is read only through the hardened reader of ``report`` (:func:`sam_probe.report.collect.collect`:
per-unit budgets, control characters replaced, a unit stored twice shown once).  pandas is an optional
dependency (``pip install -e '.[pandas]'``), imported when this is called.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

FIRST = ("analysis", "run", "step", "path")
TRAILING = ("run_dir", "unit")
MAX_LIST = 100  # list entries expanded into columns; longer lists are left out


def singular(name: str) -> str:
    """``eigenvalues`` -> ``eigenvalue``, ``categories`` -> ``category``; names not in a plural ``s``
    (``loss``, ``previous``, ``basis``, ``converged``) as they are."""
    if name.endswith("ies") and len(name) > 3:
        return name[:-3] + "y"
    if name.endswith("s") and not name.endswith(("ss", "us", "is")) and len(name) > 1:
        return name[:-1]
    return name


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def columns(result: dict[str, Any], max_list: int = MAX_LIST) -> tuple[dict[str, Any], set[str]]:
    """``(columns, left out)`` of one JSON-like result (module docstring), without recursion."""
    row: dict[str, Any] = {}
    left: set[str] = set()
    stack: list[tuple[str, Any]] = list(reversed(list(result.items())))
    while stack:
        name, v = stack.pop()
        if isinstance(v, dict):
            stack += reversed([(f"{name}.{k}", x) for k, x in v.items()])
        elif isinstance(v, (list, tuple)):
            if not v or len(v) > max_list or not all(_scalar(x) for x in v):
                if v:
                    left.add(name)
                continue
            head, _, leaf = name.rpartition(".")
            base = f"{head}.{singular(leaf)}" if head else singular(leaf)
            if any(f"{base}_{i}" in row for i in range(1, len(v) + 1)):
                base = name
            for i, x in enumerate(v, 1):
                row[f"{base}_{i}"] = x
        else:
            row[name] = v
    return row, left


def load_results(results: str | Path, analysis: str | Sequence[str] | None = None, *,
                 max_list: int = MAX_LIST) -> Any:
    """Every stored result under ``results`` (a results directory or a merged ``.h5`` file) as a
    ``pandas.DataFrame``, one row per result; ``analysis``: only this analysis (or these).

        >>> df = sp.load_results("results/", "sharpness")
        >>> df.groupby("run")["eigenvalue_1"].max()
    """
    try:
        import pandas as pd
    except ImportError:
        raise ImportError("load_results needs pandas: pip install pandas (or pip install -e '.[pandas]' "
                          "from a clone)") from None
    from . import analyses
    from .commands.report_cmd import ORDER, name_runs, settings_columns
    from .errors import SamProbeError, SpecError, suggest
    from .report import collect

    src = Path(results)
    only = [analysis] if isinstance(analysis, str) else list(analysis) if analysis is not None else None
    known = analyses.names()
    for a in only or []:
        if a not in known:
            raise SpecError(f"analysis {a!r} is not one of {', '.join(known)}{suggest(str(a), known)}")
    if not src.exists():
        raise SpecError(f"{src}: no such results directory or file")
    try:
        coll = collect.collect(src, only, ORDER)
    except OSError as exc:
        raise SamProbeError(f"{src}: cannot be read as results ({str(exc).splitlines()[0]})") from None
    if coll.skipped:
        warnings.warn(f"{src}: {len(coll.skipped)} file(s) skipped (not readable results): "
                      + "; ".join(f"{f}: {why}" for f, why in coll.skipped[:3]), stacklevel=2)
    name_runs(coll)
    rows: list[dict[str, Any]] = []
    fields_order: dict[str, None] = {}
    settings_order: dict[str, None] = {}
    left_out: set[str] = set()
    for name, rs in coll.analyses.items():
        for r in rs:
            fields, left = columns(collect.public(r), max_list)
            left_out |= {f"{name}:{c}" for c in left}
            row = {"analysis": name, **{k: fields.pop(k, None) for k in FIRST[1:]}, **fields,
                   "run_dir": fields.pop("run_dir", None), "unit": (r.get(collect.META) or {}).get("unit")}
            cfg = settings_columns(r)
            fields_order.update(dict.fromkeys(fields))
            settings_order.update(dict.fromkeys(cfg))
            rows.append({**row, **cfg})
    cols = [*FIRST, *(c for c in fields_order if c not in TRAILING), *TRAILING, *settings_order]
    df = pd.DataFrame(rows, columns=cols)
    df.attrs["skipped"] = list(coll.skipped)
    df.attrs["left_out"] = sorted(left_out)
    return df
