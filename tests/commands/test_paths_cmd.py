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


def test_distance_escape_diagnostics(tiny_runs, tmp_path):
    """--same-step: distance to another run at the same step; --eigen-k: displacement share in the
    reference's top-k Hessian eigenspace (against a dense Hessian); escape fits."""
    from sam_probe.core.objective import Objective
    from sam_probe.loading.data import load_data
    from sam_probe.loading.models import build_model

    sam, sgd = tiny_runs["sam"], tiny_runs["sgd"]
    res = run_cli("distance", sam, "--ref", "0", "--same-step", sgd, "--eigen-k", "3", "--eigen-tol", "1e-8",
                  "--max-samples", "60", "--dtype", "float64", "--no-store", "--json")
    assert res.code == 0, res.stderr
    d = res.json()
    a, b = (_params(sam / "step_000020.pt"), _params(sgd / "step_000020.pt"))
    direct = float(torch.sqrt(sum(((a[k] - b[k]) ** 2).sum() for k in a)))
    assert d["same_step"]["steps"] == [0, 10, 20] and d["same_step"]["distance"][2] == pytest.approx(direct, rel=1e-12)
    assert d["same_step"]["distance"][0] == 0  # same init
    fit = d["escape_fit"]
    assert set(fit) == {"n", "exponential", "power", "better"} and fit["n"] == 2 and fit["better"] is None
    ck = torch.load(sam / "step_000000.pt", weights_only=True)
    net = build_model("mlp", ck["model_spec"]["args"]).double()
    net.load_state_dict(ck["model"])
    data = load_data("digits", max_samples=60, seed=0)
    obj = Objective(net, data.inputs, data.targets, "ce", dtype=torch.float64)
    P = obj.n_params
    H = torch.stack([obj.hvp(torch.eye(P, dtype=torch.float64)[i]) for i in range(P)])
    U = torch.linalg.eigh((H + H.T) / 2).eigenvectors[:, -3:]
    w0 = obj.space.flatten(_params(sam / "step_000000.pt"))
    dw = obj.space.flatten(_params(sam / "step_000020.pt")) - w0
    share = float((U.T @ dw).pow(2).sum() / (dw @ dw))
    tk = d["top_k_share"]
    assert tk["k"] == 3 and tk["chance"] == pytest.approx(3 / P) and tk["share"][0] is None
    assert tk["share"][2] == pytest.approx(share, rel=1e-6)


def test_distance_streams_checkpoints(tiny_runs, monkeypatch):
    """Issue 20 item 6: ``distance`` holds at most the reference and one other checkpoint at a time
    (with --eigen-k and --same-step too), and its numbers are those of all states at once.  Every
    checkpoint ``Session.load`` returns is followed by weak references to it and its tensors; at each
    load the earlier ones still alive are counted.  (Ordering a run may keep up to 256 MB of it loaded
    to read it once; that cache is switched off here so the count is the analysis's own.)"""
    import gc
    import weakref

    from sam_probe.core.paths import distance, same_step_distance
    from sam_probe.pipeline import session as session_mod
    from sam_probe.pipeline import units

    monkeypatch.setattr(units, "KEEP_LOADED_BYTES", 0)
    alive: list[list] = []
    peak = [0]
    load = session_mod.Session.load

    def counted(self, path):
        gc.collect()
        live = sum(1 for refs in alive if any(r() is not None for r in refs))
        ck = load(self, path)
        alive.append([weakref.ref(ck)] + [weakref.ref(t) for t in ck.state.values()])
        peak[0] = max(peak[0], live + 1)
        return ck

    monkeypatch.setattr(session_mod.Session, "load", counted)
    sam, sgd = tiny_runs["sam"], tiny_runs["sgd"]
    res = run_cli("distance", sam, "--ref", "10", "--same-step", sgd, "--eigen-k", "2", "--max-samples", "40",
                  "--dtype", "float64", "--no-store", "--json")
    assert res.code == 0, res.stderr
    assert len(alive) >= 9 and peak[0] <= 2, (len(alive), peak[0])
    d = res.json()
    states = [_params(sam / f"step_{s:06d}.pt") for s in (0, 10, 20)]
    whole = distance(states, 1, steps=[0, 10, 20], k=5).to_dict()
    for key in ("distance", "relative", "per_tensor", "escape_rate", "escape_fit", "ref_norm"):
        assert d[key] == whole[key], key
    other = same_step_distance(states, [0, 10, 20], [_params(sgd / f"step_{s:06d}.pt") for s in (0, 10, 20)],
                               [0, 10, 20])
    assert d["same_step"]["distance"] == other["distance"]
    assert d["top_k_share"]["share"][1] is None and len(d["top_k_share"]["share"]) == 3
