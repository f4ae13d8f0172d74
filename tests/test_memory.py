"""``--max-memory``: measured peaks, the linear memory model, planned chunks, unchanged results."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from sam_probe.core.memory import BLOCK_VECTORS, fit_memory, parse_memory, peak_bytes, plan_memory
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
    budget = int(probe.fixed + 44 * vec + BLOCK_VECTORS * 8 * vec + 10.5 * probe.per_sample)  # room for ~10 samples
    plan = plan_memory(obj, budget)
    assert plan.vector_block == 8 and plan.fits and 1 < plan.chunk_size < len(x)

    def need(c):  # the documented rule with the plan's own fitted numbers
        return plan.fixed + 44 * vec + BLOCK_VECTORS * plan.vector_block * vec + plan.per_sample * c

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
    tiny = plan_memory(obj, 40 * vec)
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
