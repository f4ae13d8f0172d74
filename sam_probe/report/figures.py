"""Shared figure plumbing: a headless paper style, run colours and labels, axes helpers, atomic saving.

Each analysis has its own module in ``sam_probe/report`` with ``show`` (tables)
and ``plot`` (figures) working on stored result dicts only (never recomputing).
Conventions every figure follows:

* axis labels with units, a title naming the analysis and a caption line with
  its settings (:func:`title`), legends beside the data (:func:`legend_beside`);
* one colour per run for every figure of one report (:func:`palette_session`,
  :func:`color`), seaborn's colour-blind palette;
* log axes keep zeros visible (:func:`log_axis`: symlog below the smallest
  positive value); tick labels never overlap (:func:`declutter`, run on save);
* files: PNG at :data:`DPI`, SVG/PDF on request, written atomically with the
  permissions of a normal file (0644 under the usual umask).
"""
from __future__ import annotations

import contextlib
import math
import textwrap
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import atomic_write
from .. import run_names

PALETTE = "colorblind"
DPI = 200
FORMATS = ("png", "svg", "pdf")
FORMAT = {"value": ("png",)}  # file formats :func:`write` produces (``report --plot-format``)


# ----------------------------------------------------------------- formats
def parse_formats(fmt: str | Sequence[str]) -> tuple[str, ...]:
    """``"png,svg"`` or ``["png", "svg"]`` -> ``("png", "svg")``; ValueError on an unknown format."""
    items = [f.strip().lower() for f in (fmt.split(",") if isinstance(fmt, str) else fmt) if f.strip()]
    bad = [f for f in items if f not in FORMATS]
    if bad or not items:
        raise ValueError(f"{','.join(bad) or fmt!r}: choose png, svg or pdf (comma-separated for several)")
    return tuple(dict.fromkeys(items))


@contextlib.contextmanager
def file_format(fmt: str | Sequence[str]) -> Iterator[None]:
    """Within the block, :func:`write` writes ``fmt`` (one or several of png, svg, pdf)."""
    before = FORMAT["value"]
    FORMAT["value"] = parse_formats(fmt)
    try:
        yield
    finally:
        FORMAT["value"] = before


def _libs() -> tuple[Any, Any]:
    """``(pyplot, seaborn)``, imported on first use (headless: figures are files, never windows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    return plt, sns


def colors_from(palette: str, n: int) -> list[Any]:
    """``n`` colours of a seaborn palette (for hues that are not runs: vectors, categories, layers)."""
    return list(_libs()[1].color_palette(palette, n))


# ----------------------------------------------------------------- runs: colours and labels
@dataclass
class Palette:
    """run key -> colour and label, shared by every figure drawn while it is active."""

    colors: dict[str, Any] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    given: dict[str, str] = field(default_factory=dict)  # labels results carry (``run``: --run-name or stored)
    written: set[str] | None = None  # figure stems written in this report (see :func:`write`); None: no renaming

    def add(self, keys: Iterable[str], given: dict[str, str] | None = None) -> None:
        new = [k for k in dict.fromkeys(keys) if k not in self.colors]
        fresh = {k: v for k, v in (given or {}).items() if self.given.get(k) != v}
        if not new and not fresh:
            return
        self.given.update(fresh)
        cb = colors_from(PALETTE, 10)
        base = [cb[i] for i in (0, 1, 2, 3, 4, 5, 9, 7, 6)]  # colour-blind palette, strong first, pale yellow out
        extra = colors_from("dark", 10)
        for k in new:
            i = len(self.colors)
            self.colors[k] = base[i] if i < len(base) else extra[(i - len(base)) % len(extra)]
        self.labels = run_names.labels(list(self.colors), self.given)


_ACTIVE: dict[str, Palette] = {"value": Palette()}


@contextlib.contextmanager
def palette_session(run_keys: Iterable[str] = (), labels: dict[str, str] | None = None) -> Iterator[Palette]:
    """One report: runs get their colours in the order given (first appearance), the same in every
    figure, and their labels (``labels``: run key -> label, e.g. read from the store)."""
    before = _ACTIVE["value"]
    pal = Palette(written=set())
    pal.add(run_keys, labels)
    _ACTIVE["value"] = pal
    try:
        yield pal
    finally:
        _ACTIVE["value"] = before


def disambiguate(keys: list[str]) -> dict[str, str]:
    """Labels of run directories: shortest informative trailing path, longer where two would clash."""
    return run_names.labels(keys)


def run_key(result: Any) -> str:
    """The run a result belongs to (its directory; see :func:`sam_probe.run_names.run_of`)."""
    if isinstance(result, dict):
        return run_names.run_of(result)
    return run_names.run_of({"path": str(result)})


def _given(result: Any) -> dict[str, str] | None:
    """The label a result carries for its run (``run`` beside ``run_dir``), to register."""
    if isinstance(result, dict) and result.get("run_dir") and result.get("run"):
        return {run_key(result): str(result["run"])}
    return None


def color(key_or_result: Any) -> Any:
    key = key_or_result if isinstance(key_or_result, str) else run_key(key_or_result)
    pal = _ACTIVE["value"]
    pal.add([key], _given(key_or_result))
    return pal.colors[key]


def label(key_or_result: Any) -> str:
    key = key_or_result if isinstance(key_or_result, str) else run_key(key_or_result)
    pal = _ACTIVE["value"]
    pal.add([key], _given(key_or_result))
    return pal.labels[key]


def run_name(result_or_path: Any) -> str:
    """The label of the run a result came from (its ``--run-name`` or shortest informative path)."""
    if isinstance(result_or_path, dict):
        return label(result_or_path)
    return label(run_key(result_or_path))


def row_labels(results: list[dict[str, Any]]) -> list[str]:
    """Table labels: the run name, or ``run/file`` where one run has several files at one step.

    ``report`` shows each settings group in its own table, so one checkpoint is never
    listed twice under two names; distinct files at one step (a folder of layouts of
    the same weights) are named so the rows can be told apart.
    """
    keys = [(run_key(r), r.get("step")) for r in results]
    files: dict[tuple, set[str]] = {}
    for k, r in zip(keys, results):
        files.setdefault(k, set()).add(str(r.get("path")))
    return [f"{run_name(r)}/{Path(str(r.get('path'))).name}" if len(files[k]) > 1 else run_name(r)
            for k, r in zip(keys, results)]


def runs_of(results: Iterable[dict[str, Any]]) -> list[str]:
    """Run keys in order of first appearance, colour and label registered."""
    results = list(results)
    keys = list(dict.fromkeys(run_key(r) for r in results))
    given: dict[str, str] = {}
    for r in results:
        given.update(_given(r) or {})
    _ACTIVE["value"].add(keys, given)
    return keys


def run_palette(results: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """``{label: colour}`` for seaborn's ``palette=`` with ``hue="run"`` (labels as in :func:`label`)."""
    return {label(k): color(k) for k in runs_of(results)}


# ----------------------------------------------------------------- figures
def new_figure(ncols: int = 1, nrows: int = 1, width: float = 5.0, height: float = 3.6) -> tuple[Any, Any]:
    """A figure in the project's paper-ready style (constrained layout: legends and titles get room)."""
    plt, sns = _libs()
    sns.set_theme(context="paper", style="whitegrid", palette=PALETTE, font_scale=1.1)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False,
                             layout="constrained")
    return fig, axes if ncols * nrows > 1 else axes[0, 0]


def facet_grid(row_labels: list[str], ncols: int, width: float = 4.4, height: float = 3.2) -> tuple[Any, Any]:
    """A figure with one row (subfigure) per facet, each row titled by its label; axes as a 2-D array."""
    import numpy as np

    if len(row_labels) <= 1:
        fig, axes = new_figure(ncols=ncols, width=width, height=height)
        return fig, np.asarray(axes).reshape(1, ncols)
    plt, sns = _libs()
    sns.set_theme(context="paper", style="whitegrid", palette=PALETTE, font_scale=1.1)
    fig = plt.figure(figsize=(width * ncols, (height + 0.25) * len(row_labels)), layout="constrained")
    rows = fig.subfigures(len(row_labels), 1)
    axes = []
    for sub, lab in zip(rows, row_labels):
        axes.append(sub.subplots(1, ncols, squeeze=False)[0])
        sub.suptitle(lab, fontsize="small", fontweight="bold", x=0.01, ha="left")
    return fig, np.asarray(axes)


def title(fig: Any, name: str, settings: str = "") -> None:
    """Figure title: the analysis on the first line, its settings (wrapped) below."""
    width_chars = max(40, int(fig.get_figwidth() * 15))
    lines = [name] + (textwrap.wrap(settings, width_chars) if settings else [])
    fig.suptitle("\n".join(lines), fontsize="medium", x=0.5, ha="center")


def legend_beside(ax: Any, handles: list | None = None, labels: list | None = None, title: str | None = None,
                  below: bool = False) -> Any:
    """A legend outside the axes, on the right (or below for long labels); never over the data."""
    if handles is None:
        handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return None
    old = ax.get_legend()
    if old is not None:
        old.remove()
    if below:
        return ax.legend(handles, labels, title=title, loc="upper center", bbox_to_anchor=(0.5, -0.18),
                         fontsize="small", title_fontsize="small", frameon=False, ncols=1)
    return ax.legend(handles, labels, title=title, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0,
                     fontsize="small", title_fontsize="small", frameon=False)


def figure_legend(fig: Any, title: str | None = None, handles: list | None = None, labels: list | None = None) -> Any:
    """One legend for the whole figure, right of every panel (entries of all axes, each label once)."""
    if handles is None:
        seen: dict[str, Any] = {}
        for a in fig.axes:
            for h, lab in zip(*a.get_legend_handles_labels()):
                seen.setdefault(lab, h)
        handles, labels = list(seen.values()), list(seen)
    if not handles:
        return None
    return fig.legend(handles, labels, title=title, loc="outside right center", fontsize="small",
                      title_fontsize="small", frameon=False)


def log_axis(ax: Any, values: Iterable[Any], axis: str = "y") -> str:
    """Log scale that keeps zeros (and negatives) visible: symlog, linear below the smallest |value| > 0.

    Returns ``"log"`` or ``"symlog"``; a symlog axis is named in the axis label by the caller
    (see :func:`scale_note`).
    """
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    nonpos = any(v <= 0 for v in vals)
    setter = ax.set_yscale if axis == "y" else ax.set_xscale
    if not nonpos:
        setter("log")
        return "log"
    pos = [abs(v) for v in vals if v != 0]
    lin = 10 ** math.floor(math.log10(min(pos))) if pos else 1.0
    setter("symlog", linthresh=lin, linscale=0.6)
    (ax.set_ylim if axis == "y" else ax.set_xlim)(auto=True)
    ax._sam_probe_linthresh = lin  # noqa: SLF001 - read by scale_note
    return "symlog"


def scale_note(ax: Any) -> str:
    """``" (log; linear below 0.1)"`` for a symlog axis set by :func:`log_axis`, ``" (log)"`` else."""
    lin = getattr(ax, "_sam_probe_linthresh", None)
    return f"\n(log; linear below {lin:g} so zero shows)" if lin is not None else " (log)"


def mark_steps(ax: Any, marks: Iterable[tuple[float, str, Any]], ls: str = ":", above: bool = False) -> None:
    """Vertical lines at event steps, each with a small rotated label at the top of the axes.

    Labels of marks at one step alternate between the top and the bottom of the line (then its
    other side), never on top of each other;
    ``above``: short labels written horizontally above the axes instead (for axes without a title).
    """
    import matplotlib.transforms as mtransforms

    trans = mtransforms.blended_transform_factory(ax.transData, ax.transAxes)
    seen = ax.__dict__.setdefault("_sam_probe_marks", [])
    for x, text, col in marks:
        if x is None or (float(x), text) in seen:
            continue
        n = sum(1 for sx, _ in seen if sx == float(x))
        seen.append((float(x), text))
        ax.axvline(float(x), color=col, lw=1.0, ls=ls, alpha=0.9, zorder=1)
        if above:
            ax.text(float(x), 1.01, text, transform=trans, ha="center", va="bottom", fontsize="x-small", color=col)
            continue
        top = n % 2 == 0  # a second label at one step goes to the bottom, never on top of the first
        ax.text(float(x), 0.98 if top else 0.02, text, transform=trans, rotation=90, va="top" if top else "bottom",
                ha="right" if (n // 2) % 2 == 0 else "left", fontsize="x-small", color=col, clip_on=True,
                bbox={"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.7})


def _collide(a: Any, b: Any, renderer: Any, pad: float = 1.06) -> bool:
    """Whether two tick labels overlap: their boxes, or for rotated (parallel) labels their line spacing."""
    rot = math.radians(a.get_rotation() % 180)
    if abs(math.sin(rot)) > 0.05:
        xa, ya = a.get_transform().transform(a.get_position())
        xb, yb = b.get_transform().transform(b.get_position())
        spacing = abs((xb - xa) * math.sin(rot) - (yb - ya) * math.cos(rot))
        return spacing * pad < renderer.points_to_pixels(a.get_fontsize()) * 1.1
    return a.get_window_extent(renderer).expanded(pad, pad).overlaps(b.get_window_extent(renderer).expanded(pad, pad))


def _tick_labels(axis: Any) -> list[Any]:
    return [t for t in axis.get_ticklabels() if t.get_visible() and t.get_text()]


def declutter(fig: Any) -> None:
    """Hide tick labels until no two neighbours on an axis overlap (every n-th label is kept)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            labels = _tick_labels(axis)
            if len(labels) < 3:
                continue
            stride = 1
            while stride < len(labels) and any(_collide(a, b, renderer)
                                               for a, b in zip(labels[::stride], labels[stride::stride])):
                stride += 1
            if stride > 1:
                for i, t in enumerate(labels):
                    t.set_visible(i % stride == 0)


def overlapping_ticks(fig: Any) -> list[tuple[str, str]]:
    """Pairs of neighbouring visible tick labels that overlap on one axis (empty for a clean figure)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    bad = []
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            labels = _tick_labels(axis)
            bad += [(a.get_text(), b.get_text()) for a, b in zip(labels, labels[1:]) if _collide(a, b, renderer, 1.0)]
    return bad


_NAMING: dict[str, str | None] = {"value": None}  # "<runs>__<id>" of the results being drawn (see named_for)


def figure_id(results: Sequence[dict[str, Any]]) -> str:
    """``<runs>__<id>``: the runs' labels and 8 hex digits of a hash of every checkpoint drawn and
    the settings group, so two figures of different runs, checkpoints or settings never share a name
    while redrawing the same results names the same file."""
    import hashlib
    import json

    from .unit_settings import group_key

    runs = runs_of(results)
    units = sorted(json.dumps([run_key(r), r.get("path") or r.get("paths") or [r.get("a"), r.get("b")],
                               r.get("step") if r.get("step") is not None else r.get("steps")], default=str)
                   for r in results)
    digest = hashlib.sha256(json.dumps([units, sorted({group_key(r) for r in results})]).encode()).hexdigest()[:8]
    names = [_file_safe(label(k)) for k in runs]
    text = "+".join(names)
    if len(text) > 48:
        text = f"{names[0][:40]}+{len(names) - 1}-more"
    return f"{text}__{digest}"


def _file_safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.+=" else "-" for c in text).strip(".") or "run"


@contextlib.contextmanager
def named_for(results: Sequence[dict[str, Any]]) -> Iterator[str]:
    """Within the block, :func:`write` names each figure ``<stem>__<runs>__<id>`` (:func:`figure_id`)."""
    before = _NAMING["value"]
    _NAMING["value"] = figure_id(results) if results else None
    try:
        yield _NAMING["value"] or ""
    finally:
        _NAMING["value"] = before


def write(fig: Any, path: str | Path) -> list[Path]:
    """Write ``fig`` in every active format (see :func:`file_format`) atomically; close it; return the files.

    Inside :func:`named_for` the file is ``<stem>__<runs>__<id>``: unique per runs, checkpoints and
    settings, so a later command never replaces another's figure.  A stem already written in
    this report gets ``_2``, ``_3`` ... as well.
    """
    path = Path(path)
    if path.suffix.lstrip(".").lower() in FORMATS:  # "x/fig.png": the stem is "fig"
        path = path.with_suffix("")
    if _NAMING["value"]:
        path = path.with_name(f"{path.name}__{_NAMING['value']}")
    pal = _ACTIVE["value"]
    stem, n = path.name, 2
    if pal.written is not None:
        while str(path.parent / stem) in pal.written:
            stem, n = f"{path.name}_{n}", n + 1
        pal.written.add(str(path.parent / stem))
    path.parent.mkdir(parents=True, exist_ok=True)
    out = []
    try:
        declutter(fig)
        for fmt in FORMAT["value"]:
            target = path.parent / f"{stem}.{fmt}"
            with atomic_write(target, suffix=f".{fmt}", fsync=False) as tmp:
                fig.savefig(tmp, format=fmt, dpi=DPI, bbox_inches="tight", pad_inches=0.08,
                            metadata={"Date": None} if fmt == "svg" else None)
            out.append(target)
    finally:
        _libs()[0].close(fig)
    return out


def save(fig: Any, path: str | Path, fmt: str | None = None) -> Path:
    """:func:`write` in ``fmt`` (default: the first active format); returns the file."""
    if fmt is None:
        return write(fig, path)[0]
    with file_format(fmt):
        return write(fig, path)[0]


def step_heatmaps(results: list[dict[str, Any]], matrices: list[Any], colorbar: str) -> Any:
    """One step × step heat-map (values in [0, 1]) per run, up to three per row; returns the figure."""
    import numpy as np

    from .unit_settings import step_axis
    from .tables import step_value

    ncols = min(len(results), 3)
    nrows = -(-len(results) // ncols)
    fig, axes = new_figure(ncols=ncols, nrows=nrows, width=4.6, height=4.0)
    axes = list(np.asarray(axes).flat)
    for ax, r, m in zip(axes, results, matrices):
        im = ax.imshow(np.asarray(m, dtype=float), vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
        steps = [str(step_value(s)) for s in r["steps"]]
        ax.set_xticks(range(len(steps)), steps, rotation=90)
        ax.set_yticks(range(len(steps)), steps)
        ax.grid(False)
        ax.set_title(label(r), fontsize="small", color=color(r))
        ax.set_xlabel(step_axis([r]))
        ax.set_ylabel(step_axis([r]))
        fig.colorbar(im, ax=ax, label=colorbar, shrink=0.85)
    for ax in axes[len(results):]:
        ax.set_visible(False)
    return fig


# ----------------------------------------------------------------- facets
def model_key(result: dict[str, Any]) -> tuple[str, str]:
    """``(key, label)`` of the model a result was computed on: its spec where stored, else its size."""
    import json

    from .unit_settings import meta

    spec = meta(result).get("model_spec")
    n = result.get("n_params")
    size = f"{int(n):,} params" if isinstance(n, (int, float)) else ""
    if isinstance(spec, dict) and spec.get("name"):
        args = spec.get("args") or {}
        short = ", ".join(f"{k}={v}" for k, v in args.items() if k not in ("in_dim", "out_dim", "num_classes",
                                                                               "in_channels", "image_size"))
        text = spec["name"] + (f" ({short})" if short else "") + (f", {size}" if size else "")
        return json.dumps(spec, sort_keys=True), text
    if size:
        return size, size
    return "", ""


def facets(results: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """Results split by model (``[(label, results)]``): runs of different models never share a linear axis.

    Results without a model identity join the model of their run where one
    result of that run has it.
    """
    by_run: dict[str, tuple[str, str]] = {}
    for r in results:
        k = model_key(r)
        if k[0]:
            by_run.setdefault(run_key(r), k)
    groups: dict[str, tuple[str, list[dict[str, Any]]]] = {}
    for r in results:
        k = model_key(r) if model_key(r)[0] else by_run.get(run_key(r), ("", ""))
        groups.setdefault(k[0], (k[1], []))[1].append(r)
    return list(groups.values())
