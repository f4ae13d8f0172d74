"""``sam-probe features`` on diagonal linear nets with known coefficients."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from clitools import run_cli

D = 6
DATA = {"n": 16, "d": D, "decay": 0.5, "features": "aligned"}


def _write(run, step, beta):
    u = torch.tensor(beta, dtype=torch.float32).abs().sqrt()
    v = torch.tensor(beta, dtype=torch.float32) / u.clamp_min(1e-20)
    torch.save({"model": {"u": u, "v": v}, "step": step, "model_spec": {"name": "diag-linear", "args": {"in_dim": D, "alpha": 0.1}},
                "hparams": {"data": "synthetic-minor-major", "data_args": DATA, "loss": "bce"}}, run / f"step_{step:06d}.pt")


def test_features_on_known_coefficients(tmp_path):
    run = tmp_path / "diag"
    run.mkdir()
    betas = [[1, 1, 1, 1, 1, 1], [1, 1, 2, 4, 1, 1], [1, 2, 4, 16, 1, 1]]
    for step, beta in zip((0, 5, 10), betas):
        _write(run, step, beta)
    res = run_cli("features", run, "--data-arg", "n=16", "--data-arg", f"d={D}", "--data-arg", "decay=0.5",
                  "--data-arg", "features=aligned", "--out", tmp_path / "res", "--json")
    assert res.code == 0, res.stderr
    d = res.json()
    strength = 0.5 ** np.arange(D)  # aligned features: |x_j| = 2^-j for every sample
    np.testing.assert_allclose(d["strength"], strength, rtol=1e-6)
    rows = d["results"]
    assert [r["step"] for r in rows] == [0, 5, 10]
    minor = [3, 4, 5]  # the weakest half
    for r, beta in zip(rows, betas):
        b = np.abs(beta, dtype=float)
        assert r["minor_mass"] == pytest.approx(b[minor].sum() / b.sum(), rel=1e-5)
        assert r["dominant_index"] == int(np.argmax(b))
    assert rows[0]["dominant_strength_rank"] == 0 and rows[2]["dominant_strength_rank"] == 3
    growth = np.log(np.abs(betas[1], dtype=float)) - np.log(np.abs(betas[0], dtype=float))
    assert rows[0]["spearman_growth_strength"] == pytest.approx(spearmanr(growth, strength).statistic, rel=1e-5)
    assert rows[-1]["spearman_growth_strength"] is None
    assert d["method"] == "coef"
    assert list((tmp_path / "res" / "plots").glob("features__*.png"))


def test_features_images_and_bad_options(tiny_runs, tmp_path):
    res = run_cli("features", tiny_runs["sam"], "--max-samples", 100, "--out", tmp_path / "res", "--json")
    assert res.code == 0, res.stderr
    d = res.json()
    assert d["image_shape"] == [8, 8] and d["method"] == "column-norm"
    assert all(0 <= r["background_mass"] <= 1 for r in d["results"])
    assert list((tmp_path / "res" / "plots").glob("features_heatmaps__*.png"))
    assert run_cli("features", tiny_runs["sam"], "--importance", "magic").code == 2


def test_a_collapsed_run_is_flagged_in_table_json_and_figure(tmp_path):
    """A model whose coefficients shrink to nothing has no dominant feature (not 'feature 0, rank 0')."""
    run = tmp_path / "dying"
    run.mkdir()
    for step, beta in zip((0, 5, 10), ([1, 1, 2, 1, 1, 1], [1e-2, 0, 0, 0, 0, 1e-2], [1e-9, 0, 0, 0, 0, 0])):
        _write(run, step, beta)
    args = ("--data-arg", "n=16", "--data-arg", f"d={D}", "--data-arg", "decay=0.5", "--data-arg", "features=aligned")
    res = run_cli("features", run, *args, "--out", tmp_path / "res", "--json")
    assert res.code == 0, res.stderr
    rows = res.json()["results"]
    assert [r["collapsed"] for r in rows] == [False, False, True]
    assert rows[2]["dominant_index"] is None and rows[2]["dominant_strength_rank"] is None
    assert rows[2]["minor_mass"] is None and rows[1]["spearman_growth_strength"] is None
    table = run_cli("features", run, *args, "--out", tmp_path / "res")
    assert "collapsed: no dominant feature" in table.stdout
    assert list((tmp_path / "res" / "plots").glob("features__*.png"))  # features__<run>__<id>.png
