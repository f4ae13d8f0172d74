"""Tables and figures of stored ``landscape`` results: contour and surface plots of L(w + a d1 + b d2)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from . import figures, unit_settings
from .tables import Table, step_value
from .unit_settings import config, fmt_value

MAX_PANELS = 6  # checkpoints drawn per figure (evenly spaced over the results, the last always)
AXES = {"top-eigen": ("v1", "v2")}


def _axes_names(r: dict[str, Any]) -> tuple[str, str]:
    return AXES.get(r.get("directions") or "", ("d1", "d2"))


def caption(results: list[dict[str, Any]]) -> str:
    """The landscape settings in words."""
    if not results:
        return ""
    r, cfg = results[0], config(results[0])
    kind = r.get("directions") or cfg.get("directions")
    n = cfg.get("grid") or len(r.get("alphas") or [])
    rng = cfg.get("range") or ([r["alphas"][0], r["alphas"][-1]] if r.get("alphas") else None)
    text = f"{kind} directions, {n}×{n} grid"
    if rng:
        text += f" on [{fmt_value(float(rng[0]))}, {fmt_value(float(rng[1]))}]²"
    if kind == "filter-normalized" and cfg.get("bias_bn"):
        text += f", 1-D tensors {'zeroed' if cfg['bias_bn'] == 'zero' else 'normalised per tensor'}"
    seed = cfg.get("seed")
    if seed is not None:
        text += f", seed {seed}"
    return text


def tables_of(results: list[dict[str, Any]]) -> list[Table]:
    if not results:
        return []
    step = unit_settings.step_kind(results)
    rows = [[label, step_value(r.get("step")), r.get("directions"), r.get("loss_center"), r.get("loss_min"),
             _point(r.get("min_at")), r.get("loss_max"), _ratio(r), _eig(r)]
            for label, r in zip(figures.row_labels(results), results)]
    return [Table(f"loss landscape ({caption(results)})",
                  ["run", step, "directions", "L(w)", "min on grid", "at (a, b)", "max on grid", "‖d‖/‖w‖", "λ1, λ2"],
                  rows)]


def _point(p: Any) -> str | None:
    return f"({p[0]:.3g}, {p[1]:.3g})" if p and len(p) == 2 else None


def _ratio(r: dict[str, Any]) -> str | None:
    norms, w = r.get("direction_norms"), r.get("param_norm")
    if not norms or not w:
        return None
    return ", ".join(f"{n / w:.3g}" for n in norms)


def _eig(r: dict[str, Any]) -> str | None:
    ev = r.get("eigenvalues")
    return ", ".join(f"{v:.4g}" for v in ev) if ev else None


def _formula(results: list[dict[str, Any]]) -> str:
    n1, n2 = _axes_names(results[0])
    return f"L(w + a·{n1} + b·{n2})"


def _chosen(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """At most :data:`MAX_PANELS` results, evenly spaced, the last always among them."""
    n = len(results)
    if n <= MAX_PANELS:
        return list(results)
    idx = sorted({round(i * (n - 1) / (MAX_PANELS - 1)) for i in range(MAX_PANELS)})
    return [results[i] for i in idx]


def _panel_title(r: dict[str, Any]) -> str:
    step = r.get("step")
    text = f"{figures.run_name(r)}" + (f", step {step_value(step)}" if step is not None else "")
    ev = r.get("eigenvalues")
    if ev:
        text += f"\nλ1 = {ev[0]:.3g}, λ2 = {ev[1]:.3g}"
    return text


def _grid(r: dict[str, Any]) -> tuple[Any, Any, Any]:
    import numpy as np

    a = np.asarray(r["alphas"], dtype=float)
    L = np.asarray([[np.nan if v is None else v for v in row] for row in r["loss"]], dtype=float)
    A, B = np.meshgrid(a, a, indexing="ij")  # loss[i][j]: a = alphas[i] along d1, b = alphas[j] along d2
    return A, B, L


def _log_levels(L: Any) -> tuple[Any, bool]:
    """Contour levels: log-spaced when every loss is positive and they span more than a factor 10."""
    import numpy as np

    finite = L[np.isfinite(L)]
    if not finite.size:  # every point diverged: an empty panel, still labelled
        return np.linspace(0.0, 1.0, 16), False
    lo, hi = float(finite.min()), float(finite.max())
    if lo > 0 and hi / lo > 10:
        return np.geomspace(lo, hi, 16), True
    if hi <= lo:
        hi = lo + 1e-12
    return np.linspace(lo, hi, 16), False


def plot(results: list[dict[str, Any]], outdir: Path) -> list[Path]:
    """``landscape_contour``: filled contours per checkpoint with w (star) and the grid minimum (cross);
    ``landscape_surface``: the same losses as 3-D surfaces.  Up to :data:`MAX_PANELS` checkpoints each."""
    shown = [r for r in _chosen(results) if r.get("loss") and r.get("alphas")]
    if not shown:
        return []
    note = f"{len(shown)} of {len(results)} checkpoints, evenly spaced" if len(shown) < len(results) else ""
    cap = unit_settings.caption(caption(shown), shown, note)
    return _contours(shown, outdir, cap) + _surfaces(shown, outdir, cap)


def _layout(n: int) -> tuple[int, int]:
    ncols = min(3, n)
    return ncols, (n + ncols - 1) // ncols


def _contours(results: list[dict[str, Any]], outdir: Path, cap: str) -> list[Path]:
    import numpy as np
    from matplotlib.colors import LogNorm

    ncols, nrows = _layout(len(results))
    fig, axes = figures.new_figure(ncols=ncols, nrows=nrows, width=4.3, height=3.8)
    flat = list(np.asarray(axes).flat) if len(results) > 1 else [axes]
    for ax, r in zip(flat, results):
        A, B, L = _grid(r)
        levels, log = _log_levels(L)
        norm = LogNorm(vmin=levels[0], vmax=levels[-1]) if log else None
        cs = ax.contourf(A, B, L, levels=levels, norm=norm, cmap="viridis", extend="both")
        ax.contour(A, B, L, levels=levels, norm=norm, colors="white", linewidths=0.4, alpha=0.6)
        cb = fig.colorbar(cs, ax=ax, shrink=0.9)
        ticks = levels[::3] if levels[-1] in levels[::3] else [*levels[::3], levels[-1]]
        cb.set_ticks(ticks, labels=[f"{v:.3g}" for v in ticks])
        cb.ax.minorticks_off()
        cb.set_label("loss" + (" (log colour scale)" if log else ""))
        if r.get("min_at"):
            ax.plot([r["min_at"][0]], [r["min_at"][1]], marker="X", ms=10, mfc="white", mec="black", mew=1,
                    ls="", label="lowest loss on the grid")
        ax.plot([0], [0], marker="*", ms=10, mfc="tab:red", mec="black", mew=0.6, ls="",
                label="w (the checkpoint)")
        n1, n2 = _axes_names(r)
        ax.set_xlabel(f"a (along {n1})")
        ax.set_ylabel(f"b (along {n2})")
        ax.set_title(_panel_title(r), fontsize="small")
    for ax in flat[len(results):]:
        ax.set_visible(False)
    h, lab = flat[0].get_legend_handles_labels()
    fig.legend(h, lab, loc="outside lower center", ncols=2, fontsize="small", frameon=False)
    figures.title(fig, f"loss landscape {_formula(results)}", cap)
    return figures.write(fig, outdir / "landscape_contour")


def _surfaces(results: list[dict[str, Any]], outdir: Path, cap: str) -> list[Path]:
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    plt, sns = figures._libs()
    sns.set_theme(context="paper", style="whitegrid", palette=figures.PALETTE, font_scale=1.1)
    ncols, nrows = _layout(len(results))
    fig = plt.figure(figsize=(4.6 * ncols, 4.2 * nrows), layout="constrained")
    for i, r in enumerate(results):
        ax = fig.add_subplot(nrows, ncols, i + 1, projection="3d")
        A, B, L = _grid(r)
        ax.plot_surface(A, B, np.ma.masked_invalid(L), cmap="viridis", linewidth=0, antialiased=True,
                        rcount=L.shape[0], ccount=L.shape[1])
        n1, n2 = _axes_names(r)
        ax.set_xlabel(f"a (along {n1})", fontsize="small")
        ax.set_ylabel(f"b (along {n2})", fontsize="small")
        ax.set_zlabel("loss", fontsize="small")
        ax.tick_params(labelsize="x-small")
        for axis in (ax.xaxis, ax.yaxis, ax.zaxis):
            axis.set_major_locator(MaxNLocator(4))
        ax.set_title(_panel_title(r), fontsize="small")
    figures.title(fig, f"loss landscape {_formula(results)} as a surface", cap)
    return figures.write(fig, outdir / "landscape_surface")
