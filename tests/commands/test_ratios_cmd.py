"""``sam-probe ratios`` and ``sam-probe overlap`` end to end, against independent recomputation."""
from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest
import torch
from torch.func import functional_call, grad

from clitools import run_cli
from sam_probe import store
from sam_probe.core.bitpack import unpack_codes
from sam_probe.loading.data import load_data
from sam_probe.loading.models import build_model

CATS = ("C1", "C2", "C3", "C4", "boundary", "undefined")
KEYS = {"path", "step", "rho", "variant", "n_params", "grad_norm", "perturbed_grad_norm", "counts", "fractions",
        "buckets", "magnitude_split", "per_layer"}
N = 120  # samples


def reference_codes(path, rho, variant, faithful=False, eps=1e-12, n=N, index=None):
    """Codes (0..5 = C1..C4, boundary, undefined) straight from docs/metrics.md with plain autograd, float64
    (on the samples ``index`` of the selection when given)."""
    ck = torch.load(path, weights_only=True)
    net = build_model(ck["model_spec"]["name"], ck["model_spec"]["args"]).double()
    net.load_state_dict(ck["model"])
    data = load_data("digits", max_samples=n, seed=0)
    x, y = data.inputs.double(), data.targets
    if index is not None:
        x, y = x[index], y[index]
    names = [n for n, _ in net.named_parameters()]
    w = torch.cat([p.detach().reshape(-1) for _, p in net.named_parameters()])

    def loss(flat):
        params, i = {}, 0
        for n, p in net.named_parameters():
            params[n] = flat[i:i + p.numel()].view_as(p)
            i += p.numel()
        return torch.nn.functional.cross_entropy(functional_call(net, params, (x,)), y)

    g = grad(loss)(w)
    e = {"l2": rho * g / g.norm(), "linf": rho * g.sign(), "usam": rho * g}[variant]
    gt = grad(loss)(w + e)
    if faithful:
        r = gt / (g + 1e-8)
        defined = torch.ones_like(g, dtype=torch.bool)
    else:
        defined = g.abs() > eps
        r = torch.where(defined, gt / torch.where(defined, g, torch.ones_like(g)), torch.zeros_like(g))
    codes = torch.full_like(g, 4, dtype=torch.uint8)
    codes[r > 1] = 0
    codes[(r > 0) & (r < 1)] = 1
    codes[r < -1] = 2
    codes[(r > -1) & (r < 0)] = 3
    codes[~defined] = 5
    assert names
    return codes.numpy(), g.numpy()


def _ratios(*args):
    return run_cli("ratios", *args, "--max-samples", N, "--dtype", "float64")


@pytest.mark.parametrize("variant", ["l2", "linf", "usam"])
def test_ratio_counts_equal_independent_recomputation(tiny_runs, tmp_path, variant):
    out = tmp_path / "res"
    res = _ratios(tiny_runs["sam"], "--rho", "0.05", "--variant", variant, "--out", out, "--json")
    assert res.code == 0, res.stderr
    results = res.json()["results"]
    assert [r["step"] for r in results] == [0, 10, 20]
    for r in results:
        assert KEYS <= set(r) and "codes" not in r and "ire_flat" not in r
        codes, g = reference_codes(r["path"], 0.05, variant)
        expected = {c: int((codes == i).sum()) for i, c in enumerate(CATS)}
        assert r["counts"] == expected
        assert sum(r["counts"].values()) == r["n_params"] == codes.size
        assert r["fractions"]["C1"] == pytest.approx(expected["C1"] / codes.size)
        assert sum(b["count"] for b in r["buckets"]) == expected["C1"]
        assert sum(sum(e["counts"].values()) for e in r["per_layer"]) == r["n_params"]
        assert r["grad_norm"] == pytest.approx(float(np.linalg.norm(g)), rel=1e-10)
    # the packed codes in the store are exactly the reference codes
    for path, result, meta in store.iter_units(out):
        codes, _ = reference_codes(result["path"], 0.05, variant)
        np.testing.assert_array_equal(unpack_codes(result["codes"]), codes)


def test_faithful_mode_and_buckets_table(tiny_runs, tmp_path):
    ck = tiny_runs["sgd"] / "step_000020.pt"
    res = _ratios(ck, "--faithful", "--no-store", "--json")
    assert res.code == 0, res.stderr
    r = res.json()["results"][0]
    codes, _ = reference_codes(ck, 0.05, "l2", faithful=True)
    assert r["counts"] == {c: int((codes == i).sum()) for i, c in enumerate(CATS)}
    assert r["counts"]["undefined"] == 0  # the notebook formula never leaves a ratio undefined
    table = _ratios(ck, "--bucket", "--edges", "1.5,3", "--per-layer", "--out", tmp_path / "r")
    assert table.code == 0, table.stderr
    assert "[1,1.5)" in table.stdout and "[3,inf)" in table.stdout and "0.weight" in table.stdout.replace("net.", "")
    assert list((tmp_path / "r" / "plots").glob("ratios_buckets__*.png"))
    assert _ratios(ck, "--edges", "0.5,2").code == 2


def _brute_force(sets, n):
    """Anchor overlap, Jaccard and persistent core by Python set arithmetic."""
    anchor = [len(sets[0] & s) for s in sets]
    jac = [[len(a & b) / len(a | b) if a | b else None for b in sets] for a in sets]
    core, persistent = set(sets[0]), []
    for s in sets:
        core &= s
        persistent.append(len(core))
    expected = [n * (len(sets[0]) / n) * (len(s) / n) for s in sets]
    return anchor, jac, persistent, expected


def test_overlap_matches_brute_force_and_reuses_stored_codes(tiny_runs, tmp_path, monkeypatch):
    out = tmp_path / "res"
    assert _ratios(tiny_runs["sam"], "--out", out, "--quiet").code == 0
    import sam_probe.core.perturb as perturb

    def boom(*a, **k):
        raise AssertionError("overlap recomputed a gradient although the ratios are stored")

    monkeypatch.setattr(perturb, "perturbed_gradient", boom)
    res = run_cli("overlap", tiny_runs["sam"], "--max-samples", N, "--dtype", "float64", "--out", out, "--json")
    assert res.code == 0, res.stderr
    d = res.json()
    assert {"category", "steps", "sizes", "anchor", "jaccard", "persistent", "ire"} <= set(d)
    assert d["steps"] == [0, 10, 20]
    sets = [set(np.flatnonzero(reference_codes(tiny_runs["sam"] / f"step_{s:06d}.pt", 0.05, "l2")[0] == 0))
            for s in d["steps"]]
    n = 460
    anchor, jac, persistent, expected = _brute_force(sets, n)
    assert d["sizes"] == [len(s) for s in sets]
    assert d["anchor"]["overlap"] == anchor
    ind = d["nulls"]["independence"]["anchor"]
    np.testing.assert_allclose(ind["expected"], expected)
    np.testing.assert_allclose(ind["lift"], np.array(anchor) / np.array(expected))
    # the default headline null: the other two steps in random order around the anchor
    assert d["null"] == "shuffled"
    one = (anchor[1] + anchor[2]) / 2
    np.testing.assert_allclose(d["anchor"]["expected"], [anchor[0], one, one])
    np.testing.assert_allclose(d["persistent"]["expected"], [anchor[0], one, persistent[2]])
    assert set(d["nulls"]) == {"independence", "shuffled", "markov"}
    np.testing.assert_allclose(np.array(d["jaccard"], dtype=float), np.array(jac, dtype=float))
    assert d["persistent"]["size"] == persistent
    # IRE: flat = not among the top 90% of g^2 -> |F| = P - round(0.9 P)
    assert all(f == n - round(0.9 * n) for f in d["ire"]["flat_size"])
    assert len(list(out.glob("overlap/tiny-sam/*.h5"))) == 1


def test_overlap_computes_missing_ratios_and_reports_bad_files(tiny_runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_runs["sgd"], run)
    (run / "step_000015.pt").write_bytes(b"\x80\x02garbage")
    out = tmp_path / "res"
    res = run_cli("overlap", run, "--category", "C2", "--anchor", "10", "--max-samples", N, "--out", out, "--json")
    assert res.code == 2
    d = res.json()
    assert d["category"] == "C2" and d["steps"] == [0, 10, 20] and d["anchor"]["step"] == 10
    assert d["anchor"]["overlap"][1] == d["sizes"][1]
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "step_000015.pt" in errors[0]
    assert len(list(out.glob("ratios/run/*.h5"))) == 3  # the missing ratio units were computed and stored
    with h5py.File(next(out.glob("ratios/run/*.h5"))) as f:
        assert "codes" in f["result"]
    bad = run_cli("overlap", run, "--anchor", "7", "--max-samples", N, "--out", out)
    assert bad.code == 2 and "--anchor 7" in bad.stderr


def test_ratios_on_the_steps_own_minibatch(tiny_runs, tmp_path):
    """--minibatch B: the trainer's recorded stream when the selection is the trainer's, else a seeded draw."""
    from sam_probe.analyses._trainer import seeded_draw
    from sam_probe.training import batches

    run = tiny_runs["sam"]  # trained on 60 samples, batch 20, seed 0, checkpoints at steps 0, 10, 20
    res = run_cli("ratios", run, "--minibatch", "20", "--max-samples", "60", "--dtype", "float64", "--no-store",
                  "--json")
    assert res.code == 0, res.stderr
    stream = batches(60, 20, 0)
    draws = [next(stream) for _ in range(21)]
    for r in res.json()["results"]:
        assert r["minibatch"] == {"size": 20, "source": "trainer stream", "seed": 0, "draw": r["step"]}
        codes, _ = reference_codes(r["path"], 0.05, "l2", n=60, index=draws[r["step"]])
        assert r["counts"] == {c: int((codes == i).sum()) for i, c in enumerate(CATS)}
    # another selection: the documented seeded draw per checkpoint, with a warning
    other = run_cli("ratios", run / "step_000010.pt", "--minibatch", "20", "--max-samples", "50", "--seed", "4",
                    "--dtype", "float64", "--no-store", "--json")
    assert other.code == 0, other.stderr
    r = other.json()["results"][0]
    assert r["minibatch"]["source"] == "seeded draw" and "seeded draw was used" in r["minibatch"]["note"]
    assert "seeded draw" in other.stderr
    idx = seeded_draw(50, 20, 4, 10)
    ck = torch.load(run / "step_000010.pt", weights_only=True)
    net = build_model(ck["model_spec"]["name"], ck["model_spec"]["args"]).double()
    data = load_data("digits", max_samples=50, seed=4)
    assert len(idx) == 20 and int(idx.max()) < len(data) and net is not None
    assert run_cli("ratios", run, "--minibatch", "0", "--no-store").code == 2


def test_overlap_nulls_and_a_control_run(tiny_runs, tmp_path):
    out = tmp_path / "res"
    res = run_cli("overlap", tiny_runs["sam"], "--max-samples", N, "--control", tiny_runs["sgd"], "--null", "control",
                  "--out", out, "--json")
    assert res.code == 0, res.stderr
    d = res.json()
    ctl = run_cli("overlap", tiny_runs["sgd"], "--max-samples", N, "--out", out, "--json").json()
    assert d["null"] == "control" and d["control"] == str(tiny_runs["sgd"])
    a0, c0 = d["sizes"][0], ctl["sizes"][0]
    exp = [a0 * k / c0 for k in ctl["persistent"]["size"]]
    np.testing.assert_allclose(d["persistent"]["expected"], exp)
    np.testing.assert_allclose(d["nulls"]["control"]["persistent"]["expected"], exp)
    assert set(d["nulls"]) == {"independence", "shuffled", "markov", "control"}
    again = run_cli("overlap", tiny_runs["sam"], "--max-samples", N, "--control", tiny_runs["sgd"], "--null", "control",
                    "--out", out, "--json")
    drop = ("sources", "seconds")
    assert {k: v for k, v in again.json().items() if k not in drop} == {k: v for k, v in d.items() if k not in drop}
    assert run_cli("overlap", tiny_runs["sam"], "--null", "control", "--no-store").code == 2  # needs --control
