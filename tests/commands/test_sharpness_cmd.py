"""``sam-probe sharpness`` end to end: JSON contract, exactness against a dense Hessian, store reuse."""
from __future__ import annotations

import h5py
import numpy as np
import torch

from clitools import run_cli
from sam_probe.core.dense import dense_eigh, dense_hessian
from sam_probe.core.perturb import sam_sharpness
from sam_probe.pipeline import Session, Settings

KEYS = {"path", "step", "loss", "accuracy", "eigenvalues", "residuals", "n_hvp", "trace", "trace_se",
        "sam_sharpness", "seconds"}


def _objective(path, **kw):
    s = Session(Settings(dtype="float64", store=False, max_samples=200, **kw))
    ck = s.load(path)
    return s.objective(ck)


def test_sharpness_run_directory_json_matches_dense_hessian(tiny_runs, out):
    res = run_cli("sharpness", tiny_runs["sam"], "--top-k", "3", "--tol", "1e-8", "--trace", "--trace-tol", "1e-3",
                  "--dtype", "float64", "--max-samples", "200", "--out", out, "--json")
    assert res.code == 0, res.stderr
    results = res.json()["results"]
    assert [r["step"] for r in results] == [0, 10, 20]
    for r in results:
        assert KEYS <= set(r)
        ev = r["eigenvalues"]
        assert ev == sorted(ev, reverse=True) and len(ev) == 3
        assert max(r["residuals"]) <= 1e-8
        obj = _objective(r["path"])
        H = dense_hessian(obj)
        exact, _ = dense_eigh(H, "LA", 3)
        np.testing.assert_allclose(ev, exact.tolist(), rtol=1e-6)
        tr = torch.trace(H).item()
        assert abs(r["trace"] - tr) <= max(3 * r["trace_se"], 1e-8 * abs(tr))
        assert abs(r["sam_sharpness"] - sam_sharpness(obj, rho=0.05)) < 1e-10
    # every unit stored, with provenance
    files = sorted(out.glob("sharpness/tiny-sam/*.h5"))
    assert len(files) == 3
    with h5py.File(files[0]) as f:
        for attr in ("sam_probe_version", "torch_version", "command", "config", "sha256", "step", "seed", "device"):
            assert attr in f.attrs
    # a second run reads the stored units (no recomputation) and returns the same numbers
    again = run_cli("sharpness", tiny_runs["sam"], "--top-k", "3", "--tol", "1e-8", "--trace", "--trace-tol", "1e-3",
                    "--dtype", "float64", "--max-samples", "200", "--out", out, "--json")
    assert again.code == 0
    assert [r["eigenvalues"] for r in again.json()["results"]] == [r["eigenvalues"] for r in results]


def test_sharpness_negative_end_and_density(tiny_runs, out):
    ck = tiny_runs["sgd"] / "step_000020.pt"
    res = run_cli("sharpness", ck, "--which", "SA", "--top-k", "2", "--tol", "1e-8", "--density", "--rho", "0",
                  "--dtype", "float64", "--max-samples", "200", "--out", out, "--json")
    assert res.code == 0, res.stderr
    r = res.json()["results"][0]
    H = dense_hessian(_objective(ck))
    exact = torch.linalg.eigvalsh(H)[:2]  # SA: from the wanted end, ascending
    np.testing.assert_allclose(r["eigenvalues"], exact.tolist(), rtol=1e-6, atol=1e-10)
    assert r["sam_sharpness"] is None and r["trace"] is None  # same keys whatever was computed
    d = r["density"]
    assert abs(np.trapezoid(d["density"], d["grid"]) - 1) < 1e-3
    assert list((out / "plots").glob("sharpness_density__*.png"))


def test_sharpness_pyhessian_backend_states_limits(tiny_runs, out):
    ck = tiny_runs["sam"] / "step_000020.pt"
    res = run_cli("sharpness", ck, "--backend", "pyhessian", "--top-k", "2", "--max-samples", "100",
                  "--no-store", "--json")
    assert res.code == 0, res.stderr
    r = res.json()["results"][0]
    assert r["backend"] == "pyhessian" and len(r["eigenvalues"]) == 2 and r["limitations"]
    assert all(isinstance(x, float) for x in r["residuals"])


def test_sharpness_does_not_touch_weights_and_reports_bad_files(tiny_runs, tmp_path, out):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_runs["sam"], run)
    (run / "step_000030.pt").write_bytes(b"garbage")
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    res = run_cli("sharpness", run, "--top-k", "1", "--max-samples", "100", "--out", out, "--json")
    assert res.code == 2
    assert [r["step"] for r in res.json()["results"]] == [0, 10, 20]
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "step_000030.pt" in errors[0] and "Traceback" not in res.stderr
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_sharpness_table_and_bad_option(tiny_runs, out):
    res = run_cli("sharpness", tiny_runs["sgd"], "--top-k", "2", "--max-samples", "100", "--out", out)
    assert res.code == 0, res.stderr
    assert "λ1" in res.stdout and "tiny-sgd" in res.stdout
    assert list((out / "plots").glob("sharpness__*.png"))
    bad = run_cli("sharpness", tiny_runs["sgd"], "--which", "XX")
    assert bad.code == 2 and bad.stderr.startswith("error:") and "LA" in bad.stderr


def test_every_shipped_layout_gives_the_same_curvature(tmp_path):
    """Lightning, DDP, compiled, safetensors, Namespace-hparams, legacy and plain files of one model agree."""
    from pathlib import Path

    layouts = Path(__file__).resolve().parents[2] / "sample_runs" / "layouts"
    spec = ["--model", "mlp", "--model-arg", "in_dim=64", "--model-arg", "hidden=64,64", "--model-arg", "out_dim=10",
            "--data", "digits", "--max-samples", "300", "--top-k", "2", "--rho", "0", "--no-store"]
    res = run_cli("sharpness", layouts, *spec, "--json")
    assert res.code == 0, res.stderr
    results = res.json()["results"]
    assert len(results) == 8 and {r["step"] for r in results} == {400}
    for r in results[1:]:
        assert r["loss"] == results[0]["loss"]
        np.testing.assert_allclose(r["eigenvalues"], results[0]["eigenvalues"], rtol=1e-5)
    table = run_cli("sharpness", layouts, *spec)
    assert "layouts/epoch=3-step=400.ckpt" in table.stdout and "layouts/model_400.safetensors" in table.stdout
