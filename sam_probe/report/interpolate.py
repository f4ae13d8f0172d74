"""Tables and figures of stored ``interpolate`` results (loss along (1−α)·w_A + α·w_B, barrier)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from . import figures, unit_settings
from .tables import Table, step_value
from .unit_settings import config, fmt_value


def _end(p: str) -> str:
    return f"{figures.label(str(Path(p).parent))}/{Path(p).stem}"


def _label(r: dict[str, Any]) -> str:
    return f"{_end(r['a'])} → {_end(r['b'])}"


def caption(results: list[dict[str, Any]]) -> str:
    """The interpolation settings in words."""
    if not results:
        return ""
    r, cfg = results[0], config(results[0])
    pts, rng = cfg.get("points") or len(r.get("alphas") or []), cfg.get("range")
    return f"{pts} points" + (f" on α ∈ [{fmt_value(rng[0])}, {fmt_value(rng[1])}]" if rng else "")


def tables_of(results: list[dict[str, Any]]) -> list[Table]:
    rows = [[_label(r), step_value(r.get("step_a")), step_value(r.get("step_b")), r.get("loss_a"), r.get("loss_b"),
             r.get("barrier"), r.get("barrier_alpha")] for r in results]
    if not rows:
        return []
    return [Table("linear interpolation (barrier = max over [0,1] of L(w(a)) - chord)",
                  ["path", "step A", "step B", "L(A)", "L(B)", "barrier", "at alpha"], rows)]


def _color(r: dict[str, Any], i: int) -> Any:
    """The run's colour when both ends are in one run, else a colour of its own (dark palette)."""
    ra, rb = str(Path(r["a"]).parent), str(Path(r["b"]).parent)
    return figures.color(ra) if ra == rb else figures.colors_from("dark", 10)[i % 10]


def plot(results: list[dict[str, Any]], outdir: Path) -> list[Path]:
    """Loss (and accuracy) along each interpolation path; dashed: the chord between the end points."""
    if not results:
        return []
    for r in results:
        figures.runs_of([{"path": r["a"]}, {"path": r["b"]}])
    has_acc = any(any(a is not None for a in r.get("accuracy") or []) for r in results)
    fig, axes = figures.new_figure(ncols=2 if has_acc else 1, width=4.8, height=3.6)
    axes = list(axes.flat) if has_acc else [axes]
    for i, r in enumerate(results):
        col = _color(r, i)
        loss = [float("nan") if v is None else v for v in r["loss"]]
        axes[0].plot(r["alphas"], loss, marker=".", color=col,
                     label=f"{_label(r)} (barrier {r['barrier']:.3g})" if r.get("barrier") is not None else _label(r))
        axes[0].plot([0, 1], [r["loss_a"], r["loss_b"]], ls="--", color=col, lw=0.9)
        if has_acc:
            acc = [a if a is not None else float("nan") for a in r.get("accuracy") or []]
            axes[1].plot(r["alphas"], acc, marker=".", color=col)
    for ax in axes:
        figures.mark_steps(ax, [(0.0, "A (α = 0)", "0.35"), (1.0, "B (α = 1)", "0.35")], ls="-", above=True)
        ax.set_xlabel("interpolation coefficient α (0 = A, 1 = B)")
    axes[0].set_ylabel("loss L((1−α)·w_A + α·w_B) (loss)")
    if has_acc:
        axes[1].set_ylabel("accuracy (fraction correct)")
    h, lab = axes[0].get_legend_handles_labels()
    from matplotlib.lines import Line2D
    figures.legend_beside(axes[0], h + [Line2D([], [], ls="--", color="0.3")], lab + ["chord between A and B"],
                          title="path A → B", below=True)
    figures.title(fig, "linear interpolation between checkpoints", unit_settings.caption(caption(results), results))
    return figures.write(fig, outdir / "interpolate")
