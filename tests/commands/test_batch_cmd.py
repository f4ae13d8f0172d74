"""``sam-probe batch``: specs, summary, exit codes, resuming; and the shipped sample spec end to end."""
from __future__ import annotations

from pathlib import Path

from clitools import run_cli
from sam_probe import store

ROOT = Path(__file__).resolve().parents[2]


def _spec(path: Path, body: str) -> Path:
    path.write_text(body)
    return path


def test_batch_runs_resumes_and_summarises(tiny_runs, tmp_path):
    spec = _spec(tmp_path / "spec.toml", f'''
out = "res"
runs = ["{tiny_runs['sgd']}", "{tiny_runs['sam']}"]
[defaults]
max-samples = 60
[[analysis]]
command = "sharpness"
top-k = 1
[[analysis]]
command = "ratios"
runs = ["{tiny_runs['sam']}/step_0000[12]0.pt"]
''')
    res = run_cli("batch", spec, "--jobs", "2", "--json")
    assert res.code == 0, res.stderr
    d = res.json()
    assert d["counts"] == {"ok": 8, "skipped": 0, "failed": 0} and d["exit_code"] == 0
    assert {(u["analysis"], u["step"]) for u in d["units"]} >= {("sharpness", 0), ("ratios", 10), ("ratios", 20)}
    assert len(list(store.iter_units(tmp_path / "res"))) == 8
    again = run_cli("batch", spec, "--json")
    assert again.code == 0 and again.json()["counts"] == {"ok": 0, "skipped": 8, "failed": 0}
    table = run_cli("batch", spec)
    assert "0 ok, 8 skipped (already stored), 0 failed" in table.stdout


def test_batch_spec_errors_are_one_line(tmp_path, tiny_runs):
    bad = _spec(tmp_path / "bad.toml", '[[analysis]]\ncommand = "sharpnes"\nruns = ["x"]\n')
    res = run_cli("batch", bad)
    assert res.code == 2 and "sharpness" in res.stderr and "Traceback" not in res.stderr
    missing = _spec(tmp_path / "m.toml", '[[analysis]]\ncommand = "ratios"\nruns = ["nope-*"]\n')
    assert "matches nothing" in run_cli("batch", missing).stderr
    assert run_cli("batch", tmp_path / "absent.toml").code == 2
    broken = _spec(tmp_path / "b.toml", "[[analysis]\n")
    assert "not valid TOML" in run_cli("batch", broken).stderr


def test_shipped_sample_spec_and_report(tmp_path):
    """The README's batch: every unit ok, then `report` makes every figure."""
    out = tmp_path / "res"
    res = run_cli("batch", ROOT / "sample_runs" / "batch.toml", "--out", out, "--jobs", "2", "--json")
    assert res.code == 0, res.stdout[-2000:] + res.stderr
    d = res.json()
    assert d["counts"]["failed"] == 0 and d["counts"]["ok"] > 50
    rep = run_cli("report", out, "-o", tmp_path / "figs")
    assert rep.code == 0, rep.stderr
    names = {p.stem for p in (tmp_path / "figs").glob("*.png")}
    assert names >= {"sharpness", "sharpness_density", "ratios_categories", "ratios_buckets", "overlap_C1",
                     "overlap_C1_jaccard", "alignment", "distance", "interpolate", "features"}
