"""What every analysis command shares (``sam_probe/commands/runner.py``): progress over all units,
run labels in every output, figure names that never collide, errors in ``--json``, paths checked first."""
from __future__ import annotations

import csv
import io
import shutil
import subprocess
import sys

import pytest

from clitools import run_cli
from sam_probe.report import console

CHEAP = ["--max-samples", "40", "--top-k", "1", "--rho", "0", "--tol", "1e-2"]


@pytest.fixture
def trackers(monkeypatch):
    """Every progress tracker a command opens (the bar itself needs a terminal; the counts do not)."""
    seen = []
    real = console.progress

    def spy(enabled, total=None):
        cm = real(enabled, total)

        class Wrap:
            def __enter__(self):
                t = cm.__enter__()
                seen.append(t)
                return t

            def __exit__(self, *exc):
                return cm.__exit__(*exc)

        return Wrap()

    monkeypatch.setattr(console, "progress", spy)
    return seen


@pytest.mark.parametrize("command,extra,units", [
    ("sharpness", CHEAP, 6),  # 2 runs x 3 checkpoints
    ("distance", [], 2),  # one unit per run
    ("overlap", ["--max-samples", "40"], 8),  # 3 ratio units + 1 overlap unit per run
])
def test_progress_counts_every_unit_of_the_command(tiny_runs, tmp_path, trackers, command, extra, units):
    res = run_cli(command, tiny_runs["sgd"], tiny_runs["sam"], *extra, "--out", tmp_path, "--no-plot")
    assert res.code == 0, res.stderr
    (t,) = trackers
    assert t.total == units and t.done == units
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("[")]
    assert len(lines) == units and lines[-1].startswith(f"[{units}/{units}]")  # logs count across runs
    assert f"{units} units" in res.stderr  # the summary agrees


def test_eta_is_the_mean_time_of_computed_units_and_elapsed_keeps_running():
    class Unit:
        def __init__(self, status):
            self.status = status

    now = [0.0]
    t = console.Tracker(total=10, clock=lambda: now[0])
    assert t.eta_text() == "ETA ?"  # nothing computed yet: no made-up number
    t.finished(Unit("skipped"))  # read back from the store: takes no time to count
    now[0] = 20.0
    t.finished(Unit("ok"))
    now[0] = 40.0
    t.finished(Unit("ok"))
    assert t.done == 3 and t.eta() == pytest.approx(7 * 20.0)
    now[0] = 50.0  # 10 s into the next unit
    assert t.eta() == pytest.approx(7 * 20.0 - 10)
    now[0] = 500.0  # the current unit runs long: the rest still need their time
    assert t.eta() == pytest.approx(6 * 20.0)
    for _ in range(7):
        t.finished(Unit("ok"))
    assert t.eta() == 0.0 and t.done == t.total


def test_an_earlier_command_in_the_process_does_not_rename_the_runs_of_the_next(tiny_runs, tmp_path):
    """Run labels and colours belong to one command: ``--run-name sam`` on one folder, then on another (in
    the same process, as a notebook or a batch worker does), names the second figure ``sam``, not
    ``sam (its folder)`` as if the two runs had to be told apart."""
    first, second = tmp_path / "a" / "run", tmp_path / "b" / "run"
    shutil.copytree(tiny_runs["sam"], first)
    shutil.copytree(tiny_runs["sgd"], second)
    for i, run in enumerate((first, second)):
        out = tmp_path / f"res{i}"
        res = run_cli("sharpness", run, *CHEAP, "--out", out, "--run-name", "sam")
        assert res.code == 0, res.stderr
        assert {p.name.split("__")[1] for p in (out / "plots").glob("sharpness__*.png")} == {"sam"}


def test_run_labels_in_table_json_csv_store_and_figures(tiny_runs, tmp_path):
    """Two Lightning versions are two runs, never one folder called ``checkpoints``."""
    out = tmp_path / "res"
    runs = []
    for v, src in enumerate((tiny_runs["sgd"], tiny_runs["sam"])):
        d = tmp_path / "exp" / "lightning_logs" / f"version_{v}" / "checkpoints"
        shutil.copytree(src, d)
        runs.append(d)
    res = run_cli("sharpness", *runs, *CHEAP, "--out", out, "--json")
    assert res.code == 0, res.stderr
    got = res.json()["results"]
    assert [r["run"] for r in got] == ["version_0/checkpoints"] * 3 + ["version_1/checkpoints"] * 3
    assert got[0]["run_dir"] == str(runs[0])
    assert {p.parent.relative_to(out / "sharpness").as_posix() for p in out.glob("sharpness/**/*.h5")} == \
        {"version_0/checkpoints", "version_1/checkpoints"}
    named = run_cli("sharpness", *runs, *CHEAP, "--out", out, "--run-name", "sgd", "--run-name", "sam")
    assert named.code == 0, named.stderr
    assert "sgd" in named.stdout and "sam" in named.stdout and "version_0" not in named.stdout
    figs = {p.name.split("__")[1] for p in (out / "plots").glob("sharpness__*.png")}
    assert figs == {"version_0-checkpoints+version_1-checkpoints", "sgd+sam"}
    rep = run_cli("report", out, "--format", "csv", "--no-plot")
    rows = list(csv.DictReader(io.StringIO(rep.stdout.split("\n", 1)[1])))
    assert {r["run"] for r in rows} == {"sgd", "sam"}  # the same units, stored again under their names: newest shown
    bad = run_cli("sharpness", *runs, "--run-name", "x/y", "--out", out)
    assert bad.code == 2 and "run name" in bad.stderr


def test_figures_are_named_by_runs_checkpoints_and_settings(tiny_runs, tmp_path):
    out = tmp_path / "res"
    sgd, sam = tiny_runs["sgd"], tiny_runs["sam"]
    assert run_cli("sharpness", sgd, *CHEAP, "--out", out).code == 0
    assert run_cli("sharpness", sam, *CHEAP, "--out", out).code == 0
    assert run_cli("sharpness", sam, *CHEAP, "--out", out).code == 0  # the same figure again: one file
    assert run_cli("sharpness", sam, *CHEAP, "--top-k", "2", "--out", out).code == 0  # other settings
    names = sorted(p.name for p in (out / "plots").glob("sharpness__*.png"))
    assert len(names) == 3 and sum("tiny-sgd" in n for n in names) == 1
    rep = run_cli("report", out, "--html")
    assert rep.code == 0, rep.stderr
    html = (out / "plots" / "report.html").read_text()
    assert len(list((out / "plots").glob("sharpness__*.png"))) == 5  # the report's two groups: new files
    assert not any(n in html for n in names)  # the page embeds its own figures, never a command's


def test_json_failures_carry_an_error_field(tiny_runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_runs["sam"], run)
    (run / "step_000030.pt").write_bytes(b"garbage")
    res = run_cli("distance", run, "--out", tmp_path / "o", "--json")
    assert res.code == 2
    d = res.json()
    assert "step_000030.pt" in d["error"] and d["errors"][0]["path"].endswith("step_000030.pt")
    plain = run_cli("sharpness", run, *CHEAP, "--out", tmp_path / "o")
    assert plain.code == 2 and "4 units, 3 computed, 0 reused from the store, 1 failed" in plain.stderr
    gone = run_cli("sharpness", tmp_path / "nope.pt", "--json")
    assert gone.code == 2 and gone.json() == {"error": f"{tmp_path / 'nope.pt'}: no such file or directory"}


def test_a_missing_path_fails_before_torch_is_imported(tmp_path):
    code = ("import sys\nfrom sam_probe.cli import main\ntry:\n    main(['sharpness', sys.argv[1]])\n"
            "except SystemExit as e:\n    print(e.code, 'torch' in sys.modules)\n")
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "nonexistent.pt")], capture_output=True,
                         text=True, timeout=300)
    assert res.stdout.split() == ["2", "False"], res.stdout + res.stderr
    assert res.stderr.startswith("error:") and "nonexistent.pt: no such file or directory" in res.stderr


def test_verbose_shows_each_units_solver_plan(tiny_runs, tmp_path):
    """``--verbose``: one line per unit with its eigen solve's memory plan (the ``solver`` entry it stores)."""
    ck = sorted(tiny_runs["sgd"].glob("*.pt"))[-1]
    res = run_cli("sharpness", ck, *CHEAP, "--no-plot", "--no-store", "--verbose")
    assert res.code == 0, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if "solver plan:" in ln]
    assert len(lines) == 1 and f"{ck.name}: solver plan: basis_vectors=" in lines[0] and "peak_vectors=" in lines[0]
    assert "solver plan" not in run_cli("sharpness", ck, *CHEAP, "--no-plot", "--no-store").stderr
