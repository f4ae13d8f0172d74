"""Ratio-analysis benchmark: cost of ``ratio_analysis`` relative to one full gradient pass.

    python bench/ratios.py [--repeats 30] [--threads 2]

Model: digits MLP 64-256-256-10 ReLU (85,002 parameters, float32, seeded, briefly
trained with SGD), all 1797 samples of sklearn's load_digits, standardised, one chunk.
Goal (issue 5): ratio analysis <= 2.5x one gradient pass over the same data.

Each repeat times, interleaved, one ``Objective.grad_flat()`` and every
configuration (variants l2/linf/usam/asam, m-sharpness, faithful, without the
per-layer part, and the post-processing alone on given g, g~); the table shows
medians, the ratio of medians and the ratio of minima (robust on a busy machine).
m-sharpness is compared with one gradient pass over the same sub-batches.  Writes bench/results/ratios.json.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import environment, train, write_results  # noqa: E402

from sam_probe.core.objective import Objective  # noqa: E402
from sam_probe.core.perturb import perturbed_gradient, sub_batches  # noqa: E402
from sam_probe.core.ratios import ratio_analysis, ratio_from_gradients  # noqa: E402

GOAL = 2.5
M = 256


def build_objective() -> Objective:
    torch.manual_seed(0)
    X, y = load_digits(return_X_y=True)
    X = (X - X.mean(0)) / (X.std(0) + 1e-8)
    X = torch.tensor(X, dtype=torch.float32)
    y = torch.tensor(y)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    return Objective(train(model, X, y, epochs=2, lr=0.01), X, y)


def configs(obj: Objective) -> dict[str, callable]:
    pg = perturbed_gradient(obj, rho=0.05, variant="l2", with_loss=False)
    return {
        "l2": lambda: ratio_analysis(obj, rho=0.05, variant="l2"),
        "linf": lambda: ratio_analysis(obj, rho=0.05, variant="linf"),
        "usam": lambda: ratio_analysis(obj, rho=0.05, variant="usam"),
        "asam": lambda: ratio_analysis(obj, rho=0.5, variant="asam"),
        "l2 faithful": lambda: ratio_analysis(obj, rho=0.05, variant="l2", faithful=True),
        "l2 no per-layer": lambda: ratio_analysis(obj, rho=0.05, variant="l2", per_layer=False),
        f"l2 m={M}": lambda: ratio_analysis(obj, rho=0.05, variant="l2", m=M),
        "post-processing only": lambda: ratio_from_gradients(pg.grad, pg.perturbed_grad, obj.space),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "ratios.json"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    obj = build_objective()
    cfg = configs(obj)
    for f in [obj.grad_flat, *cfg.values()]:  # warm-up
        f()
    base_m = f"grad pass in sub-batches of {M}"
    grad_m = lambda: [sub.grad_flat() for sub, _ in sub_batches(obj, M)]  # noqa: E731
    grad_m()
    times: dict[str, list[float]] = {"grad pass": [], base_m: [], **{k: [] for k in cfg}}
    for _ in range(a.repeats):
        for name, f in [("grad pass", obj.grad_flat), (base_m, grad_m), *cfg.items()]:
            s = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - s)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["grad pass"]
    res = ratio_analysis(obj, rho=0.05, variant="l2")
    rows = []
    for k, v in med.items():
        ref = base_m if k == f"l2 m={M}" else "grad pass"
        rows.append({"config": k, "median_ms": 1e3 * v, "min_ms": 1e3 * min(times[k]), "baseline": ref,
                     "x_grad": v / med[ref], "x_grad_min": min(times[k]) / min(times[ref])})
    out = {
        "environment": environment(repeats=a.repeats),
        "model": "digits MLP 64-256-256-10 ReLU", "n_params": obj.n_params, "n_samples": obj.n_samples,
        "goal_x_grad": GOAL, "pass": med["l2"] / base <= GOAL,
        "rows": rows, "l2_result": res.to_dict() | {"per_layer": None},
    }
    print(f"ratio analysis vs one gradient pass: {out['model']}, P={obj.n_params}, N={obj.n_samples}, "
          f"{torch.get_num_threads()} threads, medians of {a.repeats}")
    print(f"  {'config':<34} {'median ms':>10} {'min ms':>8} {'x grad':>7} {'x (mins)':>8}")
    for r in rows:
        print(f"  {r['config']:<34} {r['median_ms']:>10.2f} {r['min_ms']:>8.2f} {r['x_grad']:>7.2f} "
              f"{r['x_grad_min']:>8.2f}")
    print(f"  (x grad: ratio of medians to one gradient pass; l2 m={M}: to one pass in the same sub-batches)")
    fr = res.fractions
    print("  l2 categories: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in fr.items()))
    print(f"  goal l2 <= {GOAL}x: {'PASS' if out['pass'] else 'FAIL'} ({med['l2'] / base:.2f}x)")
    write_results(a.out, out, time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
