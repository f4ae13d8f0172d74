"""``sam-probe distance`` and ``sam-probe interpolate`` against direct computation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from clitools import run_cli
from conftest import make_run


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory):
    """A tiny BatchNorm CNN run (3 checkpoints) so buffers are interpolated too."""
    return make_run(tmp_path_factory.mktemp("cnn"), "cnn", "sgd", model="cnn",
                    model_args={"in_channels": 1, "num_classes": 10, "width": 2, "image_size": 8})


def _params(path):
    return {k: v.double() for k, v in torch.load(path, weights_only=True)["model"].items()
            if v.is_floating_point() and not k.endswith(("running_mean", "running_var"))}


def test_distance_json_equals_direct_norms(tiny_runs, out):
    run = tiny_runs["sam"]
    res = run_cli("distance", run, "--ref", "10", "--k", "1", "--out", out, "--json")
    assert res.code == 0, res.stderr
    d = res.json()
    assert {"distance", "relative", "per_tensor", "escape_rate", "steps"} <= set(d)
    states = [_params(run / f"step_{s:06d}.pt") for s in (0, 10, 20)]
    ref = states[1]
    direct = [float(torch.sqrt(sum(((s[n] - ref[n]) ** 2).sum() for n in ref))) for s in states]
    np.testing.assert_allclose(d["distance"], direct, rtol=1e-10)
    ref_norm = float(torch.sqrt(sum((t ** 2).sum() for t in ref.values())))
    np.testing.assert_allclose(d["relative"], np.array(direct) / ref_norm, rtol=1e-10)
    for n in ref:
        np.testing.assert_allclose(d["per_tensor"][n], [float((s[n] - ref[n]).norm()) for s in states], rtol=1e-10)
    assert d["escape_rate"] is None  # one point after the reference: no slope
    # a reference given as a path, and an escape rate equal to the least-squares slope of log d
    res = run_cli("distance", run, "--ref", run / "step_000000.pt", "--no-store", "--json")
    d = res.json()
    slope = np.polyfit([10, 20], np.log(d["distance"][1:]), 1)[0]
    assert d["escape_rate"] == pytest.approx(slope, rel=1e-9)
    assert run_cli("distance", run, "--ref", "7", "--no-store").code == 2


def test_interpolation_endpoints_equal_endpoint_losses(cnn_run, out):
    a, b = cnn_run / "step_000000.pt", cnn_run / "step_000020.pt"
    res = run_cli("interpolate", a, b, "--points", "15", "--range", "0,1.4", "--max-samples", 80, "--dtype", "float64",
                  "--out", out, "--json")
    assert res.code == 0, res.stderr
    d = res.json()
    assert {"alphas", "loss", "accuracy", "barrier"} <= set(d)
    assert len(d["alphas"]) == 15 and d["alphas"][0] == 0 and d["alphas"][-1] == pytest.approx(1.4)
    la = run_cli("sharpness", a, "--top-k", "0", "--rho", "0", "--max-samples", 80, "--dtype", "float64", "--no-store",
                 "--json").json()["results"][0]
    lb = run_cli("sharpness", b, "--top-k", "0", "--rho", "0", "--max-samples", 80, "--dtype", "float64", "--no-store",
                 "--json").json()["results"][0]
    assert d["loss"][0] == pytest.approx(la["loss"], rel=1e-12)
    assert d["accuracy"][0] == pytest.approx(la["accuracy"])
    assert d["loss_b"] == pytest.approx(lb["loss"], rel=1e-12)  # alpha = 1 lies between grid points here
    chord = [(1 - x) * d["loss_a"] + x * d["loss_b"] for x in d["alphas"]]
    inside = [l - c for x, l, c in zip(d["alphas"], d["loss"], chord) if 0 <= x <= 1]
    assert d["barrier"] == pytest.approx(max(0.0, *inside), abs=1e-12)
    assert list((out / "plots").glob("interpolate__*.png"))
    assert run_cli("interpolate", a, b, "--range", "1,0").code == 2
