"""``sam-probe report``: every stored analysis rendered from the store only (directory or merged file)."""
from __future__ import annotations

import csv
import io
from pathlib import Path

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
    names = {p.name.split("__")[0] + p.suffix for p in figs.iterdir()}  # <figure>__<runs>__<id>.svg
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


# ---------------------------------------------------------------- settings groups, skipped files, versions, HTML
def _unit(out, name, step, config, version=None, run="runA", step_source="content:step", created="2026-01-01"):
    """A synthetic sharpness unit written with the store's own writer (no computation)."""
    from sam_probe import store

    result = {"path": f"/runs/{run}/step_{step:06d}.pt", "step": step, "loss": 1.0 / (1 + step), "accuracy": 0.5,
              "eigenvalues": [2.0 + step, 1.0], "residuals": [1e-4, 1e-4], "n_hvp": 10, "n_params": 100,
              "source": {"format": "torch-zip", "layout": "lightning", "prefix": "model.", "step_source": step_source}}
    meta = {"analysis": "sharpness", "config": config, "sha256": f"{step:064d}", "checkpoint": result["path"],
            "data_spec": {"data": "digits", "split": "train", "max_samples": None, "seed": 0}, "dtype": "float32",
            "bn_mode": "eval", "model_spec": {"name": "mlp", "args": {}}, "sam_probe_version": "0.1.0",
            "torch_version": "2.13.0", "host": "h", "command": ["sam-probe", "sharpness"], "created": created}
    if version is not None:
        meta["analysis_version"] = version
    return store.write_unit(out / "sharpness" / run / f"{name}.h5", result, meta)


TOP3 = {"top_k": 3, "tol": 1e-3, "rho": 0.05}
TOP5 = {"top_k": 5, "tol": 1e-3, "rho": 0.05}


def test_results_of_different_settings_are_separate_tables_and_runs_are_listed_once(tmp_path):
    out = tmp_path / "res"
    for s in (0, 10):
        _unit(out, f"a{s}", s, TOP3)
        _unit(out, f"b{s}", s, TOP5)  # the same checkpoints, computed with other settings
    res = run_cli("report", out, "--no-plot")
    assert res.code == 0, res.stderr
    assert "settings group 1 of 2 (top_k=3)" in res.stdout and "settings group 2 of 2 (top_k=5)" in res.stdout
    assert "runA/step_" not in res.stdout  # one run, one name (no per-file labels to tell mixed settings apart)
    assert res.stdout.count("runA") == 4 + 1  # 2 rows in each of 2 tables + the checkpoint sources table
    d = run_cli("report", out, "--format", "json", "--no-plot").json()
    assert [g["count"] for g in d["groups"]["sharpness"]] == [2, 2]
    assert sorted(g["settings"]["config"]["top_k"] for g in d["groups"]["sharpness"]) == [3, 5]
    assert all("_meta" not in r for r in d["analyses"]["sharpness"])
    body = run_cli("report", out, "--format", "csv", "--no-plot").stdout.split("\n", 1)[1]
    assert sorted({r["settings.top_k"] for r in csv.DictReader(io.StringIO(body))}) == ["3", "5"]


def test_duplicate_units_are_shown_once(tmp_path):
    out = tmp_path / "res"
    _unit(out, "a", 0, TOP3, created="2026-01-01")
    _unit(out, "copy", 0, TOP3, created="2026-01-02")
    res = run_cli("report", out, "--format", "json", "--no-plot")
    assert len(res.json()["analyses"]["sharpness"]) == 1
    assert "1 duplicate unit shown once" in res.stderr


def test_report_names_every_skipped_file_and_counts_them(tmp_path):
    import h5py

    out = tmp_path / "res"
    good = _unit(out, "a", 0, TOP3)
    _unit(out, "b", 10, TOP3)
    bad = out / "sharpness" / "runA"
    (bad / "corrupt.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00garbage" * 50)
    (bad / "truncated.h5").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with h5py.File(bad / "foreign.h5", "w") as f:
        f["x"] = [1, 2, 3]
    with h5py.File(bad / "noattr.h5", "w") as f:
        f.create_group("result")
    res = run_cli("report", out, "--no-plot")
    assert res.code == 0, res.stderr
    for name in ("corrupt.h5", "truncated.h5", "foreign.h5", "noattr.h5"):
        assert f"skipped sharpness/runA/{name}" in res.stderr, name
    assert "2 units read (1 analysis), 4 files skipped" in res.stderr
    d = run_cli("report", out, "--format", "json", "--no-plot").json()
    assert sorted(Path(s["file"]).name for s in d["skipped"]) == ["corrupt.h5", "foreign.h5", "noattr.h5",
                                                                  "truncated.h5"]


def test_mixed_analysis_versions_warn_and_epoch_steps_say_epoch(tmp_path):
    out = tmp_path / "res"
    _unit(out, "a", 1, TOP3, version="1", step_source="content:epoch")
    _unit(out, "b", 2, TOP3, version="2", step_source="content:epoch")
    res = run_cli("report", out, "--no-plot")
    assert res.code == 0, res.stderr
    assert "different analysis versions (1, 2)" in res.stderr
    assert "settings group 1 of 2 (analysis_version=1)" in res.stdout
    assert "epoch" in res.stdout and "│ step " not in res.stdout
    assert "checkpoint sources" in res.stdout and "lightning" in res.stdout and "model." in res.stdout
    assert "content:epoch" in res.stdout


def _html_refs(text):
    from html.parser import HTMLParser

    class P(HTMLParser):
        def __init__(self):
            super().__init__()
            self.refs, self.tags, self.ids = [], [], []

        def handle_starttag(self, tag, attrs):
            self.tags.append(tag)
            for k, v in attrs:
                if k in ("src", "href", "data", "action", "srcset"):
                    self.refs.append(v or "")
                if k == "id":
                    self.ids.append(v)

    p = P()
    p.feed(text)
    return p


def test_html_report_is_one_self_contained_page(stored, tiny_runs, tmp_path):
    from sam_probe.loading.checkpoints import file_sha256

    target = tmp_path / "page" / "report.html"
    res = run_cli("report", stored, "--no-plot", "--html", target)
    assert res.code == 0, res.stderr
    text = target.read_text()
    p = _html_refs(text)
    assert set(p.ids) >= ANALYSES
    assert "script" not in p.tags and "link" not in p.tags and "iframe" not in p.tags
    assert all(r.startswith("data:") or r.startswith("#") for r in p.refs), [r[:40] for r in p.refs]
    assert sum(r.startswith("data:image/png;base64,") for r in p.refs) >= 11
    assert "http://" not in text and "https://" not in text
    assert file_sha256(tiny_runs["sam"] / "step_000020.pt") in text  # provenance: checkpoints and sha256
    for words in ("sam-probe", "torch", "command lines", "ratio categories", "settings: "):
        assert words in text, words
    assert (target.stat().st_mode & 0o777) == (0o666 & ~_umask())


def _umask():
    import os
    m = os.umask(0)
    os.umask(m)
    return m


def test_html_file_is_optional(stored, tmp_path):
    res = run_cli("report", stored, "-a", "distance", "-o", tmp_path / "a", "--html")
    assert res.code == 0, res.stderr
    assert (tmp_path / "a" / "report.html").is_file() and list((tmp_path / "a").glob("distance__*.png"))
    res = run_cli("report", "--html", stored, "-a", "distance", "--no-plot", "-o", tmp_path / "b")
    assert res.code == 0, res.stderr
    assert (tmp_path / "b" / "report.html").is_file() and not list((tmp_path / "b").glob("distance*.png"))


def test_steps_are_integers_in_features_output(stored, tiny_runs):
    d = run_cli("report", stored, "--format", "json", "--no-plot", "-a", "features").json()
    assert all(isinstance(x["step"], int) for r in d["analyses"]["features"] for x in r["results"])
    res = run_cli("features", tiny_runs["sam"], "--max-samples", N, "--out", stored, "--json", "--no-plot")
    assert res.code == 0, res.stderr
    assert [x["step"] for x in res.json()["results"]] == [0, 10, 20]


def test_a_malformed_unit_warns_and_the_other_tables_still_print(tmp_path):
    from sam_probe import store

    out = tmp_path / "res"
    _unit(out, "a", 0, TOP3)
    store.write_unit(out / "distance" / "runA" / "distance-x.h5", {"run": "/runs/runA", "distance": [1.0]},
                     {"analysis": "distance", "config": {"ref": "0"}})  # no steps: not what distance writes
    res = run_cli("report", out, "--html", tmp_path / "r.html")
    assert res.code == 0, res.stderr
    assert "distance: table failed" in res.stderr and "distance/runA/distance-x.h5" in res.stderr
    assert "sharpness (lanczos, Hessian)" in res.stdout
    assert "distance: plotting failed" in res.stderr
    assert "tables of settings group 1 failed" in (tmp_path / "r.html").read_text()
