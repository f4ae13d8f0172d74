"""The ``landscape`` view on synthetic stored results: a table row per checkpoint, contour and
surface figures that keep every convention (named per run and settings, titled, labelled)."""
from __future__ import annotations

import report_synth as syn
from sam_probe.report import landscape
from test_plots import by_stem, captured, check_figure, umask_022  # noqa: F401 - fixtures

CFG = {"directions": "top-eigen", "grid": 9, "range": [-1.0, 1.0], "seed": 0, "bias_bn": None, "tol": 1e-3,
       "max_hvp": None}


def results(run: str = "/runs/mlp-sam", steps=range(0, 250, 50)) -> list[dict]:
    alphas = [-1 + 0.25 * i for i in range(9)]
    out = []
    for s in steps:
        l1, l2 = 1 + s / 50, 0.5 + s / 200
        loss = [[0.05 + 0.5 * (l1 * a * a + l2 * b * b) for b in alphas] for a in alphas]
        out.append({"path": f"{run}/step_{s:06d}.pt", "step": s, "directions": "top-eigen", "alphas": alphas,
                    "loss": loss, "accuracy": None, "loss_center": 0.05, "loss_min": 0.05, "min_at": [0.0, 0.0],
                    "loss_max": max(map(max, loss)), "param_norm": 10.0, "direction_norms": [1.0, 1.0],
                    "cosine": 0.0, "eigenvalues": [l1, l2], "residuals": [1e-4, 1e-4], "n_hvp": 30, "n_params": 760,
                    "source": syn.source(), "_meta": syn.meta("landscape", CFG, step=s)})
    return out


def test_table_has_a_row_per_checkpoint_with_the_minimum_and_eigenvalues():
    (t,) = landscape.tables_of(results())
    assert len(t.rows) == 5 and "top-eigen directions, 9×9 grid" in t.title
    assert t.rows[0][5] == "(0, 0)" and t.rows[-1][-1] == "5, 1.5"
    assert landscape.tables_of([]) == []


def test_contour_and_surface_figures_keep_the_conventions(captured, tmp_path):  # noqa: F811
    rs = results("/runs/mlp-sgd", steps=range(0, 450, 50))[::4]  # steps 0, 200, 400
    written = landscape.plot(rs, tmp_path)
    assert {p.stem.split("__")[0] for p in written} == {"landscape_contour", "landscape_surface"}
    figs = by_stem(captured)
    for stem, (fig, files) in figs.items():
        check_figure(stem, fig, files)
        title = fig._suptitle.get_text()
        assert "step 400" in "".join(ax.get_title() for ax in fig.axes)
        assert "L(w + a·v1 + b·v2)" in title
    assert landscape.plot([], tmp_path) == []



def test_at_most_six_checkpoints_are_drawn_evenly_spaced_with_the_last():
    rs = results("/runs/mlp-sgd", steps=range(0, 450, 50))
    chosen = landscape._chosen(rs)
    assert len(chosen) == landscape.MAX_PANELS == 6 and chosen[0] is rs[0] and chosen[-1] is rs[-1]
    assert landscape._chosen(rs[:3]) == rs[:3]


def test_a_diverged_grid_is_drawn_without_failing(tmp_path, umask_022):  # noqa: F811
    (r,) = results(steps=[0])
    r["loss"] = [[float("nan") if (i + j) % 2 else float("inf") for j in range(9)] for i in range(9)]
    r["loss"][4][4] = 0.05
    assert landscape._log_levels(__import__("numpy").asarray([[float("nan")]]))[1] is False
    assert len(landscape._contours([r], tmp_path, "x")) == 1
