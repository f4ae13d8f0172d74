"""``sam-probe sharpness`` beyond the Hessian, end to end: ``--curvature``, ``--per-layer``,
``--worst-case`` / ``--average-case`` and warm starts across a run, each against an exact answer."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.func import functional_call, jacrev

from clitools import run_cli
from sam_probe.core.dense import dense_hessian
from sam_probe.core.perturb import sam_sharpness
from sam_probe.pipeline import Session, Settings

COMMON = ("--dtype", "float64", "--max-samples", "200")


def _objective(path, n=200):
    s = Session(Settings(dtype="float64", store=False, max_samples=n))
    return s.objective(s.load(path))


def dense_ggn_ce(obj) -> torch.Tensor:
    """(1/N) sum_i J_i' (diag(p_i) - p_i p_i') J_i from full Jacobians: independent of the operator code."""
    names = obj.space.names
    G = torch.zeros(obj.n_params, obj.n_params, dtype=torch.float64)
    with obj.mode():
        for x, _ in obj.chunks():
            def f(p):
                return functional_call(obj.model, (p, obj.buffers), (x,))

            J = jacrev(f)(obj.params)
            B, C = f(obj.params).shape
            J = torch.cat([J[k].reshape(B, C, -1) for k in names], 2)  # [B, C, P]
            p = torch.softmax(f(obj.params).detach(), 1)
            Hl = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
            G += torch.einsum("bcp,bcd,bdq->pq", J, Hl, J)
    return G / obj.n_samples


def test_ggn_eigenvalues_match_dense_jacobian_ggn(tiny_runs, out):
    ck = tiny_runs["sam"] / "step_000020.pt"
    res = run_cli("sharpness", ck, "--curvature", "ggn", "--top-k", "3", "--tol", "1e-8", "--trace", "--rho", "0",
                  *COMMON, "--out", out, "--json")
    assert res.code == 0, res.stderr
    r = res.json()["results"][0]
    assert r["curvature"] == "ggn"
    G = dense_ggn_ce(_objective(ck))
    exact = torch.linalg.eigvalsh(G).flip(0)[:3]
    np.testing.assert_allclose(r["eigenvalues"], exact.tolist(), rtol=1e-6)
    assert max(r["residuals"]) <= 1e-8
    tr = torch.trace(G).item()
    assert abs(r["trace"] - tr) <= max(4 * r["trace_se"], 1e-8 * tr)
    assert r["total_products"] > 0
    # the GGN of a ReLU net with CE is PSD and differs from the Hessian (here the Hessian's top pair is larger or equal)
    H = dense_hessian(_objective(ck))
    assert not torch.allclose(G, H, atol=1e-6)


def test_empirical_fisher_eigenvalues_match_per_sample_gradients(tiny_runs, out):
    ck = tiny_runs["sgd"] / "step_000010.pt"
    res = run_cli("sharpness", ck, "--curvature", "ef", "--top-k", "2", "--tol", "1e-8", "--rho", "0",
                  *COMMON, "--out", out, "--json")
    assert res.code == 0, res.stderr
    r = res.json()["results"][0]
    obj = _objective(ck)
    rows = []
    with obj.mode():
        for x, y in obj.chunks():
            for i in range(x.shape[0]):
                def loss(p, i=i):
                    o = functional_call(obj.model, (p, obj.buffers), (x[i:i + 1],))
                    return torch.nn.functional.cross_entropy(o, y[i:i + 1])

                g = torch.func.grad(loss)(obj.params)
                rows.append(torch.cat([g[k].reshape(-1) for k in obj.space.names]))
    Gs = torch.stack(rows)
    EF = Gs.T @ Gs / Gs.shape[0]
    exact = torch.linalg.eigvalsh(EF).flip(0)[:2]
    assert r["curvature"] == "ef"
    np.testing.assert_allclose(r["eigenvalues"], exact.tolist(), rtol=1e-6)


@pytest.mark.parametrize("by", ["tensor", "module"])
def test_per_layer_json_matches_dense_blocks(tiny_runs, out, by):
    ck = tiny_runs["sam"] / "step_000010.pt"
    args = ["--per-layer"] + ([] if by == "tensor" else ["module"])  # bare --per-layer means tensor
    res = run_cli("sharpness", *args, ck, "--top-k", "1", "--tol", "1e-8", "--rho", "0", *COMMON,
                  "--out", out, "--json")
    assert res.code == 0, res.stderr
    r = res.json()["results"][0]
    rows = r["per_layer"]
    assert r["per_layer_by"] == by
    obj = _objective(ck)
    H = dense_hessian(obj)
    names = obj.space.names
    sizes = [obj.params[n].numel() for n in names]
    offsets = dict(zip(names, np.cumsum([0] + sizes[:-1]).tolist()))
    groups = {n: [n] for n in names} if by == "tensor" else {}
    if by == "module":
        for n in names:
            groups.setdefault(n.rsplit(".", 1)[0], []).append(n)
    assert [row["name"] for row in rows] == list(groups)
    for row in rows:
        assert {"name", "top_eigenvalue", "residual", "trace", "trace_se", "n_params"} <= set(row)
        idx = torch.cat([torch.arange(offsets[n], offsets[n] + obj.params[n].numel()) for n in groups[row["name"]]])
        B = H[idx][:, idx]
        assert row["n_params"] == len(idx)
        lam = torch.linalg.eigvalsh(B)[-1].item()
        assert abs(row["top_eigenvalue"] - lam) <= 1e-6 * max(abs(lam), 1e-8) + 1e-10
        assert row["residual"] <= 1e-8 or abs(lam) < 1e-10
        assert abs(row["trace"] - torch.trace(B).item()) <= max(4 * row["trace_se"], 1e-8 * abs(torch.trace(B).item())) + 1e-12
    # without --per-layer the key is present and null (same JSON keys every time)
    plain = run_cli("sharpness", ck, "--top-k", "1", "--rho", "0", *COMMON, "--out", out, "--json").json()
    assert plain["results"][0]["per_layer"] is None


def test_worst_and_average_case_sharpness(tiny_runs, out):
    ck = tiny_runs["sam"] / "step_000020.pt"
    res = run_cli("sharpness", ck, "--top-k", "0", "--rho", "0.1", "--worst-case", "--ascent-steps", "10",
                  "--average-case", "--samples", "8", *COMMON, "--out", out, "--json")
    assert res.code == 0, res.stderr
    r = res.json()["results"][0]
    for key in ("sam_sharpness", "worst_case_sharpness", "worst_case_steps", "average_case_sharpness",
                "average_case_se"):
        assert r[key] is not None, key
    obj = _objective(ck)
    one_step = sam_sharpness(obj, rho=0.1)
    assert abs(r["sam_sharpness"] - one_step) < 1e-10
    # ascent starts at the SAM point and only keeps improvements: never below the one-step value
    assert r["worst_case_sharpness"] >= one_step - 1e-12
    assert 1 <= r["worst_case_steps"] <= 10
    assert r["worst_case_delta_norm"] <= 0.1 * (1 + 1e-9)
    # random directions of the same radius are far less harmful than the worst one
    assert r["average_case_sharpness"] < r["worst_case_sharpness"]
    assert r["average_case_se"] > 0
    # independent re-computation of one achieved value: L(w + e) - L(w) at the reported norm bound is a lower bound
    plain = run_cli("sharpness", ck, "--top-k", "0", "--rho", "0.1", *COMMON, "--out", out, "--json").json()
    r0 = plain["results"][0]
    assert r0["worst_case_sharpness"] is None and r0["average_case_sharpness"] is None


def test_worst_case_needs_a_radius(tiny_runs, out):
    res = run_cli("sharpness", tiny_runs["sam"] / "step_000020.pt", "--rho", "0", "--worst-case", "--out", out)
    assert res.code == 2
    assert "--rho" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_warm_start_same_eigenvalues_fewer_or_equal_hvps_and_deterministic(tiny_runs, tmp_path):
    run = tiny_runs["sgd"]
    args = ("sharpness", run, "--top-k", "3", "--tol", "1e-6", "--rho", "0", *COMMON, "--json")
    cold = run_cli(*args, "--no-warm-start", "--out", tmp_path / "cold").json()["results"]
    warm = run_cli(*args, "--cold-check", "--out", tmp_path / "warm").json()["results"]
    again = run_cli(*args, "--cold-check", "--out", tmp_path / "again").json()["results"]
    assert [r["warm_start"] for r in cold] == [False, False, False]
    assert [r["warm_start"] for r in warm] == [False, True, True]
    assert [r.get("warm_start_from") for r in warm] == [None, 0, 10]
    for c, w in zip(cold, warm):
        np.testing.assert_allclose(w["eigenvalues"], c["eigenvalues"], rtol=1e-5)
        assert max(w["residuals"]) <= 1e-6
    for w in warm[1:]:
        assert w["n_hvp_saved"] == w["n_hvp_cold"] - w["n_hvp"]
        assert w["n_hvp_cold"] == next(c for c in cold if c["step"] == w["step"])["n_hvp"]
    # seeded: the same HVP counts every time
    assert [r["n_hvp"] for r in again] == [r["n_hvp"] for r in warm]
    # warm starts change cost, not results: a cold re-run in the warm store reuses every unit
    plain = run_cli(*args, "--out", tmp_path / "plain").json()["results"]
    reuse = run_cli(*args, "--no-warm-start", "--out", tmp_path / "plain")
    assert reuse.code == 0 and [r["eigenvalues"] for r in reuse.json()["results"]] == [r["eigenvalues"] for r in plain]
    assert [r["warm_start"] for r in reuse.json()["results"]] == [False, True, True]  # the stored (warm) units


def test_no_order_check_certifies_residuals_only_and_keeps_default_unit_keys(tiny_runs, tmp_path):
    """``--no-order-check``: the same eigenvalues in fewer products, ``order_checked`` false with a
    warning; the default (the check on) leaves the config, so units stored before the option are reused."""
    from sam_probe import analyses
    from sam_probe.settings import Settings as Plain

    ck = tiny_runs["sgd"] / "step_000010.pt"
    args = ("sharpness", ck, "--top-k", "3", "--tol", "1e-6", "--rho", "0", *COMMON, "--json")
    full = run_cli(*args, "--out", tmp_path / "a")
    lean = run_cli(*args, "--no-order-check", "--out", tmp_path / "a")
    assert full.code == 0 and lean.code == 0, (full.stderr, lean.stderr)
    f, g = full.json()["results"][0], lean.json()["results"][0]
    assert f["order_checked"] is True and g["order_checked"] is False
    np.testing.assert_allclose(g["eigenvalues"], f["eigenvalues"], rtol=1e-5)
    assert max(g["residuals"]) <= 1e-6 and g["n_hvp"] < f["n_hvp"]
    assert any("not checked" in w for w in g.get("warnings", [])), g.get("warnings")
    impl = analyses.get("sharpness").impl
    opts = {o.name: o.default for o in analyses.get("sharpness").compute_options()}
    assert "order_check" not in impl.configure(dict(opts), Plain())
    assert impl.configure({**opts, "order_check": False}, Plain())["order_check"] is False


def test_bare_flag_value_does_not_swallow_a_path(tiny_runs, out):
    """``--per-layer`` before a path takes its default value, ``--per-layer module`` takes the choice."""
    ck = tiny_runs["sam"] / "step_000000.pt"
    res = run_cli("sharpness", "--per-layer", ck, "--top-k", "0", "--rho", "0", "--out", out, "--json")
    assert res.code == 0, res.stderr
    assert res.json()["results"][0]["per_layer_by"] == "tensor"
    bad = run_cli("sharpness", "--per-layer=layers", ck, "--out", out)
    assert bad.code == 2
