"""``--tensorboard DIR`` and ``--wandb PROJECT`` on analysis commands: the scalars read back from the
TensorBoard event file and from the W&B offline run equal the stored results; missing packages are one
line and exit 2."""
from __future__ import annotations

import sys

import pytest

from clitools import run_cli
from sam_probe import analyses
from sam_probe.integrations.scalars import points, scalars

COMMON = ("--max-samples", "60", "--no-plot")


def test_scalars_come_from_the_declared_schema():
    sharp = analyses.get("sharpness")
    r = {"run": "a", "path": "x.pt", "step": 40, "loss": 0.5, "accuracy": None, "eigenvalues": [3.0, 2.0],
         "residuals": [1e-7, 2e-7], "converged": [True, True], "trace": float("nan"), "sam_sharpness": 0.01,
         "sam_edge": {"rho": 0.1, "variant": "l2"}, "per_layer": [{"name": "w", "top": 1.0}], "seconds": 3.0,
         "solver": {"vectors": 6}, "not_declared": 1.0, "which": "LA", "gap_warning": False}
    got = {tag: (step, v) for step, tag, v in points(sharp, r)}
    assert got == {"a/sharpness/loss": (40, 0.5), "a/sharpness/eigenvalue_1": (40, 3.0),
                   "a/sharpness/eigenvalue_2": (40, 2.0), "a/sharpness/residual_1": (40, 1e-7),
                   "a/sharpness/residual_2": (40, 2e-7), "a/sharpness/sam_sharpness": (40, 0.01),
                   "a/sharpness/sam_edge.rho": (40, 0.1)}
    ratios = scalars({"fractions": {"A": 0.25, "B": 0.75}, "counts": {"A": 1, "B": 3}, "grad_norm": 2.0})
    assert ratios == {"fractions.A": 0.25, "fractions.B": 0.75, "counts.A": 1.0, "counts.B": 3.0, "grad_norm": 2.0}
    # a run's lists as long as its steps are one value per step; its other scalars at the last step
    dist = analyses.get("distance")
    r = {"run": "b", "steps": [0, 10, 20], "distance": [0.0, 1.5, 2.5], "relative": [None, 0.1, 0.2],
         "escape_rate": 0.3, "n_params": 460, "per_tensor": {"fc.bias": [0.0, 0.5, 1.0]},
         "escape_fit": {"n": 2, "power": {"exponent": 0.5}}}
    assert sorted(points(dist, r)) == sorted([
        (0, "b/distance/distance", 0.0), (10, "b/distance/distance", 1.5), (10, "b/distance/relative", 0.1),
        (20, "b/distance/distance", 2.5), (20, "b/distance/relative", 0.2), (20, "b/distance/escape_rate", 0.3),
        (20, "b/distance/n_params", 460.0), (0, "b/distance/per_tensor.fc.bias", 0.0),
        (10, "b/distance/per_tensor.fc.bias", 0.5), (20, "b/distance/per_tensor.fc.bias", 1.0),
        (20, "b/distance/escape_fit.n", 2.0), (20, "b/distance/escape_fit.power.exponent", 0.5)])


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """No API key anywhere (so --wandb goes offline by itself), no W&B settings from the machine."""
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NETRC", str(tmp_path / "home" / ".netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))


def test_tensorboard_and_wandb_offline_log_the_stored_results(tiny_runs, tmp_path, offline_wandb):
    pytest.importorskip("tensorboard", reason="tensorboard does not install here")
    pytest.importorskip("wandb", reason="wandb does not install here")
    pd = pytest.importorskip("pandas")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import sam_probe as sp
    from wandb_files import config, history, run_name

    out, tb = tmp_path / "results", tmp_path / "tb"
    res = run_cli("sharpness", tiny_runs["sgd"], "--top-k", "2", *COMMON, "--out", out,
                  "--tensorboard", tb, "--wandb", "probe-test", "--json")
    assert res.code == 0, res.stderr
    printed = res.json()["results"]
    stored = sp.load_results(out, "sharpness")
    assert len(printed) == len(stored) == 3
    expected = {}  # (tag, step) -> value, from the store
    for _, row in stored.iterrows():
        for name in ("loss", "accuracy", "eigenvalue_1", "eigenvalue_2", "residual_1", "sam_sharpness"):
            expected[(f"{row.run}/sharpness/{name}", int(row.step))] = float(row[name])
    assert pd.notna(stored.eigenvalue_2).all()

    ea = EventAccumulator(str(tb))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    assert "tiny-sgd/sharpness/eigenvalue_1" in tags and not any("seconds" in t or "/step" in t for t in tags)
    for (tag, step), value in expected.items():
        (event,) = [e for e in ea.Scalars(tag) if e.step == step]
        assert event.value == pytest.approx(value, rel=1e-6)  # event files hold float32
    assert sorted(e.step for e in ea.Scalars("tiny-sgd/sharpness/eigenvalue_1")) == [0, 10, 20]

    (run_dir,) = (out / "wandb").glob("offline-run-*")
    rows = history(run_dir)
    assert [r["_step"] for r in rows] == [0, 10, 20]
    for (tag, step), value in expected.items():
        (row,) = [r for r in rows if r["_step"] == step]
        assert row[tag] == value  # JSON: exact
    assert config(run_dir)["analysis"] == "sharpness" and run_name(run_dir) == "sharpness tiny-sgd"


def test_a_run_level_analysis_logs_its_series_at_each_step(tiny_runs, tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard does not install here")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    res = run_cli("distance", tiny_runs["sam"], "--no-store", "--no-plot", "--tensorboard", tmp_path / "tb", "--json")
    assert res.code == 0, res.stderr
    r = res.json()
    ea = EventAccumulator(str(tmp_path / "tb"))
    ea.Reload()
    got = [(e.step, e.value) for e in ea.Scalars("tiny-sam/distance/distance")]
    assert got == [(s, pytest.approx(d, rel=1e-6, abs=1e-12)) for s, d in zip(r["steps"], r["distance"])]
    name = next(iter(r["per_tensor"]))
    assert len(ea.Scalars(f"tiny-sam/distance/per_tensor.{name}")) == len(r["steps"]) == 3


def test_trackers_are_one_line_errors_when_missing(tiny_runs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "wandb", None)
    for flag, value, pip in (("--tensorboard", tmp_path / "tb", "pip install tensorboard"),
                             ("--wandb", "proj", "pip install wandb")):
        res = run_cli("gradnorm", tiny_runs["sgd"], *COMMON, "--out", tmp_path / "r", flag, value)
        assert res.code == 2 and pip in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert not (tmp_path / "r").exists()  # checked before anything ran
    res = run_cli("gradnorm", tiny_runs["sgd"], *COMMON, "--wandb-offline")
    assert res.code == 2 and "--wandb PROJECT" in res.stderr
