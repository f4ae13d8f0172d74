"""``sam-probe landscape`` end to end on a tiny run: the grid against a direct evaluation of the
checkpoint's loss at the perturbed weights, stored and reused, reproducible by --seed, in ``report``."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import sam_probe as sp
from clitools import run_cli
from sam_probe.core import landscape as core

OPTS = ("--max-samples", "40", "--dtype", "float64", "--grid", "3")


def test_landscape_cli_equals_direct_losses_is_stored_and_seeded(tiny_runs, out):
    ck = sorted(tiny_runs["sam"].glob("*.pt"))[-1]
    res = run_cli("landscape", ck, *OPTS, "--range", "-0.5,0.5", "--seed", "3", "--out", out, "--json")
    assert res.code == 0, res.stderr
    (r,) = res.json()["results"]
    assert r["directions"] == "filter-normalized" and r["alphas"] == [-0.5, 0.0, 0.5]
    assert len(r["loss"]) == 3 and all(len(row) == 3 for row in r["loss"])
    # direct: the same selection, the checkpoint's weights + a d1 + b d2 loaded into a copy of the model
    obj = sp.objective(ck, max_samples=40, dtype="float64", seed=3)
    d1, d2 = core.random_directions(obj.params, "filter-normalized", 3)
    model = copy.deepcopy(obj.model).double().eval()
    for i, a in enumerate(r["alphas"]):
        for j, b in enumerate(r["alphas"]):
            model.load_state_dict({**{k: v + a * d1[k] + b * d2[k] for k, v in obj.params.items()},
                                   **obj.buffers}, strict=True)
            with torch.no_grad():
                direct = F.cross_entropy(model(obj.inputs), obj.targets)
            assert r["loss"][i][j] == pytest.approx(float(direct), rel=1e-10)
    assert r["loss"][1][1] == pytest.approx(r["loss_center"], rel=1e-12)
    assert {p.name.split("__")[0] for p in (out / "plots").glob("*.png")} == {"landscape_contour",
                                                                               "landscape_surface"}
    again = run_cli("landscape", ck, *OPTS, "--range", "-0.5,0.5", "--seed", "3", "--out", out, "--no-plot")
    assert again.code == 0 and "reused" in again.stderr + again.stdout and "loss landscape" in again.stdout
    other = run_cli("landscape", ck, *OPTS, "--range", "-0.5,0.5", "--seed", "4", "--no-store", "--json",
                    "--no-plot")
    assert other.json()["results"][0]["loss"] != r["loss"]  # another seed, other directions
    rep = run_cli("report", out, "--format", "json", "--no-plot")
    assert rep.json()["analyses"]["landscape"][0]["loss"] == r["loss"]


def test_landscape_refuses_bad_options_in_one_line(tiny_runs):
    ck = sorted(tiny_runs["sam"].glob("*.pt"))[-1]
    for args, text in ((("--grid", "2"), "--grid"), (("--directions", "pca"), "--directions"),
                       (("--range", "1,0"), "--range")):
        res = run_cli("landscape", ck, *args, "--no-store")
        assert res.code == 2 and text in res.stderr and res.stderr.strip().count("\n") == 0, res.stderr
