"""Tables and figures of stored ``distance`` results."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from . import console, figures


def _name(r: dict[str, Any]) -> str:
    return Path(str(r.get("run", "run"))).name


def show(results: list[dict[str, Any]]) -> None:
    for r in results:
        rows = [[s, d, rel] for s, d, rel in zip(r["steps"], r["distance"], r["relative"])]
        rate = r.get("escape_rate")
        console.out.print(console.table(f"{_name(r)}: distance to step {console.fmt(r.get('ref_step'))}",
                                        ["step", "||w - w_ref||", "relative"], rows))
        console.out.print(f"escape rate {console.fmt(rate)} per {r.get('escape_by', 'step')} (slope of log distance "
                          f"over steps {', '.join(console.fmt(x) for x in r.get('escape_steps') or [])})",
                          highlight=False)


def plot(results: list[dict[str, Any]], outdir: Path) -> list[Path]:
    """Distance to the reference over steps (one line per run), log scale."""
    if not results:
        return []
    fig, ax = figures.new_figure()
    for r in results:
        pts = [(s, d) for s, d in zip(r["steps"], r["distance"]) if d and d > 0]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=f"{_name(r)} (escape {console.fmt(r.get('escape_rate'))})")
        if r.get("ref_step") is not None:
            ax.axvline(r["ref_step"], color="grey", lw=0.8, ls=":")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("||w_t - w_ref||")
    ax.legend(fontsize="x-small")
    return [figures.save(fig, outdir / "distance")]
