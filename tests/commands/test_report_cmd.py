"""``sam-probe report``: every stored analysis rendered from the store only (directory or merged file)."""
from __future__ import annotations

import csv
import io

import pytest

from clitools import run_cli

N = "80"


@pytest.fixture(scope="module")
def stored(tiny_runs, tmp_path_factory):
    """Results of every analysis on the tiny runs."""
    out = tmp_path_factory.mktemp("res")
    common = ["--max-samples", N, "--out", out, "--quiet", "--no-plot"]
    sgd, sam = tiny_runs["sgd"], tiny_runs["sam"]
    for args in (["sharpness", sgd, sam, "--top-k", "2", "--density", "--density-steps", "10"],
                 ["ratios", sam], ["overlap", sam], ["alignment", sam, "--k", "2", "--eta-grid", ""],
                 ["distance", sgd, sam], ["interpolate", sgd / "step_000000.pt", sam / "step_000020.pt", "--points", "5"],
                 ["features", sam]):
        res = run_cli(*args, *common)
        assert res.code == 0, (args[0], res.stderr)
    return out


ANALYSES = {"sharpness", "ratios", "overlap", "alignment", "distance", "interpolate", "features"}


def test_report_json_has_every_analysis_and_never_recomputes(stored, monkeypatch):
    import sam_probe.pipeline as pipeline

    monkeypatch.setattr(pipeline.Session, "objective", lambda *a, **k: pytest.fail("report recomputed"))
    res = run_cli("report", stored, "--format", "json", "--no-plot")
    assert res.code == 0, res.stderr
    analyses = res.json()["analyses"]
    assert set(analyses) == ANALYSES
    assert len(analyses["sharpness"]) == 6 and len(analyses["ratios"]) == 3
    assert all("codes" not in r for r in analyses["ratios"])  # packed codes stay in the store
    assert [r["step"] for r in analyses["sharpness"][:3]] == [0, 10, 20]


def test_report_tables_and_figures_from_a_merged_file(stored, tmp_path):
    merged = tmp_path / "all.h5"
    assert run_cli("merge", stored, "-o", merged).code == 0
    figs = tmp_path / "figs"
    res = run_cli("report", merged, "--plot-format", "svg", "-o", figs)
    assert res.code == 0, res.stderr
    for title in ("sharpness", "ratio categories", "overlap of C1", "alignment", "distance", "linear interpolation",
                  "features"):
        assert title in res.stdout, title
    names = {p.name for p in figs.iterdir()}
    for expected in ("sharpness.svg", "sharpness_density.svg", "ratios_categories.svg", "ratios_buckets.svg",
                     "overlap_C1.svg", "overlap_C1_jaccard.svg", "alignment.svg", "distance.svg", "interpolate.svg",
                     "features.svg", "features_heatmaps.svg"):
        assert expected in names, expected


def test_report_csv_and_errors(stored, tmp_path):
    res = run_cli("report", stored, "--format", "csv", "--analysis", "sharpness", "--no-plot")
    assert res.code == 0, res.stderr
    body = res.stdout.split("\n", 1)[1]
    rows = list(csv.DictReader(io.StringIO(body)))
    assert len(rows) == 6 and "eigenvalues[0]" in rows[0] and "loss" in rows[0]
    assert run_cli("report", tmp_path / "nothing").code == 2
    (tmp_path / "empty").mkdir()
    assert run_cli("report", tmp_path / "empty").code == 2
    assert run_cli("report", stored, "--format", "xml").code == 2
