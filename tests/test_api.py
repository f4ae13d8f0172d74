"""The notebook API: every export resolves; ``objective`` from a checkpoint path is the CLI's objective."""
from __future__ import annotations

import subprocess
import sys

import torch

import sam_probe as sp
from writers import save_in_layout


def test_every_export_resolves():
    for name in sp.__all__:
        assert getattr(sp, name) is not None, name


def test_import_is_lazy():
    code = "import sys, sam_probe; print('sam_probe.core.lanczos' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_objective_from_ddp_checkpoint_matches_dense(tmp_path):
    torch.manual_seed(0)
    net = sp.build_model("mlp", {"in_dim": 64, "hidden": [5], "out_dim": 10})
    before = {k: v.clone() for k, v in net.state_dict().items()}
    path = save_in_layout(net.state_dict(), tmp_path / "ck.pt", "ddp")
    obj = sp.objective(path, model="mlp", model_args={"in_dim": 64, "hidden": [5], "out_dim": 10},
                       data="digits", max_samples=100, dtype="float64")
    assert obj.n_params == 64 * 5 + 5 + 5 * 10 + 10
    res = sp.top_eigen(obj, k=2, tol=1e-9)
    exact, _ = sp.dense_eigh(sp.dense_hessian(obj), "LA", 2)
    torch.testing.assert_close(torch.tensor(res.eigenvalues, dtype=torch.float64), exact, rtol=1e-7, atol=0)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_analyze_equals_the_command_json(tiny_runs, tmp_path):
    import sam_probe as sp
    from clitools import run_cli

    ck = tiny_runs["sgd"] / "step_000020.pt"
    api = sp.analyze("sharpness", ck, top_k=2, max_samples=40, dtype="float64")
    cli = run_cli("sharpness", ck, "--top-k", "2", "--max-samples", "40", "--dtype", "float64", "--no-store",
                  "--json").json()
    assert api["results"][0]["eigenvalues"] == cli["results"][0]["eigenvalues"]
    assert set(sp.analyses.names()) >= {"sharpness", "ratios", "overlap", "alignment", "distance", "interpolate",
                                        "features", "subspace"}
    import pytest
    from sam_probe.errors import SpecError

    with pytest.raises(SpecError, match="top_kk"):
        sp.analyze("sharpness", ck, top_kk=2)



def test_curvature_api_in_a_notebook():
    """The operator API: GGN eigenvalues, trace and per-layer spectra from an objective, against dense matrices."""
    import pytest

    from sam_probe.core.dense import dense_matrix

    torch.manual_seed(0)
    net = sp.build_model("mlp", {"in_dim": 64, "hidden": [4], "out_dim": 10})
    x, y = torch.randn(30, 64, dtype=torch.float64), torch.randint(0, 10, (30,))
    obj = sp.Objective(net, x, y, "ce", dtype=torch.float64)
    ggn = sp.curvature_operator(obj, "ggn")
    G = dense_matrix(ggn)
    res = sp.top_eigen(ggn, k=2, tol=1e-9)
    torch.testing.assert_close(torch.tensor(sorted(res.eigenvalues, reverse=True), dtype=torch.float64),
                               torch.linalg.eigvalsh(G).flip(0)[:2], rtol=1e-7, atol=0)
    tr = sp.curvature_trace(ggn, "hutch++", tol=1e-3, max_hvp=2000)
    assert abs(tr.estimate - torch.trace(G).item()) <= 4 * tr.se + 1e-9
    H = sp.dense_hessian(obj)
    first = sp.per_layer_spectra(obj, tol=1e-9)[0]  # fc weight block: the leading n x n block of H
    n = first.n_params
    assert first.top_eigenvalue == pytest.approx(torch.linalg.eigvalsh(H[:n, :n])[-1].item(), rel=1e-7)
    ov = sp.subspace_overlap(torch.linalg.eigh(G).eigenvectors[:, -2:], torch.linalg.eigh(H).eigenvectors[:, -2:])
    assert 0 <= ov <= 1


def test_errors_name_settings_as_python_keywords_not_flags(tiny_runs, tmp_path):
    import pytest

    from sam_probe.errors import CheckpointError

    ck = torch.load(tiny_runs["sgd"] / "step_000010.pt", weights_only=True)
    ck["model"] = {k: torch.full_like(v, float("nan")) for k, v in ck["model"].items()}
    torch.save(ck, tmp_path / "nan.pt")
    with pytest.raises(CheckpointError) as e:
        sp.objective(tmp_path / "nan.pt", data="digits", max_samples=20)
    assert "pass allow_nonfinite to continue anyway" in str(e.value) and "--" not in str(e.value)
    assert sp.objective(tmp_path / "nan.pt", data="digits", max_samples=20, allow_nonfinite=True).n_params > 0


def test_analyze_accepts_an_old_option_name_for_a_release(tiny_runs):
    ck = tiny_runs["sgd"] / "step_000020.pt"
    kw = dict(k=1, vectors="full", eta_grid="", max_samples=40, tol=1e-6)
    new = sp.analyze("alignment", ck, step_size=0.3, **kw)["results"][0]
    old = sp.analyze("alignment", ck, eta=0.3, **kw)["results"][0]
    assert new["eta"] == old["eta"] == 0.3 and new["dL"] == old["dL"]
