"""``report --compare``: runs of several seeds compared at matched training loss and over the last checkpoints."""
from __future__ import annotations

import pytest

from clitools import run_cli
from conftest import make_run


def test_report_compare_groups_seeds_and_matches_the_loss(tmp_path):
    runs = {f"{opt}-s{seed}": make_run(tmp_path, f"{opt}-s{seed}", opt, seed=seed, steps=20, checkpoint_every=10)
            for opt in ("sgd", "sam") for seed in (0, 1)}
    out = tmp_path / "res"
    for run in runs.values():
        assert run_cli("sharpness", run, "--top-k", "1", "--rho", "0", "--max-samples", "60", "--out", out,
                       "--no-plot", "--quiet").code == 0
    res = run_cli("report", out, "--compare", "--compare-last", "2", "--format", "json", "--no-plot")
    assert res.code == 0, res.stderr
    cmp = res.json()["compare"]
    assert set(cmp["groups"]) == {"sgd", "sam"} and cmp["groups"]["sgd"]["runs"] == ["sgd-s0", "sgd-s1"]
    sharp = res.json()["analyses"]["sharpness"]
    by_run = {}
    for r in sharp:
        by_run.setdefault(r["path"].split("/")[-2], []).append(r)
    lows = {k: min(r["loss"] for r in v) for k, v in by_run.items()}
    assert cmp["level"] == pytest.approx(max(lows.values()))
    for name, rs in by_run.items():
        rs.sort(key=lambda r: r["step"])
        last2 = sum(r["eigenvalues"][0] for r in rs[-2:]) / 2
        assert cmp["runs"][name]["last"]["lambda_max"] == pytest.approx(last2)
    lam = cmp["groups"]["sam"]["last"]["lambda_max"]
    assert lam["n"] == 2 and lam["std"] is not None
    table = run_cli("report", out, "--compare", "--no-plot")
    assert table.code == 0 and "run comparison" in table.stdout and "at loss" in table.stdout
    assert run_cli("report", out, "--compare", "--compare-last", "0", "--no-plot").code == 2
