"""Every gallery entry (docs/gallery/<name>.py) at its --quick size: it writes its figure and JSON,
and its key claim holds at that size where it can (late-phase SAM needs the full size to get
flatter than SGD: at quick size only that every reported quantity exists and is finite is checked).
"""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # every gallery script end to end (pytest -m "not slow" skips it)

GALLERY = Path(__file__).resolve().parents[1] / "docs" / "gallery"
RUNS = Path(__file__).resolve().parents[1] / "sample_runs"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"gallery_{name}", GALLERY / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(name: str, tmp_path: Path) -> dict:
    numbers = _load(name).main(["--quick", "--out", str(tmp_path)])
    png = tmp_path / f"{name}.png"
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / f"{name}.json").read_text())["figure"] == png.name
    return numbers


def _finite(*xs) -> bool:
    return all(x is not None and math.isfinite(x) for x in xs)


def test_minor_first_major_last(tmp_path):
    d = _run("minor_first", tmp_path)
    n_features = d["settings"]["d"]
    seq = [j for j, _ in d["sam"]["sequence"]]
    assert seq[0] == n_features - 1 and seq[-1] == 0  # the weakest leads first, the strongest last
    assert all(b < a for a, b in zip(seq, seq[1:])) and len(seq) >= n_features // 2
    assert [j for j, _ in d["sgd"]["sequence"]] == [0]  # GD: the strongest from the start
    assert d["sam"]["plateau_ends_at_step"] > d["sgd"]["plateau_ends_at_step"]  # SAM's loss plateau
    regimes = [r["sam"]["regime"] for r in d["sweep"]]  # alphas increase
    assert regimes[0] == "collapse" and regimes[-1] == "GD-like" and "sequential" in regimes
    order = {"collapse": 0, "sequential": 1, "GD-like": 2}
    assert all(order[b] >= order[a] for a, b in zip(regimes, regimes[1:]))
    assert all(r["sgd"]["final_dominant"] == 0 for r in d["sweep"])


def test_minor_first_uses_the_shipped_diag_settings():
    sys.path.insert(0, str(RUNS))
    try:
        import make_sample_runs as m
    finally:
        sys.path.remove(str(RUNS))
    g = _load("minor_first")
    s = m.DIAG_SETTINGS
    assert s["data_args"] == g.DATA_ARGS and s["d"] == g.D
    assert (s["train"]["lr"], s["train"]["rho"], s["train"]["loss"], s["train"]["batch_size"]) == (g.LR, g.RHO, "bce", 0)
    assert m.DIAG_SCALES["medium"] == g.MEDIUM


def test_background_sam_puts_more_mass_on_dark_pixels_at_reduced_init(tmp_path):
    d = _run("background", tmp_path)
    gd, sam = d["scale 0.3 sgd"], d["scale 0.3 sam"]
    base = d["pixels"]["baseline_uniform"]
    assert 0 < base < 1 and d["pixels"]["dark_non_constant"] > 0
    assert sam["background_share"] > gd["background_share"]  # the measured claim at init x0.3
    assert gd["background_share"] < base and sam["background_share"] < base  # both learn to look at the digit
    assert gd["test_accuracy"] > 0.9 and sam["test_accuracy"] > 0.9


def test_late_sam_reports_every_quantity(tmp_path):
    """At quick size (60 SAM steps) late-SAM is still in its transient; only existence and finiteness."""
    d = _run("late_sam", tmp_path)
    for opt in ("sgd", "sam", "late-sam"):
        for r in d["final"][opt]:
            assert r["lambda_max"] > 0 and r["residual"] <= 1e-4
            assert _finite(r["trace"], r["trace_se"], r["test_loss"]) and 0 <= r["test_accuracy"] <= 1
    p = d["paths"]
    assert _finite(p["escape_rate"]["sgd"], p["escape_rate"]["late-sam"])
    assert all(r["barrier"] >= 0 and 0.0 in r["alphas"] and 1.0 in r["alphas"] for r in p["interpolation"].values())
    dl, ds = p["distance"]["late-sam"]["distance"], p["distance"]["sgd"]["distance"]
    assert dl[0] == ds[0] == 0 and dl[-1] > ds[-1]  # late-SAM moves further from the switch point


def test_alignment_down_then_up_and_bulk_decrease(tmp_path):
    d = _run("alignment", tmp_path)
    assert d["down_then_up"] and d["chi_min"] > d["chance_chi"] and d["chi_last"] > 10 * d["chance_chi"]
    for r in d["rows"]:
        assert r["max_residual"] <= 1e-4
        assert r["dL"]["full"] == pytest.approx(r["dL_pred"]["full"], rel=0.1)
        if r["step"] <= 120:  # later the two become comparable (see docs/gallery/README.md)
            assert r["dL"]["bulk"] < 0 and abs(r["dL"]["bulk"]) > 2 * abs(r["dL"]["dom"])
    assert all(v is not None and v > 0 for v in d["eta_star"].values())


def test_ratio_categories_and_persistence(tmp_path):
    d = _run("ratios", tmp_path)
    sam = d["runs"]["sam"]
    for r in sam["rows"]:
        assert sum(r["fractions"].values()) == pytest.approx(1.0, abs=1e-9)
        assert sum(b["count"] for b in r["buckets"]) == round(r["fractions"]["C1"] * r["n_params"])
    assert d["sam_C1_last"] > d["sam_C1_first"]  # C1 grows over training
    assert d["core_halves_within_steps"] is not None and d["core_halves_within_steps"] <= 10  # collapses fast ...
    assert d["core_lift_after_5"] > 10  # ... yet far more persistent than independent sets
    assert _finite(d["magnitude_lift_last"], d["ire_lift_last"], d["anchor_lift_last"])


def test_ratio_masked_table(tmp_path):
    d = _run("ratio_masked", tmp_path)
    md = (tmp_path / "ratio_masked.md").read_text()
    rows = {r["variant"]: r for r in d["results"]}
    assert set(rows) == {"SGD", "SAM", "SAM, C1 x 0", "SAM, C1 x 2", "SAM, C34 x 0", "SAM, C34 x 2"}
    for label, r in rows.items():
        assert f"| {label} |" in md
        assert 0 < r["accuracy_mean"] <= 1 and np.isfinite(r["loss_mean"])
    assert rows["SAM, C1 x 0"]["loss"] != rows["SAM"]["loss"]  # the mask changes training
