"""``--max-memory``: measured peaks, the linear memory model, planned chunks, unchanged results."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from sam_probe.core.memory import BLOCK_VECTORS, RESERVE_K, fit_memory, parse_memory, peak_bytes, plan_memory
from sam_probe.core.vectors import WORK_VECTORS
from sam_probe.core.objective import Objective


def test_parse_memory():
    assert parse_memory("2GB") == 2 * 2 ** 30
    assert parse_memory("512MiB") == 512 * 2 ** 20
    assert parse_memory("1.5g") == int(1.5 * 2 ** 30)
    assert parse_memory("800000") == 800000
    assert parse_memory("64 kb") == 64 * 1024
    for bad in ("abc", "-1GB", "0", "2 PB", ""):
        with pytest.raises(ValueError):
            parse_memory(bad)


def test_peak_bytes_sees_a_known_allocation():
    n = 8_000_000

    def alloc():
        a = torch.empty(n, dtype=torch.uint8).fill_(1)
        b = torch.empty(n // 2, dtype=torch.uint8).fill_(1)  # both alive: peak 1.5 n
        return int(a[0]) + int(b[0])

    peak = peak_bytes(alloc, "cpu")
    assert 1.5 * n <= peak <= 1.5 * n + 200_000


def conv_problem(n=48):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 5))
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 5, (n,), generator=g)


def test_plan_spends_the_budget_and_results_do_not_change():
    model, x, y = conv_problem()
    obj = Objective(model, x, y, dtype=torch.float64)
    probe = plan_memory(obj, "1GB")
    vec = probe.vector_bytes
    R = probe.reserve_vectors
    assert R == RESERVE_K + WORK_VECTORS  # k + c for k up to 10 (it was 44: a 20-row basis and its products)
    budget = int(probe.fixed + R * vec + BLOCK_VECTORS * 8 * vec + 10.5 * probe.per_sample)  # room for ~10 samples
    plan = plan_memory(obj, budget)
    assert plan.vector_block == 8 and plan.fits and 1 < plan.chunk_size < len(x)

    def need(c):  # the documented rule with the plan's own fitted numbers
        return plan.fixed + R * vec + BLOCK_VECTORS * plan.vector_block * vec + plan.per_sample * c

    assert need(plan.chunk_size) <= budget < need(plan.chunk_size + 1)
    assert plan.predicted_peak == pytest.approx(need(plan.chunk_size))
    small = fit_memory(obj, budget)
    assert 1 < small.chunk_size < len(x) and small.vector_block == 8
    V = torch.randn(obj.n_params, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(small.hvp_block(V), obj.hvp_block(V), rtol=1e-12, atol=1e-14)
    assert torch.allclose(small.grad_flat(), obj.grad_flat(), rtol=1e-12, atol=1e-15)
    # an ample budget: one chunk, the largest block; a budget below the reserve: block 1, chunk 1, flagged
    big = plan_memory(obj, "64GB")
    assert big.chunk_size == len(x) and big.vector_block == 8
    tiny = plan_memory(obj, (R - 4) * vec)
    assert (tiny.chunk_size, tiny.vector_block, tiny.fits) == (1, 1, False)
    # an explicit chunk wins over the planned one; graphs of every chunk are kept when all of them fit
    assert fit_memory(obj, budget, chunk_size=7).chunk_size == 7
    assert not plan.keep_graphs and not fit_memory(obj, budget, chunk_size=7).keep_graphs
    roomy = fit_memory(obj, "64GB", chunk_size=7)
    assert big.keep_graphs and roomy.keep_graphs and roomy.chunk_size == 7
    with roomy.reuse_graph():
        assert torch.allclose(roomy.hvp_block(V), obj.hvp_block(V), rtol=1e-12, atol=1e-14)


def test_cli_max_memory(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent / "commands"))
    from clitools import run_cli

    from sam_probe.commands.train_cmd import write_run

    run = tmp_path / "run"
    write_run(run, optimizer="sgd", model="mlp", model_args={"in_dim": 64, "hidden": [6], "out_dim": 10},
              data="digits", max_samples=40, steps=1, lr=0.1, batch_size=20, checkpoint_every=1, seed=0)
    ck = sorted(run.glob("*.pt"))[-1]
    args = ["sharpness", str(ck), "--data", "digits", "--max-samples", "40", "--dtype", "float64", "--top-k", "2",
            "--tol", "1e-9", "--json", "--no-store", "--no-plot"]
    plain, planned = run_cli(*args), run_cli(*args, "--max-memory", "300KB")
    assert plain.code == 0 and planned.code == 0, planned.stderr
    a, b = plain.json()["results"][0], planned.json()["results"][0]
    assert a["eigenvalues"] == pytest.approx(b["eigenvalues"], rel=1e-10)
    bad = run_cli(*args, "--max-memory", "lots")
    assert bad.code == 2 and "--max-memory" in bad.stderr
    bn = run_cli(*args, "--max-memory", "1GB", "--bn-mode", "train")
    assert bn.code == 2 and "--batch-size" in bn.stderr


# ------------------------------------------------- solvers in O(k·P) memory (issue 20, item 1)
# Peak memory is counted from torch's own allocator events (core/memory.py ``peak_bytes``: every
# allocation and free while the solver runs), in units of one parameter-sized vector, against the
# stated formula: deterministic, independent of the machine's load, and not the solver's own
# bookkeeping (which is checked against it too).
P_BIG = 100_000  # one float64 vector: 800 kB, so the small matrices of a solve (a few kB) do not matter
SLACK = 64 * 1024


def lowrank_op(P=P_BIG, rank=6, seed=0):
    """``A = diag(d) + U Uᵀ`` applied with one new ``[P, b]`` tensor per product (its output)."""
    from sam_probe.core.operators import CurvatureOperator

    g = torch.Generator().manual_seed(seed)
    d = torch.rand(P, generator=g, dtype=torch.float64) * 0.5
    U = torch.randn(P, rank, generator=g, dtype=torch.float64) * torch.linspace(0.02, 0.01, rank, dtype=torch.float64)

    class LowRank(CurvatureOperator):
        def _matmat(self, V):
            out = d[:, None] * V
            return out.addmm_(U, U.T @ V)

    return LowRank("lowrank", P, torch.float64, "cpu")


def vectors_of(fn) -> float:
    """Peak bytes allocated by torch while ``fn`` runs, in parameter-sized float64 vectors."""
    return peak_bytes(fn, "cpu") / (8 * P_BIG)


@pytest.mark.parametrize("k,b", [(1, 1), (5, 1), (3, 2)])
def test_lanczos_holds_at_most_k_plus_c_vectors(k, b):
    from sam_probe.core.lanczos import top_eigen
    from sam_probe.core.vectors import VectorCount

    op = lowrank_op()
    count = VectorCount()
    out = {}
    peak = peak_bytes(lambda: out.setdefault("r", top_eigen(op, k, tol=1e-6, block_size=b, count=count)), "cpu")
    res = out["r"]
    assert res.certified, res.warnings
    limit = k + max(WORK_VECTORS, 4 * b)
    assert peak <= limit * 8 * P_BIG + SLACK, (peak / (8 * P_BIG), limit)
    assert count.peak <= limit and count.live == k  # the solver's own count agrees; only the answer is left
    assert res.plan["vectors"] <= limit and res.plan["basis_device"] == "device"
    assert res.n_certify == k  # no stored products: the certificate cost k explicit products
    assert res.eigenvectors.shape == (P_BIG, k)


def test_lanczos_with_stored_products_obeys_its_formula_and_needs_no_extra_products():
    from sam_probe.core.lanczos import top_eigen, vectors_needed

    op = lowrank_op()
    out = {}
    peak = peak_bytes(lambda: out.setdefault("r", top_eigen(op, 4, tol=1e-6, max_vectors=60)), "cpu")
    res = out["r"]
    assert res.certified and res.plan["keep_products"] and res.n_certify == 0
    m = res.plan["basis_vectors"]
    assert m >= 20 and peak <= vectors_needed(4, 1, m, True) * 8 * P_BIG + SLACK
    lean = top_eigen(op, 4, tol=1e-6)
    assert lean.eigenvalues == pytest.approx(res.eigenvalues, rel=1e-6)


def test_trace_and_density_hold_at_most_c_vectors():
    from sam_probe.core.density import curvature_density
    from sam_probe.core.trace import curvature_trace

    op = lowrank_op()
    for fn in (lambda: curvature_trace(op, "hutch++", tol=1e-2, max_hvp=60),
               lambda: curvature_trace(op, "hutchinson", tol=1e-2, max_hvp=40),
               lambda: curvature_density(op, steps=15, n_probes=5)):
        assert vectors_of(fn) <= WORK_VECTORS + SLACK / (8 * P_BIG)


def test_solver_never_preallocates_a_basis_it_does_not_need():
    """A rank-2 operator: the Krylov space is exhausted after 3 vectors, so that is all the
    basis ever holds (the old solver allocated 2 x 21 vectors up front)."""
    from sam_probe.core.lanczos import lanczos

    g = torch.Generator().manual_seed(0)
    U = torch.randn(P_BIG, 2, generator=g, dtype=torch.float64)
    out = {}
    peak = vectors_of(lambda: out.setdefault("r", lanczos(lambda V: U @ (U.T @ V), P_BIG, 1, tol=1e-8)))
    assert out["r"].certified and peak <= 6 + SLACK / (8 * P_BIG)


def test_basis_in_files_takes_no_memory(tmp_path):
    from sam_probe.core.lanczos import top_eigen

    op = lowrank_op()
    out = {}
    peak = vectors_of(lambda: out.setdefault("r", top_eigen(op, 5, tol=1e-6, where=tmp_path)))
    res = out["r"]
    assert res.certified and res.plan["basis_device"].startswith("dir:") and res.plan["basis_vectors"] >= 20
    assert peak <= 5 + 3 + SLACK / (8 * P_BIG)  # the answer, the product, a row in flight
    assert list(tmp_path.iterdir()) == []  # files are unlinked as soon as they are mapped
    same = top_eigen(op, 5, tol=1e-6, max_basis=res.plan["basis_vectors"])
    assert same.eigenvalues == pytest.approx(res.eigenvalues, rel=1e-12) and same.n_hvp == res.n_hvp


def test_streamed_basis_in_column_blocks_equals_in_memory(tmp_path, monkeypatch):
    """Away from the compute device the basis is streamed through Gram–Schmidt in column blocks:
    with tiny blocks (many of them) the solve is the in-memory one."""
    from sam_probe.core import vectors
    from sam_probe.core.lanczos import lanczos

    g = torch.Generator().manual_seed(0)
    n = 5000
    d = torch.cat([torch.tensor([5.0, 4.0, 3.5], dtype=torch.float64), torch.rand(n - 3, generator=g, dtype=torch.float64)])
    mem = lanczos(lambda V: d[:, None] * V, n, 3, tol=1e-8, block_size=2)
    monkeypatch.setattr(vectors, "STREAM_CHUNK", 777)
    disk = lanczos(lambda V: d[:, None] * V, n, 3, tol=1e-8, block_size=2, where=tmp_path)
    assert disk.certified and disk.n_hvp == mem.n_hvp
    assert disk.eigenvalues == pytest.approx(mem.eigenvalues, rel=1e-13)
    assert torch.allclose(disk.eigenvectors.abs(), mem.eigenvectors.abs(), atol=1e-9)
    assert list(tmp_path.iterdir()) == []


SOLVE_SLOWLY = """
import sys, time, torch
from sam_probe.core.lanczos import lanczos
n = 200_000
d = torch.linspace(0, 1, n, dtype=torch.float64)
def product(V):
    print("product", flush=True)
    time.sleep(0.2)
    return d[:, None] * V
lanczos(product, n, 3, tol=1e-14, max_hvp=100_000, where=sys.argv[1])
"""


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/PID/maps (Linux)")
@pytest.mark.parametrize("sig", ["SIGINT", "SIGKILL"])
def test_basis_files_are_gone_after_ctrl_c_or_kill(tmp_path, sig):
    """The basis lives in DIR while the solve runs (mapped files, already unlinked); after Ctrl-C
    (or even SIGKILL) nothing is left there, and nothing was written anywhere else (TMPDIR)."""
    import os
    import signal
    import subprocess

    basis, tmp = tmp_path / "basis", tmp_path / "tmp"
    basis.mkdir()
    tmp.mkdir()
    script = tmp_path / "solve.py"
    script.write_text(SOLVE_SLOWLY)
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    p = subprocess.Popen([sys.executable, str(script), str(basis)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env,  # SIGINT as a terminal delivers it, also where pytest runs with it ignored
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for _ in range(4):  # a few products in: the basis has rows
            assert p.stdout.readline().strip() == "product"
        maps = Path(f"/proc/{p.pid}/maps").read_text()
        mapped = [line for line in maps.splitlines() if str(basis) in line]
        assert mapped and all("(deleted)" in line for line in mapped)  # in DIR, and already unlinked
        assert list(basis.iterdir()) == []
        p.send_signal(getattr(signal, sig))
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode != 0
    if sig == "SIGINT":
        assert "KeyboardInterrupt" in err
    assert list(basis.iterdir()) == [] and list(tmp.iterdir()) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_basis_in_pinned_host_memory_with_products_on_the_gpu():
    """--basis-device cpu: the basis in page-locked host memory, products on the GPU; the GPU holds
    the answer, the product and streamed blocks only; the numbers are the in-device ones."""
    from sam_probe.core.lanczos import lanczos

    n, k = 2_000_000, 4
    g = torch.Generator().manual_seed(0)
    d = torch.cat([torch.tensor([5.0, 4.0, 3.5, 3.0]), torch.rand(n - 4, generator=g)]).double().cuda()
    dev = lanczos(lambda V: d[:, None] * V, n, k, tol=1e-8, device="cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    host = lanczos(lambda V: d[:, None] * V, n, k, tol=1e-8, device="cuda", where="cpu")
    torch.cuda.synchronize()
    gpu_vectors = (torch.cuda.max_memory_allocated() - base) / (8 * n)
    assert host.certified and host.n_hvp == dev.n_hvp and host.plan["basis_device"] == "cpu"
    assert host.eigenvalues == pytest.approx(dev.eigenvalues, rel=1e-12)
    assert host.eigenvectors.is_cuda and gpu_vectors <= k + 3


# ------------------------------------------------- ratios at scale (issue 20, item 6)
def wide_mlp_objective(width=700):
    """~1M float32 parameters and 4 samples: one parameter-sized vector (4 MB) dwarfs the activations."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 10))
    g = torch.Generator().manual_seed(1)
    return Objective(model, torch.randn(4, 300, generator=g), torch.randint(0, 10, (4,), generator=g))


@pytest.mark.parametrize("variant,m", [("l2", None), ("asam", None), ("linf", 2)])
def test_ratios_hold_at_most_four_vectors_beyond_the_model_and_its_gradient(monkeypatch, variant, m):
    """``ratios`` (both gradients, codes packed chunk by chunk, the IRE flat mask) peaks at the
    gradient's own tensors plus <= 4 flat vectors (docs/metrics.md, "Memory of ratios, overlap,
    distance").  torch's allocations are counted by ``peak_bytes`` (the scratch vector of the
    selections and the bit planes are numpy views of torch buffers, so they are counted there);
    numpy's own (chunk temporaries) by tracemalloc in a second identical run; the sum of the two
    peaks bounds the joint one."""
    import tracemalloc

    from sam_probe.analyses.ratios import compute_ratios
    from sam_probe.core import perturb

    monkeypatch.setattr(perturb, "CHUNK", 1 << 14)  # many chunks; each chunk's temporaries stay small
    obj = wide_mlp_objective()
    vec = 4 * obj.n_params
    cfg = {"rho": 0.05, "variant": variant, "m": m, "eta": 0.01, "eps": 1e-12, "faithful": False,
           "edges": [1.2, 1.5, 2.0, 4.0, 8.0, 16.0], "ire_rank": 0.9}
    out = {}
    torch_peak = peak_bytes(lambda: out.setdefault("r", compute_ratios(obj, cfg)), "cpu")
    tracemalloc.start()
    try:
        compute_ratios(obj, cfg)
        numpy_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    gradient = vec  # the per-tensor gradient autograd returns
    assert numpy_peak < vec / 4  # numpy itself holds chunks, never a parameter-sized array
    assert torch_peak + numpy_peak <= gradient + 4 * vec + 2 * 2 ** 20, (torch_peak / vec, numpy_peak / vec)
    assert sum(out["r"]["counts"].values()) == obj.n_params
