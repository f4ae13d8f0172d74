"""``sam-probe gradnorm`` end to end on the tiny runs: numbers against a direct autograd gradient,
stored and reused, in ``report``, ``batch`` and :func:`sam_probe.analyze`."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import sam_probe as sp
from clitools import run_cli

OPTS = ("--max-samples", "40", "--dtype", "float64")


def _direct(path):
    """||grad L|| and L of the checkpoint by one plain forward/backward (data: the same selection)."""
    obj = sp.objective(path, max_samples=40, dtype="float64")
    model = copy.deepcopy(obj.model).double().eval()
    state = torch.load(path, weights_only=True)["model"]
    model.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in state.items()})
    loss = F.cross_entropy(model(obj.inputs), obj.targets)
    grads = dict(zip([n for n, _ in model.named_parameters()], torch.autograd.grad(loss, list(model.parameters()))))
    return float(loss.detach()), grads


def test_gradnorm_json_equals_direct_gradient_and_is_reused(tiny_runs, out):
    run = tiny_runs["sgd"]
    res = run_cli("gradnorm", run, *OPTS, "--out", out, "--json")
    assert res.code == 0, res.stderr
    results = res.json()["results"]
    assert [r["step"] for r in results] == [0, 10, 20]
    for r in results:
        loss, grads = _direct(r["path"])
        assert r["loss"] == pytest.approx(loss, rel=1e-10)
        total = float(torch.sqrt(sum((g ** 2).sum() for g in grads.values())))
        assert r["grad_norm"] == pytest.approx(total, rel=1e-10)
        assert {p["name"]: p["norm"] for p in r["per_tensor"]} == pytest.approx(
            {n: float(g.norm()) for n, g in grads.items()}, rel=1e-10)
        assert r["n_params"] == sum(p["n_params"] for p in r["per_tensor"]) == 460
    # stored: a second call reads the units back, same numbers
    assert {p.name.split("__")[0] for p in (out / "plots").glob("*.png")} == {"gradnorm", "gradnorm_modules"}
    again = run_cli("gradnorm", run, *OPTS, "--out", out, "--json", "--no-plot")
    assert [r["grad_norm"] for r in again.json()["results"]] == [r["grad_norm"] for r in results]
    shown = run_cli("gradnorm", run, *OPTS, "--out", out, "--per-layer", "module", "--no-plot")
    assert shown.code == 0 and "reused" in shown.stderr + shown.stdout
    assert "gradient norm" in shown.stdout and "net.0" in shown.stdout
    # report: the stored units, read back
    rep = run_cli("report", out, "--format", "json", "--no-plot")
    assert [r["grad_norm"] for r in rep.json()["analyses"]["gradnorm"]] == pytest.approx(
        [r["grad_norm"] for r in results])


def test_gradnorm_in_the_python_api(tiny_runs):
    api = sp.analyze("gradnorm", tiny_runs["sam"], max_samples=40, dtype="float64")
    assert [r["step"] for r in api["results"]] == [0, 10, 20]
    _, grads = _direct(api["results"][-1]["path"])
    assert api["results"][-1]["grad_norm"] == pytest.approx(
        float(torch.sqrt(sum((g ** 2).sum() for g in grads.values()))), rel=1e-10)


@pytest.mark.slow  # a batch worker process
def test_gradnorm_in_batch(tiny_runs, tmp_path):
    spec = tmp_path / "spec.toml"
    spec.write_text(f'out = "{tmp_path / "res"}"\nruns = ["{tiny_runs["sam"]}"]\n[defaults]\nmax-samples = 40\n'
                    'dtype = "float64"\n[[analysis]]\ncommand = "gradnorm"\n')
    res = run_cli("batch", spec, "--json")
    assert res.code == 0, res.stderr
    assert res.json()["counts"]["ok"] == 3
    assert {u["analysis"] for u in res.json()["units"]} == {"gradnorm"}
