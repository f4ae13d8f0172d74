"""Chunked HVPs with and without the kept graphs of every chunk (``--max-memory`` with room for
them sets ``keep_graphs``): top-5 eigenvalues at ``--tol 1e-3`` on the digits MLP (85,002
parameters, 1,797 samples), unchunked vs chunks of 128 rebuilt per HVP vs chunks of 128 kept,
interleaved, medians of 5.  Run: ``python bench/chunks.py`` (writes bench/results/chunks.json).
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import environment, write_results  # noqa: E402
from bench.curvature import build_mlp  # noqa: E402
from sam_probe.core.lanczos import top_eigen  # noqa: E402
from sam_probe.core.objective import Objective  # noqa: E402


def main() -> None:
    t_start = time.perf_counter()
    torch.set_num_threads(2)
    m, X, y = build_mlp()
    objs = {"unchunked": Objective(m, X, y, "ce"), "chunks of 128": Objective(m, X, y, "ce", chunk_size=128)}
    kept = Objective(m, X, y, "ce", chunk_size=128)
    kept.keep_graphs = True
    objs["chunks of 128, kept graphs"] = kept
    times: dict[str, list[float]] = {k: [] for k in objs}
    vals: dict[str, list[float]] = {}
    hvps: dict[str, int] = {}
    for name, obj in objs.items():  # warm-up
        top_eigen(obj, 5, tol=1e-3)
    for _ in range(5):
        for name, obj in objs.items():
            t0 = time.perf_counter()
            r = top_eigen(obj, 5, tol=1e-3)
            times[name].append(time.perf_counter() - t0)
            vals[name], hvps[name] = list(r.eigenvalues), r.n_hvp
    base = statistics.median(times["unchunked"])
    rows = {k: {"seconds": statistics.median(v), "per_unchunked": statistics.median(v) / base, "n_hvp": hvps[k],
                "eigenvalues": vals[k]} for k, v in times.items()}
    for k, r in rows.items():
        print(f"{k:<28} {r['seconds']:.3f} s  {r['per_unchunked']:.2f}x unchunked  {r['n_hvp']} HVPs")
    write_results(ROOT / "bench" / "results" / "chunks.json", {"environment": environment(repeats=5), "top5": rows},
                  time.perf_counter() - t_start)


if __name__ == "__main__":
    main()
