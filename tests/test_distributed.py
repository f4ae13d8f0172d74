"""Data parallel = one process: 2 gloo ranks on CPU vs the same analysis in this process (float64).

The workers are this file run as a script (``python tests/test_distributed.py OUTDIR``)
with the ``env://`` rendezvous variables torchrun would set.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from sam_probe import distributed

N = 37  # odd: shards of 19 and 18 samples


def problem(bn: bool):
    """A seeded tiny classifier and data; with ``bn`` a BatchNorm net in train mode, chunks of 5."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (N,), generator=g)
    if bn:
        model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).double()
    else:
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    return model, x, y


def analyse(bn: bool) -> dict:
    """Every kind of number the analyses produce, on whatever group is active."""
    from sam_probe.core.alignment import alignment
    from sam_probe.core.lanczos import top_eigen
    from sam_probe.core.objective import Objective
    from sam_probe.core.perturb import sam_sharpness
    from sam_probe.core.ratios import ratio_analysis
    from sam_probe.core.trace import hessian_trace

    model, x, y = problem(bn)
    obj = Objective(model, x, y, "ce", bn_mode="train" if bn else "eval", chunk_size=5 if bn else None,
                    vector_block=2)
    loss, acc = obj.evaluate()
    eig = top_eigen(obj, 3, tol=1e-10, max_hvp=400, block_size=2)
    tr = hessian_trace(obj, "hutchinson", tol=1e-3, max_hvp=60, seed=1)
    trpp = hessian_trace(obj, "hutch++", tol=1e-3, max_hvp=60, seed=2)
    rat = ratio_analysis(obj, rho=0.05)
    rat_m = ratio_analysis(obj, rho=0.05, m=10)  # sub-batches of 10 straddle the shard boundary
    al = alignment(obj, eig.eigenvectors, eig.eigenvalues, eta=0.1, batch_size=15, seed=3,
                   prev_params=obj.flat_params() * 0.99, eta_grid=[0.05, 0.2, 1.0])
    return {
        "n_local": obj.n_local, "loss": loss, "acc": acc, "grad": obj.grad_flat().tolist(),
        "eigenvalues": eig.eigenvalues, "n_hvp": eig.n_hvp, "trace": tr.estimate, "trace_pp": trpp.estimate,
        "counts": rat.counts, "counts_m": rat_m.counts, "sharp_m": sam_sharpness(obj, 0.05, m=10),
        "chi": al.chi, "dL": al.dL, "eta_star": al.eta_star,
    }


def worker(outdir: str) -> None:
    distributed.init("cpu")
    try:
        res = {"world": distributed.world_size(), "plain": analyse(False), "bn": analyse(True)}
        Path(outdir, f"rank{distributed.rank()}.json").write_text(json.dumps(res))
    finally:
        distributed.shutdown()


def run_ranks(argv: list[str], world: int, extra_env: dict | None = None, timeout: float = 120) -> list:
    """Start ``world`` processes with torchrun's environment variables; return their CompletedProcess."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(distributed.free_port()),
           "WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1", **(extra_env or {})}
    procs = [subprocess.Popen(argv, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(world)]
    done = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        done.append(subprocess.CompletedProcess(argv, p.returncode, out, err))
    return done


def close(a, b, rel=1e-8, path="") -> None:
    """Recursive comparison: floats to ``rel`` (relative to max(|a|, |b|, 1e-12)), the rest exactly."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            close(a[k], b[k], rel, f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (u, v) in enumerate(zip(a, b)):
            close(u, v, rel, f"{path}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert abs(a - b) <= rel * max(abs(a), abs(b), 1e-12), f"{path}: {a} vs {b}"
    else:
        assert a == b, f"{path}: {a} vs {b}"


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ranks")
    procs = run_ranks([sys.executable, __file__, str(out)], 2)
    for p in procs:
        assert p.returncode == 0, p.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["plain", "bn"])
def test_two_gloo_ranks_match_one_process(two_ranks, case):
    one = analyse(case == "bn")
    r0, r1 = two_ranks[0][case], two_ranks[1][case]
    assert two_ranks[0]["world"] == 2
    # each rank summed over its own contiguous shard only (bn: chunks of 5 dealt out whole)
    assert (r0["n_local"], r1["n_local"]) == ((20, 17) if case == "bn" else (18, 19))
    # the ranks agree bit for bit: the solver took the same steps on both
    r0.pop("n_local"), r1.pop("n_local"), one.pop("n_local")
    assert r0 == r1
    # the gradient as a vector (BN train mode makes some entries exactly 0 up to rounding)
    g1, g2 = torch.tensor(one.pop("grad")), torch.tensor(r0.pop("grad"))
    assert float((g1 - g2).norm()) <= 1e-12 * float(g1.norm())
    # and equal one process up to the order of additions
    assert one["n_hvp"] == r0["n_hvp"] and one["counts"] == r0["counts"] and one["counts_m"] == r0["counts_m"]
    close(one, r0, rel=1e-8)
    assert min(abs(v) for v in one["eigenvalues"]) > 1e-3  # non-trivial spectrum compared


@pytest.mark.slow
def test_cli_under_torchrun_environment(tmp_path):
    """``sharpness`` launched as 2 ranks (WORLD_SIZE set, as torchrun does): rank 0 alone prints and
    writes one store unit; its numbers equal a one-process run."""
    sys.path.insert(0, str(Path(__file__).parent / "commands"))
    from clitools import run_cli

    from sam_probe.commands.train_cmd import write_run

    run = tmp_path / "run"
    write_run(run, optimizer="sam", model="mlp", model_args={"in_dim": 64, "hidden": [6], "out_dim": 10},
              data="digits", max_samples=61, steps=1, lr=0.1, batch_size=20, checkpoint_every=1, seed=0)
    ck = sorted(run.glob("*.pt"))[-1]
    args = ["sharpness", str(ck), "--data", "digits", "--max-samples", "61", "--dtype", "float64", "--top-k", "2",
            "--tol", "1e-9", "--trace", "--trace-method", "hutchinson", "--rho", "0.05", "--m", "20", "--json",
            "--no-plot"]
    one = run_cli(*args, "--out", str(tmp_path / "one"))
    assert one.code == 0, one.stderr
    procs = run_ranks([sys.executable, "-m", "sam_probe", *args, "--out", str(tmp_path / "two")], 2)
    assert [p.returncode for p in procs] == [0, 0], procs[0].stderr[-2000:] + procs[1].stderr[-2000:]
    assert procs[1].stdout == ""
    units = list((tmp_path / "two").rglob("*.h5"))
    assert len(units) == 1
    a, b = one.json()["results"][0], json.loads(procs[0].stdout)["results"][0]
    for key in ("loss", "accuracy", "eigenvalues", "trace", "sam_sharpness"):
        close(a[key], b[key], rel=1e-8, path=key)
    assert a["n_hvp"] == b["n_hvp"]
    from sam_probe import store
    _, meta = store.read_unit(units[0])
    assert meta["world_size"] == 2


def test_bn_train_notes_when_the_batchnorm_batch_is_not_the_selection():
    from sam_probe.errors import CLI, render
    from sam_probe.pipeline.build import bn_batch_note

    assert bn_batch_note("eval", True, 40, None, 2) is None and bn_batch_note("train", False, 40, None, 2) is None
    assert bn_batch_note("train", True, 40, None, 1) is None  # one process, one batch: the selection
    assert bn_batch_note("train", True, 40, 64, 1) is None  # one chunk holds everything
    ranks = render(bn_batch_note("train", True, 40, None, 2), CLI)
    assert ranks.startswith("--bn-mode train over 2 ranks: each rank's shard (about 20 of the 40 samples)")
    chunks = render(bn_batch_note("train", True, 40, 10, 2), CLI)  # 4 whole chunks dealt to 2 ranks: as in one
    assert chunks.startswith("--bn-mode train with --batch-size 10: each chunk of 10 samples") and "ranks" not in chunks
    assert "fewer chunks than ranks" in bn_batch_note("train", True, 40, 30, 3)
    assert "over 2 ranks" in bn_batch_note("train", True, 40, 64, 2)  # one chunk: each shard is its batch


@pytest.mark.slow
def test_torchrun_bn_train_without_batch_size_says_each_shard_is_a_batch(tmp_path):
    """Issue 27 item 5: under 2 ranks, --bn-mode train with no --batch-size makes each rank's shard the
    BatchNorm batch (results differ from one process): rank 0 says so, once; one process says nothing."""
    sys.path.insert(0, str(Path(__file__).parent))
    from clitools import run_cli

    from sam_probe.commands.train_cmd import write_run

    run = tmp_path / "run"
    write_run(run, optimizer="sgd", model="cnn", model_args={"width": 2}, data="digits", max_samples=41, steps=1,
              lr=0.1, batch_size=41, checkpoint_every=1, seed=0)
    ck = sorted(run.glob("*.pt"))[-1]
    args = ["sharpness", str(ck), "--data", "digits", "--max-samples", "41", "--bn-mode", "train", "--top-k", "1",
            "--tol", "1e-2", "--rho", "0", "--no-store", "--no-plot", "--json"]
    one = run_cli(*args)
    assert one.code == 0 and "BatchNorm batch" not in one.stderr, one.stderr
    procs = run_ranks([sys.executable, "-m", "sam_probe", *args], 2)
    assert [p.returncode for p in procs] == [0, 0], procs[0].stderr[-2000:] + procs[1].stderr[-2000:]
    notes = [ln for ln in procs[0].stderr.splitlines() if "BatchNorm batch" in ln]
    assert len(notes) == 1 and "--bn-mode train over 2 ranks" in notes[0], procs[0].stderr
    assert "BatchNorm batch" not in procs[1].stderr  # rank 0 alone speaks


def test_shard_range_covers_selection_once():
    for n, world, chunk in [(37, 2, None), (37, 3, 4), (5, 8, None), (10, 3, 4), (10, 4, 100)]:
        ranges = [distributed.shard_range(n, world, r, chunk) for r in range(world)]
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        if chunk and -(-n // chunk) >= world:  # whole chunks: every boundary a multiple of chunk
            assert all(lo % chunk == 0 for lo, _ in ranges)


def test_empty_shard_contributes_nothing():
    """A rank with no samples (subset smaller than the world) adds zeros: rank 0 of 2 on 1 sample."""
    from sam_probe.core.objective import Objective

    model, x, y = problem(False)
    obj = Objective(model, x[:1], y[:1], "ce", shard=False)
    obj.sharded, obj.world, obj.rank = True, 2, 0
    obj.lo, obj.hi = distributed.shard_range(1, 2, 0)
    assert obj.n_local == 0
    obj._reduce = lambda t: t  # no group here: this rank's own contribution
    assert obj.evaluate() == (0.0, 0.0)
    assert float(obj.grad_flat().abs().max()) == 0.0
    assert float(obj.hvp_block(torch.ones(obj.n_params, 2)).abs().max()) == 0.0


if __name__ == "__main__":
    worker(sys.argv[1])
