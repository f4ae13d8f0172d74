"""Peak memory and time of one gradient vs Hessian-vector products, ResNet-18, CIFAR-sized inputs.

    python bench/memory.py [--samples 64] [--device cpu] [--out bench/results/memory.json]

Random data (``N`` images 3x32x32, 10 classes), float32, BatchNorm in eval mode.
Each measurement runs in a fresh subprocess so that its peak is its own:

- ``rss_delta``: peak resident set size (``resource.getrusage`` maxrss) after the
  operation minus before it (model, data and objective already built);
- ``alloc_peak``: the peak of torch's allocator above its level before the operation
  (CPU: :mod:`torch.profiler` memory events; CUDA: ``max_memory_allocated``);
- ``seconds``: best of 2 runs; ``per_vector`` = seconds / block size.

Operations: ``grad`` (one full gradient), ``hvp`` with ``rev-rev`` and ``fwd-rev``
for vector blocks of 1, 4 and 8.  Then the ``--max-memory`` planner
(:mod:`sam_probe.core.memory`) for a few budgets, with the allocator peak of one
planned HVP block next to the planner's prediction of it.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import environment, write_results  # noqa: E402

KIB = 1024


def _maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) * (1 if sys.platform == "darwin" else KIB)


def child(spec: dict) -> dict:
    """One measurement (runs in its own process)."""
    import torch

    from sam_probe.core.memory import BLOCK_VECTORS, peak_bytes, plan_memory
    from sam_probe.core.objective import Objective
    from sam_probe.loading.models import build_model

    torch.manual_seed(0)
    dev = torch.device(spec["device"])
    model = build_model("resnet18", {})
    g = torch.Generator().manual_seed(1)
    x = torch.randn(spec["samples"], 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (spec["samples"],), generator=g)
    obj = Objective(model, x, y, "ce", device=dev, hvp_method=spec.get("method", "rev-rev"),
                    chunk_size=spec.get("chunk"))
    out: dict = {"n_params": obj.n_params}
    if spec["op"] == "plan":
        t0 = time.perf_counter()
        plan = plan_memory(obj, spec["budget"])
        out["plan_seconds"] = time.perf_counter() - t0
        out["plan"] = plan.to_dict()
        obj = obj.rechunked(plan.chunk_size, plan.vector_block)
        V = torch.randn(obj.n_params, plan.vector_block, generator=g).to(dev)
        sub = obj.subset(torch.arange(plan.chunk_size))
        out["alloc_peak"] = peak_bytes(lambda: sub.hvp_block(V), dev)
        out["predicted_op_peak"] = plan.fixed + BLOCK_VECTORS * plan.vector_block * plan.vector_bytes + plan.per_sample * \
            plan.chunk_size * (plan.vector_block if spec.get("method") == "fwd-rev" else 1)
        return out
    b = spec.get("block", 1)
    V = torch.randn(obj.n_params, b, generator=g).to(dev)
    op = obj.grad if spec["op"] == "grad" else (lambda: obj.hvp_block(V))
    base = _maxrss_bytes()
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        op()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t0)
    out["rss_delta"] = _maxrss_bytes() - base
    out["alloc_peak"] = peak_bytes(op, dev)
    out["seconds"] = min(times)
    out["per_vector"] = min(times) / b if spec["op"] == "hvp" else min(times)
    return out


def run_child(spec: dict) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps(spec)]
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or ["failed"])[-1][:300]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def mb(x) -> str:
    return "-" if x is None else f"{x / 2 ** 20:8.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--blocks", default="1,4,8")
    ap.add_argument("--budgets", default="2.5GB,3GB,4GB")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "memory.json"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    t_start = time.perf_counter()
    base = {"samples": args.samples, "device": args.device}
    rows = []
    grad = {**base, "op": "grad", **run_child({**base, "op": "grad"})}
    rows.append(grad)
    print(f"{'op':8} {'method':8} {'block':>5} {'s/vector':>9} {'x grad':>7} {'alloc MiB':>9} {'rss MiB':>8}")

    def show(r):
        ratio = r.get("per_vector", float("nan")) / grad["seconds"] if "seconds" in grad else float("nan")
        r["per_vector_over_grad"] = ratio
        if "error" in r:
            print(f"{r['op']:8} {r.get('method', ''):8} {r.get('block', ''):>5} error: {r['error']}")
            return
        print(f"{r['op']:8} {r.get('method', ''):8} {r.get('block', ''):>5} {r['per_vector']:9.2f} {ratio:7.2f} "
              f"{mb(r['alloc_peak']):>9} {mb(r['rss_delta']):>8}", flush=True)

    show(grad)
    for method in ("rev-rev", "fwd-rev"):
        for b in map(int, args.blocks.split(",")):
            spec = {**base, "op": "hvp", "method": method, "block": b}
            r = {**spec, **run_child(spec)}
            rows.append(r)
            show(r)
    plans = []
    print(f"\n--max-memory plans (reserve 44 vectors of {grad.get('n_params', 0) * 4 / 2 ** 20:.0f} MiB each)")
    print(f"{'budget':>8} {'chunk':>6} {'block':>6} {'a MiB/sample':>13} {'op peak MiB':>12} {'predicted':>10} {'plan s':>7}")
    for budget in args.budgets.split(","):
        spec = {**base, "op": "plan", "budget": budget}
        r = {**spec, **run_child(spec)}
        plans.append(r)
        if "error" in r:
            print(f"{budget:>8} error: {r['error']}")
            continue
        p = r["plan"]
        print(f"{budget:>8} {p['chunk_size']:6d} {p['vector_block']:6d} {p['per_sample'] / 2 ** 20:13.2f} "
              f"{mb(r['alloc_peak']):>12} {mb(r['predicted_op_peak']):>10} {r['plan_seconds']:7.1f}", flush=True)
    results = {"benchmark": "memory", "model": "resnet18", "data": f"random {args.samples}x3x32x32, 10 classes",
               "dtype": "float32", "environment": environment(device=args.device), "rows": rows, "plans": plans,
               "notes": "CPU only in this run (no GPU was available); rss_delta is the growth of the process's "
                        "peak RSS during the first call, alloc_peak torch's allocator peak above its prior level."}
    write_results(args.out, results, time.perf_counter() - t_start)


if __name__ == "__main__":
    main()
