"""The seed phenomena, reproduced on the shipped sample_runs through the CLI (README, "What sam-probe shows").

Each claim is checked on the deterministic runs in ``sample_runs/`` (and the
diag-linear run is re-trained here to show the shipped files are what the
script makes).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from clitools import run_cli
from sam_probe.commands.train_cmd import write_run

pytestmark = pytest.mark.slow  # end to end on the sample runs (pytest -m "not slow" skips it)

RUNS = Path(__file__).resolve().parents[1] / "sample_runs"


def _json(*args):
    res = run_cli(*args, "--no-store", "--json")
    assert res.code == 0, res.stderr
    return res.json()


# ------------------------------------------------------------------ 1. minor first, major last
def _sample_settings():
    import sys

    sys.path.insert(0, str(RUNS))
    try:
        import make_sample_runs as m
    finally:
        sys.path.remove(str(RUNS))
    return m


MAKE = _sample_settings()
DIAG_LAST = f"step_{MAKE.DIAG_SETTINGS['train']['steps']:06d}.pt"
# the data the diag runs were trained on, given explicitly (see sample_runs/README.md)
DIAG_DATA = [a for k, v in MAKE.DIAG_SETTINGS["data_args"].items() for a in ("--data-arg", f"{k}={v}")]


@pytest.fixture(scope="module")
def diag_features():
    out = {}
    for scale in ("small", "medium", "large"):
        d = _json("features", RUNS / f"diag-{scale}-gd", RUNS / f"diag-{scale}-sam", *DIAG_DATA)
        out[scale] = {Path(r["run"]).name.rsplit("-", 1)[1]: r for r in d["runs"]}
    return out


def test_small_init_sam_collapses(diag_features):
    gd, sam = diag_features["small"]["gd"], diag_features["small"]["sam"]
    assert max(gd["importance"][-1]) > 1.0  # GD fits the data
    assert max(sam["importance"][-1]) < 1e-4  # SAM's coefficients collapse to ~0
    loss = _json("sharpness", RUNS / "diag-small-sam" / DIAG_LAST, "--top-k", "0", "--rho", "0", *DIAG_DATA)
    assert loss["results"][0]["loss"] == pytest.approx(math.log(2), abs=1e-3)  # the trivial predictor


def test_medium_init_sam_minor_first_major_last_gd_major_throughout(diag_features):
    """SAM leads with the weakest feature, hands over feature by feature, and ends on the strongest."""
    gd, sam = diag_features["medium"]["gd"], diag_features["medium"]["sam"]
    d = len(sam["strength"])
    assert all(r["dominant_index"] == 0 for r in gd["results"])  # GD: the major feature from the first step
    ranks = [r["dominant_strength_rank"] for r in sam["results"][1:]]  # step 0: all tied at the init
    assert ranks[0] == d - 1  # minor first: the weakest feature leads first ...
    assert all(b <= a for a, b in zip(ranks, ranks[1:]))  # ... the lead only moves to stronger features ...
    assert len(set(ranks)) >= d // 2  # ... through many of them ...
    assert ranks[-1] == 0 and sam["results"][-1]["dominant_index"] == 0  # ... and major last
    assert max(r["minor_mass"] for r in sam["results"]) > max(r["minor_mass"] for r in gd["results"])


def test_large_init_sam_behaves_like_gd(diag_features):
    gd, sam = diag_features["large"]["gd"], diag_features["large"]["sam"]
    assert all(r["dominant_index"] == 0 for r in sam["results"] + gd["results"])
    a, b = np.array(gd["importance"][-1]), np.array(sam["importance"][-1])
    assert np.corrcoef(a, b)[0, 1] > 0.99


def test_shipped_diag_run_is_what_the_script_makes(tmp_path):
    s = MAKE.DIAG_SETTINGS
    write_run(tmp_path / "r", optimizer="sam", model_args={"in_dim": s["d"], "alpha": MAKE.DIAG_SCALES["medium"]},
              **MAKE.DIAG, **s["train"], data_args=s["data_args"])
    mine = torch.load(tmp_path / "r" / DIAG_LAST, weights_only=True)["model"]
    shipped = torch.load(RUNS / "diag-medium-sam" / DIAG_LAST, weights_only=True)["model"]
    for k in shipped:
        torch.testing.assert_close(mine[k], shipped[k], rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ 2. late-phase SAM
def test_late_sam_leaves_the_sgd_path_and_finds_flatter_minimum():
    switch = 200
    d = _json("distance", RUNS / "digits-mlp-sgd", RUNS / "digits-mlp-late-sam", "--ref", str(switch))
    sgd, late = ({Path(r["run"]).name: r for r in d["runs"]}[n] for n in ("digits-mlp-sgd", "digits-mlp-late-sam"))
    after = [i for i, s in enumerate(late["steps"]) if s > switch]
    assert late["escape_rate"] > 0
    assert all(late["distance"][i] > 1.2 * sgd["distance"][i] for i in after)  # moves further than SGD would
    final = {r["path"].split("/")[-2]: r for r in _json(
        "sharpness", RUNS / "digits-mlp-sgd" / "step_000400.pt", RUNS / "digits-mlp-late-sam" / "step_000400.pt",
        "--top-k", "1", "--rho", "0")["results"]}
    assert final["digits-mlp-late-sam"]["eigenvalues"][0] < 0.8 * final["digits-mlp-sgd"]["eigenvalues"][0]
    assert final["digits-mlp-late-sam"]["loss"] < 1.05 * final["digits-mlp-sgd"]["loss"]  # as low a loss


def test_late_sam_interpolation_barrier_is_reported_and_tiny():
    """Pre-switch -> final: the path stays below the chord (same valley, barrier 0 on these runs)."""
    r = _json("interpolate", RUNS / "digits-mlp-late-sam" / "step_000200.pt",
              RUNS / "digits-mlp-late-sam" / "step_000400.pt", "--points", "21", "--range", "0,1")
    assert r["barrier"] == pytest.approx(0.0, abs=1e-3)
    assert r["loss"][-1] < r["loss"][0]


# ------------------------------------------------------------------ 3. alignment
def test_gradient_aligned_with_top_space_but_loss_decrease_from_the_bulk():
    d = _json("alignment", RUNS / "digits-mlp-sgd", "--glob", "step_0002*.pt", "--vectors", "full",
              "--eta-grid", "")
    k, n_params = 10, 8970
    chance = math.sqrt(k / n_params)  # chi of a random direction
    for r in d["results"]:
        assert r["chi"]["full"] > 10 * chance  # the gradient lives largely in the top-10 eigenspace ...
        assert r["dL"]["bulk"] < 0 and abs(r["dL"]["bulk"]) > abs(r["dL"]["dom"])  # ... but the bulk lowers the loss
        assert r["dL"]["full"] == pytest.approx(r["dL_pred"]["full"], rel=0.05)


# ------------------------------------------------------------------ 4. the dominant subspace stops moving
def test_dominant_subspace_rotates_early_then_holds():
    r = _json("subspace", RUNS / "digits-mlp-sgd", "--k", "5")
    steps, prev, ov = r["steps"], r["previous"], r["overlap"]
    assert r["chance"] < 1e-3 and steps[3] == 120
    assert all(p < 0.8 for p in prev[1:4])  # steps 40-120: the space still turns
    assert all(p >= 0.97 for p in prev[4:])  # from step 160 on: almost fixed
    assert ov[-1][3] >= 0.85  # step 400 still shares most of step 120's top-5 space
