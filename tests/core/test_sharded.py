"""Model-sharded objectives (FSDP2, core/sharded.py): R gloo ranks = one process with exact products (float64).

(Kinks such as ReLU's are where finite differences are not exact: tests/core/test_hessian_fd.py checks
that the retried step and the error estimate cover them.)  The workers are this file run as a script with torchrun's environment (tests/test_distributed.py's
``run_ranks``).  Each rank computes, for an MLP, a BatchNorm
CNN in eval mode and a tiny GPT-2 LM: the loss, its gradient shard, one Hessian product, the top-3
eigenvalues, the exact trace, SAM, worst-case and average-case sharpness, all through the shards, and
(``_spectra_numbers``) SLQ tridiagonals of fixed global probes, the SLQ density and per-layer spectra; the test
recomputes them on
one process with exact double-backward products and dense float64 Hessians.
"""
from __future__ import annotations

import functools
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from sam_probe import distributed

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_distributed import run_ranks  # noqa: E402

pytestmark = pytest.mark.slow  # gloo ranks as processes

N = 13  # odd: data shards of unequal size
K = 2  # eigenvalues compared


def cases(names=("mlp", "cnn", "gpt2")) -> dict:
    """``name -> (model, inputs, targets, loss)``, float64, seeded (only ``names``: GPT-2 imports transformers)."""
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(5, 7), nn.GELU(), nn.Linear(7, 3)).double()
    x = torch.randn(N, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (N,), generator=g)
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 2)).double()
    with torch.no_grad():  # running statistics off their init, so eval mode differs from identity
        cnn[1].running_mean.uniform_(-0.5, 0.5, generator=g)
        cnn[1].running_var.uniform_(0.5, 2.0, generator=g)
    xi = torch.randn(N, 1, 6, 6, generator=g, dtype=torch.float64)
    yi = torch.randint(0, 2, (N,), generator=g)
    out = {"mlp": (mlp, x, y, "ce"), "cnn": (cnn, xi, yi, "ce")}
    if "gpt2" in names:
        import hftiny

        gpt = hftiny.perturb(hftiny.gpt2(attn_implementation="eager")).double()
        ids = torch.randint(0, hftiny.VOCAB, (6, hftiny.SEQ), generator=g)
        out["gpt2"] = (gpt, ids, None, "lm")
    return {k: v for k, v in out.items() if k in names}


def direction(n: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(5), dtype=torch.float64)


def local_part(obj, full: torch.Tensor, names: list[str], shapes: list) -> torch.Tensor:
    """This rank's shard of a full flat vector (FSDP2 shards dimension 0 of every tensor in R chunks)."""
    R, r = obj.world, obj.rank
    out, a = [], 0
    for _name, shape in zip(names, shapes):
        k = int(torch.Size(shape).numel())
        t = full[a:a + k].reshape(shape)
        a += k
        chunks = torch.chunk(t, R, 0)
        out.append((chunks[r] if r < len(chunks) else t[:0]).reshape(-1))
    return torch.cat(out)


WORLDS = {2: ("mlp", "cnn", "gpt2"), 4: ("mlp",)}  # (4 ranks on 2 shared CPU cores: the cheapest case only)
# per-layer spectra on shards: (world, model) -> (grouping, exact_max): blocks of at most exact_max entries
# dense, the others by Lanczos + Hutch++ (4 ranks: the 3-row tensors of the MLP's last layer leave rank 3
# with no rows of block "2"); few products: --tol 1e-4, Hutch++ within 8 products
PER_LAYER = {(2, "mlp"): ("module", 30), (4, "mlp"): ("module", 0)}
SLQ_STEPS, SLQ_PROBES = 5, 2  # Lanczos on fixed global probes, compared with one process on the whole probes


def density_probes(n: int) -> torch.Tensor:
    """Fixed global Rademacher probes ``[n, SLQ_PROBES]`` (each rank runs on its rows of them)."""
    g = torch.Generator().manual_seed(11)
    return torch.randint(0, 2, (n, SLQ_PROBES), generator=g).double().mul_(2).sub_(1)


def _spectra_numbers(obj, op, name) -> dict:
    """Per-layer spectra (PER_LAYER) and SLQ through the shards: the tridiagonals of the same global probes
    (with and without reorthogonalisation), and the density of the analysis (its own probes per rank)."""
    from sam_probe.core import inner
    from sam_probe.core.dense import dense_matrix
    from sam_probe.core.density import curvature_density, gauss_quadrature, lanczos_tridiagonal
    from sam_probe.core.per_layer import per_layer_spectra

    out: dict = {}
    Z = density_probes(obj.n_params)
    local = torch.stack([local_part(obj, Z[:, j], obj.space.names, obj.space.shapes) for j in range(SLQ_PROBES)], 1)
    for reorth in ((True, False) if name == "mlp" and obj.world == 2 else (True,)):
        with inner.over(op):
            tri = lanczos_tridiagonal(op.matmat, local, SLQ_STEPS, reorth=reorth)
        out[f"slq_{reorth}"] = [[a.tolist(), b.tolist(), *[t.tolist() for t in gauss_quadrature(a, b)]] for a, b in tri]
    if name != "gpt2" and obj.world == 2:
        dens = curvature_density(op, steps=4, n_probes=3, seed=2)
        out["density_mean"], out["density"] = dens.mean, dens.density.tolist()
    if (obj.world, name) in PER_LAYER:
        by, exact_max = PER_LAYER[obj.world, name]
        out["per_layer"] = [r.to_dict() for r in per_layer_spectra(op, by=by, tol=1e-4, exact_max=exact_max,
                                                                   trace_max_hvp=8, seed=1)]
    if obj.world == 4 and name == "mlp":  # a dense block with a rank that holds none of it: the whole block
        out["dense_2.bias"] = dense_matrix(op.restrict(["2.bias"])).tolist()
    return out

AVG_SAMPLES = 3  # average-case directions injected (the same global vectors on R ranks and one process)


def avg_directions(P: int) -> torch.Tensor:
    return torch.randn(AVG_SAMPLES, P, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


M_SHARP = {"mlp": 5, "cnn": 5, "gpt2": 4}  # m of m-sharpness (13 samples; GPT-2: 6 sequences)


RATIO_IDX = [0, 2, 3, 5, 7, 11, 12]  # a "step's minibatch" (ratios --minibatch: the objective's subset)


def _ratio_numbers(obj) -> dict:
    """``ratios`` with m-sharpness (sub-batches of 5) and on a minibatch subset: statistics, and the packed
    codes and IRE mask (rank 0 alone holds them under --shard-model), as JSON."""
    import numpy as np

    from sam_probe.analyses.ratios import compute_ratios, ratio_config

    cfg = ratio_config({"rho": 0.05, "variant": "l2", "m": 5, "eps": 1e-12, "faithful": False,
                        "edges": "1.2,1.5,2,4,8,16", "ire_rank": 0.9, "eta": 0.01, "minibatch": None})
    out = {}
    for key, (o, c) in {"m": (obj, cfg), "minibatch": (obj.subset(torch.tensor(RATIO_IDX)), {**cfg, "m": None})}.items():
        r = compute_ratios(o, c)
        out[f"ratios_{key}"] = {
            "counts": r["counts"], "grad_norm": r["grad_norm"], "perturbed_grad_norm": r["perturbed_grad_norm"],
            "codes": None if r["codes"] is None else {k: np.asarray(v).tolist() for k, v in r["codes"].items()},
            "mask": None if r["ire_flat"]["mask"] is None else np.asarray(r["ire_flat"]["mask"]).tolist()}
    return out


def _measure_numbers(obj, name: str, space=None) -> dict:
    """Worst-case (l2; adaptive linf) and average-case sharpness: of the sharded objective ``obj`` (its
    shards), or with ``space = (names, shapes)`` of a one-process objective (the reference)."""
    from sam_probe.core import inner
    from sam_probe.core.perturb import sam_sharpness
    from sam_probe.core.sharpness_measures import average_case_sharpness, worst_case_sharpness

    names, shapes = space if space is not None else (obj.space.names, obj.space.shapes)
    full = avg_directions(obj.n_params)
    dirs = [row if space is not None else local_part(obj, row, names, shapes) for row in full]
    before = obj.flat_params()
    out = {"worst_l2": worst_case_sharpness(obj, 0.05, steps=3).to_dict(),
           "worst_linf_adaptive": worst_case_sharpness(obj, 0.02, variant="linf", adaptive=True,
                                                       steps=3).to_dict(),
           "average_injected": average_case_sharpness(obj, 0.05, samples=AVG_SAMPLES, directions=dirs).to_dict(),
           "average_drawn": average_case_sharpness(obj, 0.05, samples=4, seed=3).to_dict(),
           # m-sharpness: sub-batches of M samples (with 4 ranks the last, of 3, is run whole on every rank)
           "worst_m": worst_case_sharpness(obj, 0.05, m=M_SHARP[name], steps=2).to_dict()}
    with inner.over(obj):
        out["sam_m"] = sam_sharpness(obj, rho=0.05, m=M_SHARP[name])
    current = obj.current_shard() if space is None else obj.flat_params()
    out["measure_weights_unchanged"] = bool(torch.equal(current, before))
    return out


def exact_trace_over(op):
    """``tr(H)`` from the ``P`` unit vectors, each rank's in turn (:func:`sam_probe.core.trace.exact_trace`)."""
    from sam_probe.core import inner
    from sam_probe.core.trace import exact_trace

    with inner.over(op):
        return exact_trace(op.matmat, op.P, dtype=op.dtype)


def sharded_numbers(names) -> dict:
    from sam_probe.core import inner
    from sam_probe.core.lanczos import top_eigen
    from sam_probe.core.perturb import sam_sharpness
    from sam_probe.core.sharded import ShardedObjective
    from sam_probe.core.trace import curvature_trace
    from sam_probe.core.vectors import VectorCount

    out = {}
    for name, (model, x, y, loss) in cases(names).items():
        obj = ShardedObjective(model, x, y, loss, chunk_size=3 if name == "mlp" else None)
        w0 = obj.current_shard()
        P = obj.n_params
        v = local_part(obj, direction(P), obj.space.names, obj.space.shapes)
        op = obj.hessian()
        hv = op.matmat(v[:, None])[:, 0]
        count = VectorCount()
        eig = top_eigen(op, K, tol=1e-6, max_hvp=600, count=count)  # eigenvalue error ~ residual²/gap
        with inner.over(obj):
            sam = sam_sharpness(obj, rho=0.05)
        out[name] = {
            "loss": obj.loss(), "grad": obj.grad().tolist(), "hv": hv.tolist(),
            "product_error": float(op.last_product_error[0]), "eigenvalues": eig.eigenvalues,
            "residuals": eig.residuals,
            # the MLP's exact trace (P unit vectors, each rank's in turn: curvature_trace's fallback, called
            # directly to spare the P estimator products before it); Hutch++ within its SE elsewhere
            "trace": (tr := exact_trace_over(op) if name == "mlp" and obj.world == 2
                      else curvature_trace(op, tol=1e-3, max_hvp=16, seed=1)).estimate,
            "trace_se": tr.se, "trace_method": tr.method,
            "sam": sam, "P": P, "P_local": obj.space.size, "peak_vectors": count.peak,
            "weights_unchanged": bool(torch.equal(obj.current_shard(), w0)),
        }
        out[name].update(_measure_numbers(obj, name))
        out[name].update(_spectra_numbers(obj, op, name))
        if name == "mlp":
            out[name].update(_ratio_numbers(obj))
    return out


def worker(outdir: str) -> None:
    distributed.init("cpu")
    try:
        names = WORLDS[distributed.world_size()]
        Path(outdir, f"rank{distributed.rank()}.json").write_text(json.dumps(sharded_numbers(names)))
    finally:
        distributed.shutdown()


@functools.lru_cache(maxsize=None)
def reference() -> dict:
    """The same numbers on one process: exact products, dense float64 Hessians (computed once: the tests
    only read it)."""
    from sam_probe.core.dense import dense_hessian
    from sam_probe.core.density import gauss_quadrature, lanczos_tridiagonal
    from sam_probe.core.objective import Objective
    from sam_probe.core.per_layer import parameter_groups
    from sam_probe.core.perturb import sam_sharpness

    ref = {}
    for name, (model, x, y, loss) in cases().items():
        obj = Objective(model, x, y, loss)
        H = dense_hessian(obj)
        v = direction(obj.n_params)
        ref[name] = {"loss": obj.loss(), "grad": obj.grad_flat(), "hv": H @ v,
                     "eigenvalues": torch.linalg.eigvalsh(H).flip(0)[:K].tolist(), "trace": float(H.trace()),
                     "sam": sam_sharpness(obj, rho=0.05), "names": obj.space.names, "shapes": obj.space.shapes}
        ref[name].update(_measure_numbers(obj, name, (obj.space.names, obj.space.shapes)))
        if name == "mlp":
            ref[name].update(_ratio_numbers(obj))
        # SLQ on the same global probes; the spread of z'Hz/P over Rademacher z (the density mean's)
        Z = density_probes(obj.n_params)
        for reorth in (True, False):
            tri = lanczos_tridiagonal(lambda V, H=H: H @ V, Z, SLQ_STEPS, reorth=reorth)
            ref[name][f"slq_{reorth}"] = [[a.tolist(), b.tolist(), *[t.tolist() for t in gauss_quadrature(a, b)]]
                                          for a, b in tri]
        ref[name]["quadform_sd"] = float((2 * (H.square().sum() - H.diag().square().sum())).sqrt()) / obj.n_params
        # per-layer: every diagonal block densely (top eigenvalue and trace), for both groupings
        slices = obj.space.slices()
        for by in ("tensor", "module"):
            blocks = {}
            for g, names in parameter_groups(obj.space.names, by).items():
                idx = torch.cat([torch.arange(slices[n].start, slices[n].stop) for n in names])
                B = H[idx][:, idx]
                blocks[g] = (float(torch.linalg.eigvalsh(B)[-1]), float(B.trace()), len(idx))
            ref[name][f"per_layer_{by}"] = blocks
        ref[name]["dense_2.bias"] = H[slices["2.bias"], slices["2.bias"]] if "2.bias" in slices else None
    return ref


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, request) -> dict[int, list[dict]]:
    got = {}
    for world in (2, 4):
        out = tmp_path_factory.mktemp(f"ranks{world}")
        procs = run_ranks([sys.executable, __file__, str(out)], world, timeout=400)
        for p in procs:
            assert p.returncode == 0, p.stderr[-3000:]
        got[world] = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    return got


class _Shards:
    def __init__(self, world: int, rank: int):
        self.world, self.rank = world, rank


def rel(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_equals_one_process(ranks, world):
    ref = reference()
    per_rank = ranks[world]
    for name in WORLDS[world]:
        r = ref[name]
        rows = [got[name] for got in per_rank]
        P = rows[0]["P"]
        assert P == len(r["grad"]) and sum(row["P_local"] for row in rows) == P  # the shards partition w
        for k, row in enumerate(rows):
            assert abs(row["loss"] - r["loss"]) <= 1e-12 * abs(r["loss"])
            shard = _Shards(world, k)
            g = local_part(shard, r["grad"], r["names"], r["shapes"])
            hv = local_part(shard, r["hv"], r["names"], r["shapes"])
            assert rel(row["grad"], g) <= 1e-10, name
            if hv.norm() > 0:
                assert rel(row["hv"], hv) <= 1e-8, (name, k)
            assert row["weights_unchanged"]
            # every rank: the same eigenvalues, residuals, trace (reduced scalars only)
            assert row["eigenvalues"] == rows[0]["eigenvalues"] and row["trace"] == rows[0]["trace"]
        full_err = rel(torch.cat([torch.tensor(row["hv"], dtype=torch.float64) for row in rows]),
                       torch.cat([local_part(_Shards(world, k), r["hv"], r["names"], r["shapes"])
                                  for k in range(world)]))
        assert full_err <= 1e-8, name
        assert rows[0]["product_error"] <= 1e-6 * float(torch.as_tensor(r["hv"]).norm()), name
        assert rel(rows[0]["eigenvalues"], r["eigenvalues"]) <= 1e-8, (name, rows[0]["eigenvalues"], r["eigenvalues"])
        assert max(rows[0]["residuals"]) <= 1e-6
        if name == "mlp" and world == 2:  # (4 ranks: Hutch++, to keep 4 processes on 2 cores short)
            assert rows[0]["trace_method"] == "exact" and abs(rows[0]["trace"] - r["trace"]) <= 1e-8 * abs(r["trace"])
        else:
            assert abs(rows[0]["trace"] - r["trace"]) <= 5 * rows[0]["trace_se"] + 1e-8 * abs(r["trace"]), name
        assert abs(rows[0]["sam"] - r["sam"]) <= 1e-10 * max(abs(r["sam"]), 1e-12), name


def test_per_rank_vectors_are_shards(ranks):
    """Memory: every vector a solver holds is a shard, so a rank's vector memory is about 1/R of one process's."""
    for world, names in WORLDS.items():
        for name in names:
            rows = [got[name] for got in ranks[world]]
            P = rows[0]["P"]
            biggest = max(row["P_local"] for row in rows)
            assert biggest <= P / world + 64  # rows of a tensor split in R chunks (at most one row more)
            assert all(row["peak_vectors"] <= K + 8 for row in rows)  # k + c vectors, each a shard


def test_cli_shard_model_equals_one_process(tmp_path):
    """``sharpness --shard-model`` as 2 ranks (torchrun's environment): rank 0 alone prints and writes one
    unit; its loss, eigenvalues, trace, SAM and worst-case sharpness and per-layer rows (every block dense: at
    most 64 entries) equal a one-process run with exact products; its average case is within the standard
    errors, and it has an SLQ density."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from clitools import run_cli
    from test_distributed import close

    from sam_probe import store
    from sam_probe.commands.train_cmd import write_run

    run = tmp_path / "run"
    write_run(run, optimizer="sam", model="mlp", model_args={"in_dim": 64, "hidden": [1], "out_dim": 10},
              data="digits", max_samples=41, steps=1, lr=0.1, batch_size=20, checkpoint_every=1, seed=0)
    ck = sorted(run.glob("*.pt"))[-1]
    args = ["sharpness", str(ck), "--data", "digits", "--max-samples", "41", "--dtype", "float64", "--top-k", "2",
            "--tol", "1e-7", "--trace", "--trace-method", "hutch++", "--trace-max-hvp", "30", "--rho", "0.05",
            "--worst-case", "--average-case", "--ascent-steps", "3", "--samples", "4", "--m-sharpness", "10",
            "--per-layer", "--density", "--density-steps", "3", "--density-probes", "2", "--json", "--no-plot"]
    one = run_cli(*args, "--out", str(tmp_path / "one"))
    assert one.code == 0, one.stderr
    procs = run_ranks([sys.executable, "-m", "sam_probe", *args, "--shard-model", "--out", str(tmp_path / "two")],
                      2, timeout=300)
    assert [p.returncode for p in procs] == [0, 0], procs[0].stderr[-2000:] + procs[1].stderr[-2000:]
    assert procs[1].stdout == ""
    assert "finite differences" in procs[0].stderr  # said once, by rank 0
    units = list((tmp_path / "two").rglob("*.h5"))
    assert len(units) == 1
    a, b = one.json()["results"][0], json.loads(procs[0].stdout)["results"][0]
    for key in ("loss", "accuracy", "eigenvalues", "sam_sharpness"):
        close(a[key], b[key], rel=1e-8, path=key)
    assert abs(a["trace"] - b["trace"]) <= 5 * (a["trace_se"] + b["trace_se"]) + 1e-8 * abs(a["trace"])
    assert max(b["residuals"]) <= 1e-7 and "product_residuals" in b  # the fd error is in the certificate
    stored, meta = store.read_unit(units[0])
    assert meta["world_size"] == 2 and meta["shard_model"] is True
    # worst case (from the gradient direction): one process's to rounding; average case: within its SEs
    one_unit, _ = store.read_unit(next((tmp_path / "one").rglob("*.h5")))
    for key in ("worst_case_sharpness", "worst_case_start", "worst_case_delta_norm"):
        close(float(one_unit[key]), float(stored[key]), rel=1e-8, path=key)
    assert stored["worst_case_steps"] == one_unit["worst_case_steps"] == 3 and stored["average_case_samples"] == 4
    assert abs(stored["average_case_sharpness"] - one_unit["average_case_sharpness"]) <= 5 * (
        stored["average_case_se"] + one_unit["average_case_se"])
    rows = [{k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in r.items()} for r in stored["per_layer"]]
    assert [r["name"] for r in rows] == [r["name"] for r in a["per_layer"]] and all(r["exact"] for r in rows)
    scale = max(abs(r["top_eigenvalue"]) for r in a["per_layer"])  # the products' error is relative to ||H||
    for want, got in zip(a["per_layer"], rows):
        assert got["n_params"] == want["n_params"] and got["trace_se"] == 0.0, got
        for key in ("top_eigenvalue", "trace"):
            assert abs(got[key] - want[key]) <= 1e-8 * max(abs(want[key]), scale), (key, got, want)
    assert b["per_layer"] == rows  # what rank 0 printed is what it stored
    assert b["density"]["n_probes"] == 2 and b["density"]["n_hvp"] == 6 and math.isfinite(b["density"]["mean"])


def test_cli_shard_model_refuses_what_it_cannot_do(tmp_path):
    """Curvatures other than the Hessian, and PyHessian's backend (it runs its own solver on one process),
    are one-line errors."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from clitools import run_cli

    from sam_probe.commands.train_cmd import write_run

    run = tmp_path / "run"
    write_run(run, optimizer="sgd", model="mlp", model_args={"in_dim": 64, "hidden": [4], "out_dim": 10},
              data="digits", max_samples=20, steps=1, lr=0.1, batch_size=20, checkpoint_every=1, seed=0)
    ck = sorted(run.glob("*.pt"))[-1]
    base = ["sharpness", str(ck), "--data", "digits", "--max-samples", "20", "--shard-model", "--no-store",
            "--no-plot"]
    for extra, words in ((["--curvature", "ggn"], "Hessian products only"),
                         (["--backend", "pyhessian"], "--backend pyhessian")):
        res = run_cli(*base, *extra)
        assert res.code == 2, (extra, res.stderr)
        lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error")]
        assert len(lines) == 1 and words in lines[0], (extra, res.stderr)


def test_unsharded_solvers_unchanged_outside_a_group():
    """Outside a sharded block the inner products are the plain local ones (bit for bit)."""
    from sam_probe.core import inner

    a = torch.randn(7, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert not inner.active()
    assert torch.equal(inner.colnorms(a), a.norm(dim=0))
    assert inner.norm(a[:, 0]) == float(a[:, 0].norm()) and inner.size(7) == 7 and inner.sizes(7) == [7]
    assert inner.dot(a[:, 0], a[:, 1]) == float(a[:, 0] @ a[:, 1])


def test_sharded_worst_and_average_case_equal_one_process(ranks):
    """Worst-case sharpness (Auto-PGD from the gradient direction: deterministic) equals one process to rounding,
    l2 and adaptive linf; the average case with the same injected global directions too; with each rank's own
    draws, every rank reports the same estimate, within its standard errors of one process's."""
    ref = reference()
    for world, names in WORLDS.items():
        for name in names:
            r = ref[name]
            rows = [got[name] for got in ranks[world]]
            for row in rows:
                assert row["measure_weights_unchanged"], (world, name)
                for key in ("worst_l2", "worst_linf_adaptive", "average_injected", "average_drawn", "worst_m",
                            "sam_m"):
                    assert row[key] == rows[0][key], (world, name, key)  # reduced scalars only: the same on every rank
            got = rows[0]
            for key in ("worst_l2", "worst_linf_adaptive"):
                a, b = got[key], r[key]
                assert a["worst_case_steps"] == b["worst_case_steps"] == 3, (name, key)
                assert a["worst_case_last_improvement"] == b["worst_case_last_improvement"], (world, name, key)
                assert a["worst_case_n_grad"] == b["worst_case_n_grad"]
                for k in ("worst_case_sharpness", "worst_case_start", "worst_case_delta_norm"):
                    assert abs(a[k] - b[k]) <= 1e-10 * max(abs(b[k]), 1e-12), (world, name, key, k, a[k], b[k])
            assert r["worst_l2"]["worst_case_sharpness"] >= r["worst_l2"]["worst_case_start"]
            a, b = got["average_injected"], r["average_injected"]
            for k in ("average_case_sharpness", "average_case_se"):
                assert abs(a[k] - b[k]) <= 1e-10 * max(abs(b[k]), 1e-12), (world, name, k, a[k], b[k])
            a, b = got["worst_m"], r["worst_m"]
            assert a["worst_case_m"] == b["worst_case_m"] == M_SHARP[name]
            for k in ("worst_case_sharpness", "worst_case_start", "worst_case_delta_norm"):
                assert abs(a[k] - b[k]) <= 1e-10 * max(abs(b[k]), 1e-12), (world, name, "m", k, a[k], b[k])
            assert abs(got["sam_m"] - r["sam_m"]) <= 1e-10 * max(abs(r["sam_m"]), 1e-12), (world, name)
            assert r["sam_m"] != r["sam"]  # sub-batches: another number than the whole selection's
            a, b = got["average_drawn"], r["average_drawn"]
            assert a["average_case_sharpness"] != b["average_case_sharpness"]  # R ranks: their own draws
            assert abs(a["average_case_sharpness"] - b["average_case_sharpness"]) <= 5 * (
                a["average_case_se"] + b["average_case_se"]), (world, name, a, b)


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_density_equals_one_process(ranks, world):
    """SLQ through the shards: on each rank's rows of fixed global probes, the Lanczos tridiagonals (α, β)
    and their Gauss nodes and weights are one process's on the whole probes (with and without
    reorthogonalisation); the analysis's density (each rank's own probe rows) is the same on every rank and
    its mean Σ τθ estimates tr(H)/P within its sampling spread."""
    ref = reference()
    for name in WORLDS[world]:
        rows = [got[name] for got in ranks[world]]
        for key in ("slq_True", "slq_False"):
            if key not in rows[0]:
                continue
            assert all(row[key] == rows[0][key] for row in rows), (name, key)  # reduced values only
            for got, want in zip(rows[0][key], ref[name][key]):
                for part, (a, b) in enumerate(zip(got, want)):  # alpha, beta, nodes, weights
                    assert len(a) == len(b) and rel(a, b) <= 1e-8, (name, key, part, a, b)
        if "density_mean" in rows[0]:
            assert all(row["density"] == rows[0]["density"] for row in rows)
            P = rows[0]["P"]
            sd = ref[name]["quadform_sd"] / 3 ** 0.5  # 3 probes
            assert abs(rows[0]["density_mean"] - ref[name]["trace"] / P) <= 5 * sd + 1e-8 * abs(ref[name]["trace"]) / P


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_per_layer_equals_one_process(ranks, world):
    """Per-layer spectra through the shards: every rank the same rows; a dense block's top eigenvalue and
    trace are one process's dense block's; a Lanczos block's top eigenvalue to its residual, its trace
    within its standard error."""
    ref = reference()
    for name in WORLDS[world]:
        if (world, name) not in PER_LAYER:
            continue
        by, exact_max = PER_LAYER[world, name]
        rows = [got[name]["per_layer"] for got in ranks[world]]
        assert all(r == rows[0] for r in rows), name
        want = ref[name][f"per_layer_{by}"]
        assert [r["name"] for r in rows[0]] == list(want), name
        for r in rows[0]:
            lam, tr, n = want[r["name"]]
            assert r["n_params"] == n and r["exact"] == (n <= exact_max), r
            if r["exact"]:
                assert abs(r["top_eigenvalue"] - lam) <= 1e-8 * max(abs(lam), 1e-3), (r, lam)
                assert abs(r["trace"] - tr) <= 1e-8 * max(abs(tr), 1e-3) and r["trace_se"] == 0.0, (r, tr)
            else:  # |θ - λ| <= ||A y - θ y|| <= tol |θ|
                assert r["converged"] and abs(r["top_eigenvalue"] - lam) <= 1e-4 * abs(lam), (r, lam)
                assert abs(r["trace"] - tr) <= 5 * r["trace_se"] + 1e-8 * max(abs(tr), 1e-3), (r, tr)
        if world == 4:  # block "2" leaves rank 3 without rows: through Lanczos, and densely (3 ranks' rows in order)
            assert not any(r["exact"] for r in rows[0])
            blocks = [torch.tensor(got[name]["dense_2.bias"], dtype=torch.float64) for got in ranks[world]]
            assert all(torch.equal(b, blocks[0]) for b in blocks)
            assert rel(blocks[0], ref[name]["dense_2.bias"]) <= 1e-8


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    worker(sys.argv[1])


def test_sharded_ratios_with_m_sharpness_and_a_minibatch_equal_one_process(ranks):
    """``ratios --m-sharpness`` (sub-batches of the sharded objective; with 4 ranks the last sub-batch, of 3
    samples, is run whole on every rank) and ``--minibatch`` (the objective's subset): counts exactly, norms
    to rounding, and rank 0's packed codes and IRE mask the bytes of one process."""
    ref = reference()["mlp"]
    for world in WORLDS:
        rows = [got["mlp"] for got in ranks[world]]
        for key in ("ratios_m", "ratios_minibatch"):
            a, b = ref[key], rows[0][key]
            assert a["counts"] == b["counts"], (world, key)
            assert min(a["counts"][c] for c in ("C1", "C2")) > 0  # non-trivial categories compared
            for k in ("grad_norm", "perturbed_grad_norm"):
                assert abs(a[k] - b[k]) <= 1e-10 * a[k], (world, key, k)
            assert b["codes"] == a["codes"] and b["mask"] == a["mask"], (world, key)
            assert all(r[key]["codes"] is None and r[key]["mask"] is None for r in rows[1:])
        assert ref["ratios_m"]["counts"] != ref["ratios_minibatch"]["counts"]
