"""Every gallery entry (docs/gallery/<name>.py) at its --quick size: it writes its figure and JSON with its
control numbers and the papers' numbers, and its key claim (or its measured null) holds at that size where
it can (late-phase SAM needs the full size to get flatter than SGD: at quick size only that every control is
measured is checked; tests/test_phenomena.py checks the committed full-size numbers).
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


def test_late_sam_reports_every_quantity_with_its_controls(tmp_path):
    """At quick size (40 SAM steps) late-SAM is still in its transient: the check is that every control is
    measured and finite, the papers' numbers are in the JSON, and the escape beats the SGD continuation."""
    d = _run("late_sam", tmp_path)
    assert d["paper"]["sharpness_reduction_vs_sgd"].startswith("≈40%")
    for rec in d["per_seed"].values():
        for r in rec["final"].values():
            assert r["lambda_max"] > 0 and r["residual"] <= 1e-4
            assert _finite(r["trace"], r["trace_se"], r["test_loss"]) and 0 <= r["test_accuracy"] <= 1
        for m in rec["matched"].values():
            assert m["loss"] > 0 and _finite(m["a"], m["b"])
        esc = rec["escape"]["runs"]
        assert set(esc) == {"sgd", "sgd, other minibatches", "late-sam 0.3"}
        assert esc["late-sam 0.3"]["fit"]["better"] in ("power", "exponential")
        assert all(0 <= x <= 1 for x in esc["sgd"]["top_k_share"])
        late, sgd = esc["late-sam 0.3"]["distance"], esc["sgd"]["distance"]
        assert all(a > b for a, b in zip(late, sgd))  # late-SAM leaves the switch point faster than SGD
        assert all(b >= 0 for b in rec["barrier"].values())
    assert d["positive_control_barrier"]["sgd seed 0 ↔ sgd seed 1"] > 0.05  # two inits: two valleys


def test_alignment_against_the_first_order_null(tmp_path):
    d = _run("alignment", tmp_path)
    sgd, eos = d["runs"]["sgd"], d["runs"]["eos"]
    assert d["down_then_up"] and d["chi_min"] > d["chance_chi"]
    for r in sgd["rows"] + eos["rows"]:
        assert r["max_residual"] <= 1e-4
        assert r["dL"]["full"] == pytest.approx(r["dL_pred"]["full"], rel=0.1) or r["eta_lambda_max"] > 1
    for r in sgd["rows"]:  # eta lambda_max < 0.5: the one-step split is the first-order null
        assert r["eta_lambda_max"] < 0.5 and not r["claim_beyond_first_order"]
        assert r["bulk_over_dom"] == pytest.approx(r["first_order_null"], rel=0.15)
    at_edge = [r for r in eos["rows"] if r["step"] >= 100]
    assert all(1.8 < r["eta_lambda_max"] < 2.2 for r in at_edge)  # the edge of stability
    assert all(r["claim_beyond_first_order"] for r in at_edge)
    for key in ("sgd", "eos"):  # many projected steps: Bulk keeps the decrease, Dom does not
        m = d["multi_step"][key]
        assert m["claim"] and m["decrease"]["bulk"] > 0.5 * m["decrease"]["full"]
    assert all(v is not None and v > 0 for v in d["eta_star"].values())


def test_ratio_categories_and_persistence_against_nulls(tmp_path):
    d = _run("ratios", tmp_path)
    sam = d["runs"]["sam"]
    for r in sam["rows"]:
        for key in ("minibatch", "selection"):
            x = r[key]
            assert sum(x["fractions"].values()) == pytest.approx(1.0, abs=1e-9)
            assert sum(b["count"] for b in x["buckets"]) == round(x["fractions"]["C1"] * r["n_params"])
    s = d["summary"]["minibatch"]
    assert set(s["lifts"]) == {"independence", "shuffled", "markov", "control"}
    assert s["lifts"]["markov"]["core_after_1"] == pytest.approx(1.0)  # the fitted first transition
    assert 0 < s["core_fraction_of_anchor"]["5"] < s["core_fraction_of_anchor"]["1"] <= 1
    assert d["notebook"]["core_after_5_steps"] == 1e5 and _finite(s["magnitude_split"]["lift_last"])
    window = sam["overlap"]["minibatch window"]
    assert window["steps"][0] == d["settings"]["anchor"] and len(window["steps"]) == d["settings"]["dense"] + 1


def test_ratio_masked_table_with_random_controls(tmp_path):
    d = _run("ratio_masked", tmp_path)
    md = (tmp_path / "ratio_masked.md").read_text()
    rows = {r["variant"]: r for r in d["results"]}
    assert set(rows) == {"SGD", "SAM", "g~ on C1, g elsewhere", "random mask as large as C1", "SAM, C1 x 2",
                         "random mask as large as C1, x 2"}
    for label, r in rows.items():
        assert f"| {label} |" in md
        assert 0 < r["accuracy_mean"] <= 1 and np.isfinite(r["loss_mean"])
    assert rows["SAM, C1 x 2"]["loss"] != rows["SAM"]["loss"]  # the mask changes training
    assert rows["random mask as large as C1, x 2"]["loss"] != rows["SAM, C1 x 2"]["loss"]  # and so does its control
    assert rows["SAM, C1 x 2"]["notebook_accuracy_vs_sam"] == [-0.09, -0.57, -1.05, -0.12]
    s = d["summary"]["SAM, C1 x 2"]
    assert s["notebook_sign"] == "-" and s["our_sign"] in "+-"
