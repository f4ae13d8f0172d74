"""``sam-probe subspace`` end to end: overlaps against dense eigenvectors, stored compressed
eigenvectors, warm starts that change cost only, several runs, the report's figures."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from clitools import run_cli
from sam_probe import store
from sam_probe.core.dense import dense_eigh, dense_hessian
from sam_probe.pipeline import Session, Settings

COMMON = ("--dtype", "float64", "--max-samples", "200")


def _dense_bases(run, k):
    s = Session(Settings(dtype="float64", store=False, max_samples=200))
    bases, evals = [], []
    for ck in sorted(run.glob("step_*.pt")):
        H = dense_hessian(s.objective(s.load(ck)))
        vals, vecs = dense_eigh(H, "LA", k)
        bases.append(vecs)
        evals.append(vals)
    return bases, evals


def test_subspace_overlaps_match_dense_eigenvectors(tiny_runs, out):
    run = tiny_runs["sam"]
    res = run_cli("subspace", run, "--k", "3", "--tol", "1e-8", *COMMON, "--out", out, "--json")
    assert res.code == 0, res.stderr
    r = res.json()
    assert {"steps", "k", "overlap", "chance", "eigenvalues"} <= set(r)
    assert "eigenvectors" not in r  # stored, never printed
    assert r["steps"] == [0, 10, 20] and r["k"] == 3 and r["curvature"] == "hessian"
    bases, evals = _dense_bases(run, 3)
    P = bases[0].shape[0]
    assert r["chance"] == pytest.approx(3 / P)
    exact = [[float((A.T @ B).pow(2).sum()) / 3 for B in bases] for A in bases]
    np.testing.assert_allclose(r["overlap"], exact, atol=1e-7)
    for got, want in zip(r["eigenvalues"], evals):
        np.testing.assert_allclose(sorted(got, reverse=True), want.tolist(), rtol=1e-7)
    assert r["previous"][0] is None
    assert r["previous"][1:] == pytest.approx([exact[1][0], exact[2][1]], abs=1e-7)
    # the unit holds every checkpoint's eigenvectors, float16 and compressed, spanning the dense subspace
    (unit,) = out.glob("subspace/tiny-sam/*.h5")
    stored, _ = store.read_unit(unit)
    V = stored["eigenvectors"]
    assert V.dtype == np.float16 and V.shape == (3, P, 3)
    for t, B in enumerate(bases):
        Q, _ = torch.linalg.qr(torch.from_numpy(V[t].astype(np.float64)))
        assert float((Q.T @ B).pow(2).sum()) / 3 == pytest.approx(1.0, abs=1e-3)
    # a second run reads the unit back
    again = run_cli("subspace", run, "--k", "3", "--tol", "1e-8", *COMMON, "--out", out, "--json")
    assert again.code == 0 and again.json()["overlap"] == r["overlap"]


def test_subspace_warm_start_changes_cost_not_results(tiny_runs, tmp_path):
    run = tiny_runs["sgd"]
    args = ("subspace", run, "--k", "3", "--tol", "1e-8", *COMMON, "--json")
    warm = run_cli(*args, "--out", tmp_path / "w").json()
    cold = run_cli(*args, "--no-warm-start", "--out", tmp_path / "c").json()
    assert warm["warm_start"] is True and cold["warm_start"] is False
    np.testing.assert_allclose(warm["overlap"], cold["overlap"], atol=1e-6)
    assert len(warm["n_hvp"]) == 3 and warm["n_hvp"][0] == cold["n_hvp"][0]


def test_subspace_several_runs_and_ggn(tiny_runs, out):
    res = run_cli("subspace", tiny_runs["sgd"], tiny_runs["sam"], "--k", "2", "--curvature", "ggn",
                  "--no-save-vectors", *COMMON, "--out", out, "--json")
    assert res.code == 0, res.stderr
    runs = res.json()["runs"]
    assert len(runs) == 2 and all(r["curvature"] == "ggn" for r in runs)
    for r in runs:
        m = np.array(r["overlap"])
        assert np.allclose(np.diag(m), 1.0, atol=1e-6) and np.allclose(m, m.T)
        assert ((m >= -1e-9) & (m <= 1 + 1e-9)).all()
        assert all(min(e) >= -1e-8 for e in r["eigenvalues"])  # the GGN is PSD
    units = sorted(out.glob("subspace/*/*.h5"))
    assert len(units) == 2 and all("eigenvectors" not in store.read_unit(u)[0] for u in units)


def test_subspace_k_too_large_is_one_line(tiny_runs, out):
    res = run_cli("subspace", tiny_runs["sam"], "--k", "100000", "--out", out)
    assert res.code == 2
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--k 100000 must be below the parameter count 460" in errors[0]


def test_report_renders_subspace(tiny_runs, out, tmp_path):
    assert run_cli("subspace", tiny_runs["sam"], "--k", "2", "--out", out).code == 0
    res = run_cli("report", out, "--output", tmp_path / "plots")
    assert res.code == 0, res.stderr
    assert "eigenspace overlap" in res.stdout
    assert len(list((tmp_path / "plots").glob("subspace__*.png"))) == 1
    assert len(list((tmp_path / "plots").glob("subspace_overlap__*.png"))) == 1
