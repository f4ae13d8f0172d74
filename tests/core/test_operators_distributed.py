"""Every curvature operator, per-layer spectra and the sharpness measures: 2 gloo ranks = 1 process (float64).

The workers are this file run as a script with torchrun's environment (see tests/test_distributed.py).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from sam_probe import distributed

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_distributed import close, run_ranks  # noqa: E402

pytestmark = pytest.mark.slow  # gloo ranks as processes (pytest -m "not slow" skips it)

N = 37  # odd: shards of 19 and 18 samples


def analyse() -> dict:
    from sam_probe.core.density import curvature_density
    from sam_probe.core.lanczos import top_eigen
    from sam_probe.core.objective import Objective
    from sam_probe.core.operators import CURVATURES, curvature_operator
    from sam_probe.core.per_layer import per_layer_spectra
    from sam_probe.core.sharpness_measures import average_case_sharpness, worst_case_sharpness
    from sam_probe.core.trace import curvature_trace

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (N,), generator=g)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    obj = Objective(model, x, y, "ce", chunk_size=5, vector_block=2)
    V = torch.randn(obj.n_params, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out: dict = {"n_local": obj.n_local}
    for name in CURVATURES:
        op = curvature_operator(obj, name, mc_samples=3, seed=4)
        eig = top_eigen(op, 3, tol=1e-10, max_hvp=400)
        out[name] = {
            "matmat": op.matmat(V).reshape(-1).tolist(),
            "eigenvalues": eig.eigenvalues, "n_hvp": eig.n_hvp,
            "trace": curvature_trace(op, "hutch++", tol=1e-3, max_hvp=60, seed=1).estimate,
            "density_mean": curvature_density(op, steps=10, n_probes=2, seed=3).mean,
            "per_layer": [r.to_dict() for r in per_layer_spectra(op, exact_max=24, tol=1e-8, trace_max_hvp=40)],
        }
    out["worst"] = worst_case_sharpness(obj, 0.1, steps=5, m=10).to_dict()
    out["worst_adaptive_linf"] = worst_case_sharpness(obj, 0.1, steps=5, variant="linf", adaptive=True).to_dict()
    out["average"] = average_case_sharpness(obj, 0.1, samples=4).to_dict()
    return out


def worker(outdir: str) -> None:
    distributed.init("cpu")
    try:
        Path(outdir, f"rank{distributed.rank()}.json").write_text(json.dumps(analyse()))
    finally:
        distributed.shutdown()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ranks")
    procs = run_ranks([sys.executable, __file__, str(out)], 2, timeout=300)
    for p in procs:
        assert p.returncode == 0, p.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_two_gloo_ranks_match_one_process(two_ranks):
    one = analyse()
    r0, r1 = two_ranks
    assert (r0.pop("n_local"), r1.pop("n_local"), one.pop("n_local")) == (20, 17, N)
    assert r0 == r1  # identical on every rank
    from sam_probe.core.names import CURVATURES

    for name in CURVATURES:
        assert one[name]["n_hvp"] == r0[name]["n_hvp"], name
        ma, mb = torch.tensor(one[name].pop("matmat")), torch.tensor(r0[name].pop("matmat"))
        assert torch.allclose(ma, mb, rtol=1e-8, atol=1e-12 * float(ma.abs().max())), name  # H - G: cancelling
        assert min(abs(v) for v in one[name]["eigenvalues"]) > 1e-4, name
        for a, b in zip(one[name]["per_layer"], r0[name]["per_layer"]):  # rounding-level residuals differ
            ra, rb = a.pop("residual"), b.pop("residual")
            if abs(a["top_eigenvalue"]) <= 1e-12:  # H - G is exactly 0 on the last layer: rounding only
                for key in ("top_eigenvalue", "trace", "trace_se"):
                    assert max(abs(a.pop(key)), abs(b.pop(key))) <= 1e-12, (name, key)
                for key in ("warnings", "converged"):  # a relative residual of a zero matrix is noise
                    a.pop(key, None), b.pop(key, None)
                continue
            assert max(ra, rb) <= 1e-8, (name, a)
            assert abs(a.pop("trace_se") - b.pop("trace_se")) <= 1e-8 * abs(a["trace"]) + 1e-15
    close(one, r0, rel=1e-8)


if __name__ == "__main__":
    worker(sys.argv[1])
