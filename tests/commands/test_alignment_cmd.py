"""``sam-probe alignment`` against explicit projections with dense float64 eigenvectors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from clitools import run_cli
from sam_probe.core.dense import dense_eigh, dense_hessian
from sam_probe.pipeline import Session, Settings

N = 150
KEYS = {"path", "step", "k", "eigenvalues", "chi", "chi_sq", "dL", "dL_pred", "eta_star", "eta_lambda_max"}


def _objective(path):
    s = Session(Settings(dtype="float64", store=False, max_samples=N))
    return s.objective(s.load(path))


def test_alignment_matches_dense_projection(tiny_runs, out):
    res = run_cli("alignment", tiny_runs["sgd"], "--k", "3", "--eta", "0.2", "--tol", "1e-9", "--eta-grid", "",
                  "--dtype", "float64", "--max-samples", N, "--out", out, "--json")
    assert res.code == 0, res.stderr
    results = res.json()["results"]
    assert [r["step"] for r in results] == [0, 10, 20]
    prev_w = None
    for r in results:
        assert KEYS <= set(r)
        obj = _objective(r["path"])
        H = dense_hessian(obj)
        lam, V = dense_eigh(H, "LA", 3)
        np.testing.assert_allclose(sorted(r["eigenvalues"], reverse=True), lam.tolist(), rtol=1e-7)
        g = obj.grad_flat()
        w = obj.flat_params()
        chi = (V.T @ g).norm() / g.norm()
        assert r["chi"]["full"] == pytest.approx(chi.item(), rel=1e-6)
        assert r["chi_sq"]["full"] == pytest.approx(chi.item() ** 2, rel=1e-6)
        P = V @ V.T
        L0 = obj.loss()
        for name, proj in (("dom", P), ("bulk", torch.eye(len(w), dtype=w.dtype) - P), ("full", None)):
            d = g if proj is None else proj @ g
            assert r["dL"][name] == pytest.approx(obj.loss(w - 0.2 * d) - L0, rel=1e-6, abs=1e-12)
            pred = -0.2 * (g @ d) + 0.02 * (d @ H @ d)
            assert r["dL_pred"][name] == pytest.approx(pred.item(), rel=1e-6, abs=1e-12)
        assert r["eta_lambda_max"] == pytest.approx(0.2 * lam[0].item(), rel=1e-7)
        if prev_w is None:
            assert r["chi"].get("update") is None
        else:
            u = w - prev_w
            assert r["chi"]["update"] == pytest.approx(((V.T @ u).norm() / u.norm()).item(), rel=1e-6)
        prev_w = w
    assert list((out / "plots").glob("alignment__*.png"))


def test_alignment_options_and_defaults(tiny_runs):
    ck = tiny_runs["sam"] / "step_000020.pt"
    res = run_cli("alignment", ck, "--vectors", "full,sam", "--max-samples", N, "--no-store", "--json")
    assert res.code == 0, res.stderr
    r = res.json()["results"][0]
    assert r["k"] == 10  # number of classes of digits
    assert set(r["chi"]) == {"full", "sam"}
    assert r["eta"] == pytest.approx(0.1)  # the checkpoint's learning rate
    assert run_cli("alignment", ck, "--vectors", "full,weird").code == 2


def test_alignment_on_ggn_eigenvectors(tiny_runs, out):
    """``--curvature ggn``: chi_k of the full gradient on the dense GGN's top-k eigenvectors."""
    from test_sharpness_curvature_cmd import dense_ggn_ce

    res = run_cli("alignment", tiny_runs["sam"], "--k", "2", "--curvature", "ggn", "--tol", "1e-9", "--eta-grid", "",
                  "--vectors", "full", "--dtype", "float64", "--max-samples", N, "--out", out, "--json")
    assert res.code == 0, res.stderr
    results = res.json()["results"]
    assert [r["warm_start"] for r in results] == [False, True, True]
    for r in results:
        assert r["curvature"] == "ggn"
        obj = _objective(r["path"])
        lam, V = torch.linalg.eigh(dense_ggn_ce(obj))
        lam, V = lam.flip(0)[:2], V.flip(1)[:, :2]
        np.testing.assert_allclose(sorted(r["eigenvalues"], reverse=True), lam.tolist(), rtol=1e-7)
        g = obj.grad_flat()
        assert r["chi"]["full"] == pytest.approx(((V.T @ g).norm() / g.norm()).item(), rel=1e-6)
