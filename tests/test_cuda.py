"""CUDA gives the CPU's numbers (float64); every test here skips without a GPU."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def problem():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    return model.double(), torch.randn(30, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (30,), generator=g)


@pytest.mark.parametrize("bn_mode", ["eval", "train"])
def test_objective_and_solvers_match_cpu(bn_mode):
    from sam_probe.core.lanczos import top_eigen
    from sam_probe.core.objective import Objective
    from sam_probe.core.ratios import ratio_analysis
    from sam_probe.core.trace import hessian_trace

    model, x, y = problem()
    res = {}
    for dev in ("cpu", "cuda"):
        obj = Objective(model, x, y, "ce", device=dev, bn_mode=bn_mode, chunk_size=10)
        V = torch.randn(obj.n_params, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        eig = top_eigen(obj, 3, tol=1e-10)
        res[dev] = dict(eval=obj.evaluate(), grad=obj.grad_flat().cpu(), hv=obj.hvp_block(V).cpu(),
                        eig=eig.eigenvalues, trace=hessian_trace(obj, "hutchinson", max_hvp=40, seed=1).estimate,
                        counts=ratio_analysis(obj, rho=0.05).counts)
    c, g = res["cpu"], res["cuda"]
    assert g["eval"][0] == pytest.approx(c["eval"][0], rel=1e-12) and g["eval"][1] == c["eval"][1]
    assert torch.allclose(g["grad"], c["grad"], rtol=1e-10, atol=1e-14)
    assert torch.allclose(g["hv"], c["hv"], rtol=1e-10, atol=1e-13)
    assert g["eig"] == pytest.approx(c["eig"], rel=1e-9)
    assert g["trace"] == pytest.approx(c["trace"], rel=1e-9)
    assert g["counts"] == c["counts"]


def test_peak_bytes_on_cuda():
    from sam_probe.core.memory import peak_bytes

    n = 8 * 2 ** 20
    peak = peak_bytes(lambda: torch.empty(n, dtype=torch.uint8, device="cuda").fill_(1), "cuda")
    assert n <= peak <= n + 2 ** 20


def test_auto_device_is_cuda():
    from sam_probe.pipeline import Settings

    assert Settings(device="auto").torch_device().type == "cuda"


def test_sharpness_cli_cuda_equals_cpu(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent / "commands"))
    from clitools import run_cli

    from sam_probe.commands.train_cmd import write_run

    run = tmp_path / "run"
    write_run(run, optimizer="sam", model="mlp", model_args={"in_dim": 64, "hidden": [6], "out_dim": 10},
              data="digits", max_samples=40, steps=1, lr=0.1, batch_size=20, checkpoint_every=1, seed=0)
    ck = sorted(run.glob("*.pt"))[-1]
    args = ["sharpness", str(ck), "--data", "digits", "--max-samples", "40", "--dtype", "float64", "--top-k", "3",
            "--tol", "1e-9", "--trace", "--json", "--no-store", "--no-plot"]
    out = {dev: run_cli(*args, "--device", dev) for dev in ("cpu", "cuda")}
    assert all(r.code == 0 for r in out.values()), out["cuda"].stderr
    a, b = (json.loads(out[d].stdout)["results"][0] for d in ("cpu", "cuda"))
    assert b["eigenvalues"] == pytest.approx(a["eigenvalues"], rel=1e-9)
    assert b["trace"] == pytest.approx(a["trace"], rel=1e-9)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="nccl test needs 2 GPUs")
def test_two_nccl_ranks_match_one_process(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_distributed import analyse, close, run_ranks

    script = tmp_path / "w.py"
    script.write_text(
        "import json, sys, torch\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from sam_probe import distributed\n"
        "from sam_probe.core import objective\n"
        "import test_distributed as t\n"
        "dev = distributed.rank_device(torch.device('cuda'))\n"
        "distributed.init(dev)\n"
        "orig = objective.Objective.__init__\n"
        "def on_gpu(self, *a, **k):\n"
        "    k.setdefault('device', dev); orig(self, *a, **k)\n"
        "objective.Objective.__init__ = on_gpu\n"
        "res = t.analyse(False)\n"
        "open(sys.argv[1] + f'/rank{distributed.rank()}.json', 'w').write(json.dumps(res))\n"
        "distributed.shutdown()\n")
    procs = run_ranks([sys.executable, str(script), str(tmp_path)], 2, {"CUDA_DEVICE_ORDER": os.environ.get(
        "CUDA_DEVICE_ORDER", "PCI_BUS_ID")})
    assert [p.returncode for p in procs] == [0, 0], procs[0].stderr[-2000:]
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    one = analyse(False)
    for k in ("eigenvalues", "trace", "counts", "chi", "loss"):
        close(one[k], r0[k], rel=1e-8, path=k)
