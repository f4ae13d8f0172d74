"""Every ``plot`` of ``sam_probe/report`` on synthetic results: labels, legends, titles, log axes, files."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import report_synth as syn
from sam_probe.report import (alignment, distance, features, figures, interpolate, overlap, ratios, sharpness,
                              subspace)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture
def captured(monkeypatch, umask_022):
    """``[(stem, figure, files)]`` of every figure written; figures stay open for inspection."""
    import matplotlib.pyplot as plt

    close = plt.close
    figs: list = []
    orig = figures.write

    def write(fig, path):
        files = orig(fig, path)
        figs.append((Path(files[0]).stem, fig, files))
        return files

    monkeypatch.setattr(plt, "close", lambda *a, **k: None)
    monkeypatch.setattr(figures, "write", write)
    with figures.palette_session():
        yield figs
    close("all")


def data_axes(fig):
    return [ax for ax in fig.axes if ax.get_visible() and ax.get_label() != "<colorbar>"]


def data_lines(ax):
    """Lines drawn in data coordinates (event marks are axvlines in axes coordinates)."""
    return [ln for ln in ax.get_lines() if ln.get_transform() is ax.transData]


def check_figure(stem, fig, files):
    """The conventions every figure keeps (see ``sam_probe/report/figures.py``)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    assert fig._suptitle is not None and fig._suptitle.get_text().strip(), stem
    axes = data_axes(fig)
    assert axes, stem
    for ax in axes:
        assert ax.get_xlabel().strip(), (stem, "x", ax.get_title())
        assert ax.get_ylabel().strip(), (stem, "y", ax.get_title())
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None] + list(fig.legends)
    for sub in getattr(fig, "subfigs", []):
        legends += list(sub.legends)
    for leg in legends:
        box = leg.get_window_extent(renderer)
        assert not box.overlaps(fig._suptitle.get_window_extent(renderer)), (stem, "legend over the title")
        for ax in axes:
            assert not box.overlaps(ax.get_window_extent(renderer)), (stem, "legend over data", ax.get_title())
    assert figures.overlapping_ticks(fig) == [], stem
    for ax in axes:
        scale = ax.get_yscale()
        if scale not in ("log", "symlog"):
            continue
        lo, hi = ax.get_ylim()
        for ln in data_lines(ax):
            y = np.asarray(ln.get_ydata(), dtype=float)
            y = y[np.isfinite(y)]
            if scale == "log":
                assert (y > 0).all(), (stem, "a value <= 0 would be dropped on a log axis")
            assert ((y >= lo - 1e-12) & (y <= hi + 1e-12)).all(), (stem, "values outside the axis")
    for f in files:
        assert f.exists() and (f.stat().st_mode & 0o777) == 0o644, f
        if f.suffix == ".png":
            from PIL import Image
            with Image.open(f) as im:
                assert round(im.info["dpi"][0]) == figures.DPI


def by_stem(figs):
    return {stem: (fig, files) for stem, fig, files in figs}


def test_sharpness_facets_models_marks_switch_and_names_settings(captured, tmp_path):
    results = (syn.sharpness() + syn.sharpness("/runs/cnn-sgd", syn.CNN, 4258, switch=None, scale=10.0))
    written = sharpness.plot(results, tmp_path)
    figs = by_stem(captured)
    assert {p.stem for p in written} == {"sharpness", "sharpness_density", "sharpness_layers"}
    for stem, (fig, files) in figs.items():
        check_figure(stem, fig, files)
    fig = figs["sharpness"][0]
    title = fig._suptitle.get_text()
    for text in ("top-3", "ρ=0.05", "hutch++", "digits", "train split", "≤500 samples", "one row per model"):
        assert text in title, text
    lam_axes = [ax for ax in fig.axes if ax.get_title().startswith("λ1")]
    assert len(lam_axes) == 2  # one row per model: the CNN's λ1 (10x) never squeezes the MLP's
    for ax in lam_axes:
        assert len({ln.get_label() for ln in data_lines(ax)}) == 1
    marks = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert "SAM from 100" in marks
    assert all(ax.get_xlabel() == "training step" for ax in data_axes(fig))
    dens = figs["sharpness_density"][0]
    ax = data_axes(dens)[0]
    y = np.concatenate([ln.get_ydata() for ln in data_lines(ax)])
    assert y.min() >= sharpness.DENSITY_FLOOR * y.max() * 0.999  # not drawn down to 1e-19
    assert ax.get_ylim()[0] >= sharpness.DENSITY_FLOOR * y.max() * 0.999


def test_epoch_steps_are_labelled_epoch(captured, tmp_path):
    sharpness.plot(syn.sharpness(step_source="content:epoch"), tmp_path)
    fig, files = by_stem(captured)["sharpness"]
    check_figure("sharpness", fig, files)
    assert {ax.get_xlabel() for ax in data_axes(fig)} == {"epoch"}


def test_ratios_overlap_alignment(captured, tmp_path):
    ratios.plot(syn.ratios() + syn.ratios("/runs/mlp-sgd"), tmp_path)
    overlap.plot(syn.overlap(), tmp_path)
    alignment.plot(syn.alignment(), tmp_path)
    figs = by_stem(captured)
    assert set(figs) == {"ratios_categories", "ratios_buckets", "overlap_C1", "overlap_C1_jaccard", "alignment"}
    for stem, (fig, files) in figs.items():
        check_figure(stem, fig, files)
    ov = figs["overlap_C1"][0]
    assert all(ax.get_ylabel() for ax in data_axes(ov))  # overlap plots had no y-label
    core_ax = data_axes(ov)[1]
    assert core_ax.get_yscale() == "symlog"  # the emptied core (0) stays visible
    assert any("anchor 8" == t.get_text() for t in core_ax.texts)
    jac = figs["overlap_C1_jaccard"][0]
    shown = [t for t in data_axes(jac)[0].get_xticklabels() if t.get_visible() and t.get_text()]
    assert 3 <= len(shown) < 60  # 60 steps: thinned so they never run together
    al = figs["alignment"][0]
    chi_ax = data_axes(al)[0]
    assert any(ln.get_label().startswith("chance") for ln in chi_ax.get_lines())
    assert "top-10" in al._suptitle.get_text()


def test_distance_keeps_the_reference_step_on_the_log_axis(captured, tmp_path):
    distance.plot(syn.distance() + syn.distance("/runs/cnn-sgd", syn.CNN, switch=None), tmp_path)
    fig, files = by_stem(captured)["distance"]
    check_figure("distance", fig, files)
    axes = data_axes(fig)
    assert len(axes) == 4  # two models: one row each
    for ax in axes:
        assert ax.get_yscale() == "symlog"
        assert ax.get_ylim()[0] <= 0.0
        assert any(0.0 in list(ln.get_ydata()) for ln in data_lines(ax))
    texts = {t.get_text() for ax in axes for t in ax.texts}
    assert {"reference 100", "SAM from 100"} <= texts


def test_interpolate_features_subspace_and_layers(captured, tmp_path):
    interpolate.plot(syn.interpolate() + syn.interpolate("/runs/a/step_000200.pt", "/runs/b/step_000200.pt"),
                     tmp_path)
    features.plot(syn.features() + syn.features("/runs/img", image=True), tmp_path)
    written = subspace.plot(syn.subspace() + syn.subspace("/runs/other"), tmp_path)
    figs = by_stem(captured)
    assert {"interpolate", "features", "features_heatmaps", "subspace", "subspace_overlap"} <= set(figs)
    assert {p.stem for p in written} == {"subspace", "subspace_overlap"}
    for stem, (fig, files) in figs.items():
        check_figure(stem, fig, files)
    sub = figs["subspace"][0]
    prev = data_lines(data_axes(sub)[0])[0]
    assert list(prev.get_ydata()) == pytest.approx([0.9] * 5)  # overlap with the previous checkpoint


def test_run_colours_are_shared_by_every_figure_of_a_report(captured, tmp_path):
    sharpness.plot(syn.sharpness(), tmp_path)
    distance.plot(syn.distance(), tmp_path)
    colours = set()
    for _, fig, _ in captured:
        for ax in data_axes(fig):
            colours |= {tuple(np.round(np.asarray(ln.get_color(), dtype=float), 4)) for ln in data_lines(ax)
                        if ln.get_label().startswith("mlp-late-sam")}
    assert len(colours) == 1


def test_formats_on_request_and_no_overwrite_between_setting_groups(tmp_path, umask_022):
    with figures.palette_session(), figures.file_format("png,svg,pdf"):
        a = distance.plot(syn.distance(), tmp_path)
        b = distance.plot(syn.distance(), tmp_path)  # a second settings group of the same analysis
    assert sorted(p.name for p in a) == ["distance.pdf", "distance.png", "distance.svg"]
    assert sorted(p.name for p in b) == ["distance_2.pdf", "distance_2.png", "distance_2.svg"]
    assert all((p.stat().st_mode & 0o777) == 0o644 for p in a + b)
    with pytest.raises(ValueError):
        figures.parse_formats("png,gif")


def test_declutter_thins_colliding_tick_labels(tmp_path):
    fig, ax = figures.new_figure(width=3.0)
    ax.plot(range(40), range(40))
    ax.set_xticks(range(40), [str(120 + 40 * i) for i in range(40)])
    assert figures.overlapping_ticks(fig)
    figures.declutter(fig)
    assert figures.overlapping_ticks(fig) == []
    import matplotlib.pyplot as plt
    plt.close(fig)


def test_a_vanished_model_is_marked_collapsed():
    import numpy as np

    from sam_probe.report.features import collapsed

    imp = np.array([[1.0, 2.0], [0.5, 0.5], [1e-6, 2e-6]])
    assert collapsed(imp).tolist() == [False, False, True]
    assert not collapsed(np.zeros((0, 3))).any()


# ---------------------------------------------------------------- labels that say what is drawn (issue 25, defect 5)
def test_ggn_per_module_and_the_rho_ball_are_named(captured, tmp_path):
    rs = syn.sharpness(cfg={**syn.SHARP_CFG, "curvature": "ggn", "per_layer": "module"})
    for r in rs:
        r.update(curvature="ggn", per_layer_by="module", worst_case_sharpness=0.05, average_case_sharpness=0.002,
                 average_case_se=0.001)
    sharpness.plot(rs, tmp_path)
    figs = by_stem(captured)
    main = figs["sharpness"][0]
    titles = [ax.get_title() for ax in data_axes(main)]
    assert "λ1, top GGN eigenvalue" in titles and "GGN trace (band: ± SE)" in titles
    assert not any("Hessian" in t for t in titles) and "sharpness in the ρ-ball" in titles
    legend = [t.get_text() for leg in main.legends for t in leg.get_texts()]
    assert {"one-step SAM", "worst case (ascent, a lower bound)", "average case (band: ± SE)"} <= set(legend)
    layers = figs["sharpness_layers"][0]
    assert {ax.get_ylabel() for ax in data_axes(layers)[:2]} == {"module"}
    assert "GGN" in data_axes(layers)[0].get_xlabel() and "tensor" not in layers._suptitle.get_text()
    assert "GGN spectral density" in figs["sharpness_density"][0]._suptitle.get_text()


def test_single_checkpoint_groups_get_no_over_training_panels(captured, tmp_path):
    one = syn.sharpness(steps=[400])
    assert sharpness.plot_metrics(one, tmp_path) == []  # one run, one checkpoint: the table says it all
    two = one + syn.sharpness("/runs/other", steps=[400], scale=2.0)
    sharpness.plot_metrics(two, tmp_path)
    fig = by_stem(captured)["sharpness"][0]
    assert "over training" not in fig._suptitle.get_text() and "one checkpoint per run" in fig._suptitle.get_text()
    for ax in data_axes(fig):
        assert [t.get_text() for t in ax.get_xticklabels()] == ["mlp-late-sam", "other"]
        assert all(ln.get_linestyle() == "None" for ln in data_lines(ax))  # dots, not one-point lines
    check_figure("sharpness", fig, [])


def test_alignment_table_and_figure_show_the_same_sign():
    r = syn.alignment()[1]
    t = alignment.tables_of([r])[0]
    i = t.columns.index("−ΔL bulk")
    assert t.rows[0][i] == pytest.approx(-r["dL"]["bulk"]) and t.rows[0][i] > 0


def test_data_captions(tmp_path):
    from sam_probe.report import unit_settings

    user = [{"n_samples": 1437, "_meta": {"data_spec": {"data": "val.pt", "split": "train", "max_samples": None,
                                                        "seed": 0}}}]
    assert unit_settings.data_text(user) == "data: val.pt (all 1,437 samples)"  # no split of a user's file
    digits = [{"_meta": {"data_spec": {"data": "digits", "split": "train", "max_samples": None, "seed": 0,
                                       "n_samples": 1437}}}]
    assert unit_settings.data_text(digits) == "data: digits (train split, all 1,437 samples)"
    fresh = [{"n_samples": 1437, "_meta": {"data_spec": {"data": "digits", "split": "train", "max_samples": None,
                                                         "seed": 0}}}]
    assert unit_settings.data_text(fresh) == unit_settings.data_text(digits)  # the same words either way
    assert "data:" not in distance.caption(syn.distance())  # distance reads no data


def test_subspace_chance_is_grey_labelled_and_inside_the_axis(captured, tmp_path):
    subspace.plot(syn.subspace() + syn.subspace("/runs/other"), tmp_path)
    fig = by_stem(captured)["subspace"][0]
    ax = data_axes(fig)[0]
    chance = [ln for ln in data_lines(ax) if ln.get_linestyle() == "--"]
    assert chance and all(ln.get_color() == subspace.CHANCE_COLOR for ln in chance)
    run_colours = {ln.get_color() for ln in data_lines(ax) if ln.get_linestyle() != "--"}
    assert subspace.CHANCE_COLOR not in run_colours
    assert "chance k/P = 0.00056" in [t.get_text() for leg in fig.legends + [ax.get_legend()] if leg
                                      for t in leg.get_texts()]
    lo, _ = ax.get_ylim()
    assert lo < 5 / 8970  # the line is drawn above the floor of the axis


def test_marks_at_one_step_never_stack_and_escape_rates_read_short(captured, tmp_path):
    rs = syn.distance()
    rs[0]["escape_rate"] = 0.006812345
    distance.plot(rs, tmp_path)
    fig = by_stem(captured)["distance"][0]
    ax = data_axes(fig)[0]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in ax.texts if t.get_text() in ("reference 100", "SAM from 100")]
    assert len(boxes) == 2 and not boxes[0].overlaps(boxes[1])
    legend = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
    assert any("escape 0.0068/step" in t for t in legend)
    assert "escape rate 0.0068 per step" in distance.tables_of(rs)[0].notes[0]


def test_figure_names_are_unique_per_runs_checkpoints_and_settings(tmp_path, umask_022):
    def names(results):
        with figures.palette_session(), figures.named_for(results):
            return sorted(p.name for p in distance.plot(results, tmp_path))

    a = names(syn.distance())
    assert a == names(syn.distance())  # the same results: the same file
    assert a[0].startswith("distance__mlp-late-sam__") and a[0].endswith(".png")
    other_run = names(syn.distance("/runs/mlp-sgd"))
    other_settings = syn.distance()
    other_settings[0]["_meta"] = {**other_settings[0]["_meta"], "config": {"ref": "200"}}
    assert len({a[0], other_run[0], names(other_settings)[0]}) == 3
    assert len(list(tmp_path.glob("distance__*.png"))) == 3  # nothing was overwritten
