"""``sam-probe train`` and ``sam-probe merge`` end to end."""
from __future__ import annotations

import torch

from clitools import run_cli
from sam_probe import store

TINY = ["--model", "mlp", "--model-arg", "in_dim=64", "--model-arg", "hidden=5", "--model-arg", "out_dim=10",
        "--data", "digits", "--max-samples", "50", "--steps", "6", "--checkpoint-every", "3", "--batch-size", "25",
        "--quiet"]


def test_train_writes_analysable_checkpoints(tmp_path):
    run = tmp_path / "late"
    res = run_cli("train", run, *TINY, "--optimizer", "late-sam", "--switch-step", "3", "--rho", "0.1")
    assert res.code == 0, res.stderr
    assert sorted(p.name for p in run.iterdir()) == ["step_000000.pt", "step_000003.pt", "step_000006.pt"]
    ck = torch.load(run / "step_000006.pt", weights_only=True)
    assert ck["step"] == 6 and ck["optimizer"] == "late-sam" and ck["hparams"]["switch_step"] == 3
    assert ck["model_spec"] == {"name": "mlp", "args": {"in_dim": 64, "hidden": 5, "out_dim": 10}}
    # the checkpoint names its model and data: no --model/--data needed
    info = run_cli("inspect", run, "--json").json()["checkpoints"]
    assert [c["step"] for c in info] == [0, 3, 6] and all(c["step_source"] == "content:step" for c in info)
    sharp = run_cli("sharpness", run / "step_000006.pt", "--top-k", "1", "--no-store", "--max-samples", "50", "--json")
    assert sharp.code == 0, sharp.stderr
    assert sharp.json()["results"][0]["eigenvalues"][0] > 0


def test_train_masked_sam_and_bad_optimizer(tmp_path):
    res = run_cli("train", tmp_path / "m", *TINY, "--optimizer", "sam", "--samckpt", "12", "--condition", "2")
    assert res.code == 0, res.stderr
    bad = run_cli("train", tmp_path / "x", *TINY, "--optimizer", "adamw-sam")
    assert bad.code == 2 and bad.stderr.startswith("error:") and "sgd" in bad.stderr


def test_merge_combines_units_readably(tiny_runs, tmp_path):
    out = tmp_path / "res"
    assert run_cli("sharpness", tiny_runs["sgd"], "--top-k", "1", "--rho", "0", "--max-samples", "50",
                   "--out", out, "--no-plot", "--quiet").code == 0
    merged = tmp_path / "all.h5"
    res = run_cli("merge", out, "-o", merged)
    assert res.code == 0 and "merged 3 units" in res.stderr
    units = list(store.iter_units(merged))
    direct = list(store.iter_units(out))
    assert len(units) == len(direct) == 3
    by_step = {r["step"]: r["eigenvalues"] for _, r, _ in direct}
    for _, r, meta in units:
        assert list(r["eigenvalues"]) == list(by_step[r["step"]]) and meta["analysis"] == "sharpness"
    assert run_cli("merge", tmp_path / "nope", "-o", merged).code == 2
