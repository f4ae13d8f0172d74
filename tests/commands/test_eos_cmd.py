"""Edge of stability in ``sharpness`` and the step size ``alignment`` uses: eta from --lr, the optimizer
state saved beside the weights, or the hyper-parameters."""
from __future__ import annotations

import pytest
import torch

from clitools import run_cli


def _sharp(*args):
    res = run_cli("sharpness", *args, "--top-k", "1", "--rho", "0", "--max-samples", "60", "--dtype", "float64",
                  "--no-store", "--json")
    assert res.code == 0, res.stderr
    return res.json()["results"]


def test_eta_lambda_max_and_the_sam_edge(tiny_runs, tmp_path):
    r = _sharp(tiny_runs["sgd"] / "step_000010.pt")[0]
    assert r["eta"] == 0.1 and r["eta_source"] == "optimizer state (train_state)"
    assert r["eta_lambda_max"] == pytest.approx(0.1 * r["eigenvalues"][0]) and r["lambda_edge"] == pytest.approx(20)
    assert r["sam_edge"] is None  # trained by SGD
    s = _sharp(tiny_runs["sam"] / "step_000010.pt")[0]
    se = s["sam_edge"]
    assert se["variant"] == "l2" and se["rho"] == 0.05 and se["grad_norm"] > 0
    lam, g = s["eigenvalues"][0], se["grad_norm"]
    assert se["eta_lambda_eff"] == pytest.approx(0.1 * lam * (1 + 0.05 * lam / g))
    assert se["lambda_edge"] < 20
    assert _sharp(tiny_runs["sgd"] / "step_000010.pt", "--lr", "0.5")[0]["eta_source"] == "--lr"
    # a torch optimizer state saved beside the weights; and plain hyper-parameters
    ck = torch.load(tiny_runs["sgd"] / "step_000010.pt", weights_only=True)
    torch.save({"model": ck["model"], "step": 10, "model_spec": ck["model_spec"], "hparams": {"data": "digits"},
                "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 0.03, "momentum": 0.9}]}},
               tmp_path / "opt.pt")
    o = _sharp(tmp_path / "opt.pt")[0]
    assert o["eta"] == 0.03 and o["eta_source"] == "optimizer state (optimizer_state_dict)"
    torch.save({"model": ck["model"], "step": 10, "model_spec": ck["model_spec"],
                "hparams": {"data": "digits", "learning_rate": 0.2}}, tmp_path / "hp.pt")
    h = _sharp(tmp_path / "hp.pt")[0]
    assert h["eta"] == 0.2 and h["eta_source"] == "hyper-parameters (learning_rate)"
    torch.save({"model": ck["model"], "model_spec": ck["model_spec"], "hparams": {"data": "digits"}},
               tmp_path / "none.pt")
    n = _sharp(tmp_path / "none.pt")[0]
    assert n["eta"] is None and n["eta_lambda_max"] is None and n["sam_edge"] is None
    al = run_cli("alignment", tmp_path / "opt.pt", "--k", "2", "--vectors", "full", "--eta-grid", "", "--max-samples",
                 "60", "--no-store", "--json")
    assert al.code == 0, al.stderr
    assert al.json()["results"][0]["eta"] == 0.03 and al.json()["results"][0]["eta_source"].startswith("optimizer")
