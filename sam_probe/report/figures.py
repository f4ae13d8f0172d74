"""Shared figure plumbing: a headless seaborn style and atomic saving.

Each analysis has its own module in ``sam_probe/report`` with a ``table`` and a
``plot`` function working on stored result dicts only (never recomputing).
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: figures are files, never windows

import matplotlib.pyplot as plt  # noqa: E402
import seaborn as sns  # noqa: E402

PALETTE = "colorblind"
FORMAT = {"value": "png"}  # figure file format of :func:`save` (``report --plot-format``)


@contextlib.contextmanager
def file_format(fmt: str) -> Iterator[None]:
    """Within the block, :func:`save` writes ``fmt`` (png, svg or pdf) unless told otherwise."""
    before = FORMAT["value"]
    FORMAT["value"] = fmt
    try:
        yield
    finally:
        FORMAT["value"] = before


def new_figure(ncols: int = 1, nrows: int = 1, width: float = 5.0, height: float = 3.6) -> tuple[Any, Any]:
    """A figure in the project's paper-ready style."""
    sns.set_theme(context="paper", style="whitegrid", palette=PALETTE, font_scale=1.1)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)
    return fig, axes if ncols * nrows > 1 else axes[0, 0]


def save(fig: Any, path: str | Path, fmt: str | None = None) -> Path:
    """Write ``fig`` to ``path`` (suffix set from ``fmt``, default :func:`set_format`'s) atomically and close it."""
    fmt = fmt or FORMAT["value"]
    path = Path(path).with_suffix(f".{fmt}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".{fmt}", dir=path.parent)
    os.close(fd)
    try:
        fig.tight_layout()
        fig.savefig(tmp, format=fmt, dpi=150)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def run_name(result_or_path: Any) -> str:
    """Short label of the run a result came from (its folder name)."""
    p = result_or_path.get("path") if isinstance(result_or_path, dict) else result_or_path
    return Path(str(p)).parent.name or str(p)


def row_labels(results: list[dict[str, Any]]) -> list[str]:
    """Table labels: the run name, or ``run/file`` where one run has several files at the same step."""
    keys = [(run_name(r), r.get("step")) for r in results]
    return [f"{k[0]}/{Path(str(r.get('path'))).name}" if keys.count(k) > 1 else k[0] for k, r in zip(keys, results)]
