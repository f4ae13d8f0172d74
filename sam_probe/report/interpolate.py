"""Tables and figures of stored ``interpolate`` results."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from . import console, figures


def _label(r: dict[str, Any]) -> str:
    return f"{Path(r['a']).parent.name}/{Path(r['a']).stem} → {Path(r['b']).parent.name}/{Path(r['b']).stem}"


def show(results: list[dict[str, Any]]) -> None:
    rows = [[_label(r), r.get("step_a"), r.get("step_b"), r.get("loss_a"), r.get("loss_b"), r.get("barrier"),
             r.get("barrier_alpha")] for r in results]
    if rows:
        console.out.print(console.table("linear interpolation (barrier = max over [0,1] of L(w(a)) - chord)",
                                        ["path", "step A", "step B", "L(A)", "L(B)", "barrier", "at alpha"], rows))


def plot(results: list[dict[str, Any]], outdir: Path) -> list[Path]:
    """Loss (and accuracy) along each interpolation path."""
    if not results:
        return []
    has_acc = any(any(a is not None for a in r.get("accuracy") or []) for r in results)
    fig, axes = figures.new_figure(ncols=2 if has_acc else 1)
    axes = list(axes.flat) if has_acc else [axes]
    for r in results:
        line = axes[0].plot(r["alphas"], r["loss"], marker=".", label=f"{_label(r)} (barrier {r['barrier']:.3g})")[0]
        axes[0].plot([0, 1], [r["loss_a"], r["loss_b"]], ls="--", color=line.get_color(), lw=0.8)
        if has_acc:
            acc = [a if a is not None else float("nan") for a in r.get("accuracy") or []]
            axes[1].plot(r["alphas"], acc, marker=".", color=line.get_color())
    for ax in axes:
        ax.axvline(0, color="grey", lw=0.6)
        ax.axvline(1, color="grey", lw=0.6)
        ax.set_xlabel("alpha")
    axes[0].set_ylabel("loss")
    axes[0].legend(fontsize="x-small")
    if has_acc:
        axes[1].set_ylabel("accuracy")
    return [figures.save(fig, outdir / "interpolate")]
