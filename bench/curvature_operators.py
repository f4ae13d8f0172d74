"""Curvature operators vs curvlinops, and warm-started solves (run through ``bench/curvature.py --operators``).

Needs ``pip install torch==2.13.0 curvlinops-for-pytorch`` (bench-only).  See the docstring of
bench/curvature.py for what is measured; every time is a median over ``repeats`` runs
(seeds 0..r-1) and every ratio the median of per-round ratios, the compared calls interleaved
round by round in this one process (a change of machine load hits both sides alike); the
load average is recorded.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import environment, write_results  # noqa: E402
from bench.curvature import build_cnn, build_mlp  # noqa: E402
from sam_probe.core.lanczos import top_eigen  # noqa: E402
from sam_probe.core.memory import peak_bytes  # noqa: E402
from sam_probe.core.objective import Objective  # noqa: E402
from sam_probe.core.operators import CURVATURES, curvature_operator  # noqa: E402
from sam_probe.core.trace import curvature_trace  # noqa: E402

CURVLINOPS = {"hessian": "HessianLinearOperator", "ggn": "GGNLinearOperator", "ef": "EFLinearOperator"}
K, TOL = 5, 1e-3


def curvlinops_operator(name: str, model: nn.Module, X, y):
    import curvlinops

    cls = getattr(curvlinops, CURVLINOPS[name])
    params = [p for p in model.parameters() if p.requires_grad]
    return cls(model, nn.CrossEntropyLoss(), params, [(X, y)], check_deterministic=False)


# ------------------------------------------------------------------ products
def _once(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def rounds(fns: dict, n: int) -> dict[str, list[float]]:
    """Seconds of every ``fns[name]()`` in ``n`` interleaved rounds (after one warm-up each), so a
    change of machine load hits all of them alike; ratios are then taken round by round."""
    for fn in fns.values():
        fn()
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(n):
        for k, fn in fns.items():
            out[k].append(_once(fn))
    return out


def _ratio(t: dict, a: str, b: str, per: float = 1.0) -> float:
    return statistics.median(x / per / y for x, y in zip(t[a], t[b]))


def product_costs(model, X, y, repeats: int) -> dict:
    """One product (1 vector; block of 5 per vector) as multiples of one gradient and of one
    kept-graph HVP: medians over interleaved rounds of the per-round ratios."""
    obj = Objective(model, X, y)
    P = obj.n_params
    gen = torch.Generator().manual_seed(0)
    v1, v5 = torch.randn(P, 1, generator=gen), torch.randn(P, 5, generator=gen)
    fns = {"grad": obj.grad_flat,
           "plain": lambda: torch.autograd.grad(nn.functional.cross_entropy(model(X), y), list(model.parameters()))}
    ctxs = []
    for name in CURVATURES:
        op = curvature_operator(obj, name)
        fns[f"{name}:fresh"] = lambda op=op: op.matmat(v1)
        kept = curvature_operator(obj, name)
        ctx = kept.context()
        ctx.__enter__()  # what the solvers use: kept graph / cached per-sample gradients
        ctxs.append(ctx)
        fns[f"{name}:kept"] = lambda op=kept: op.matmat(v1)
        fns[f"{name}:block5"] = lambda op=kept: op.matmat(v5)
    for name in CURVLINOPS:
        cl = curvlinops_operator(name, model, X, y)
        fns[f"cl-{name}:1"] = lambda cl=cl: cl @ v1[:, 0]
        fns[f"cl-{name}:5"] = lambda cl=cl: cl @ v5
    try:
        t = rounds(fns, max(3 * repeats, 9))
    finally:
        for ctx in reversed(ctxs):
            ctx.__exit__(None, None, None)
    out: dict = {"grad_ms": 1e3 * statistics.median(t["grad"]), "plain_autograd_grad_ms": 1e3 * statistics.median(t["plain"]),
                 "grad_per_plain_autograd": _ratio(t, "grad", "plain"), "sam_probe": {}, "curvlinops": {}}
    for name in CURVATURES:
        out["sam_probe"][name] = {
            "fresh_per_grad": _ratio(t, f"{name}:fresh", "grad"), "kept_per_grad": _ratio(t, f"{name}:kept", "grad"),
            "kept_per_hvp": _ratio(t, f"{name}:kept", "hessian:kept"),
            "block5_per_vec_per_grad": _ratio(t, f"{name}:block5", "grad", 5)}
    for name in CURVLINOPS:
        out["curvlinops"][name] = {"per_grad": _ratio(t, f"cl-{name}:1", "grad"),
                                   "per_hvp": _ratio(t, f"cl-{name}:1", "hessian:kept"),
                                   "block5_per_vec_per_grad": _ratio(t, f"cl-{name}:5", "grad", 5)}
    return out


# -------------------------------------------------------------------- top-5
def residuals(op64, vals, vecs) -> list[float]:
    V = torch.as_tensor(np.asarray(vecs), dtype=torch.float64)
    lam = torch.as_tensor(np.asarray(vals), dtype=torch.float64)
    R = op64.matmat(V) - V * lam
    return (R.norm(dim=0) / (lam.abs() * V.norm(dim=0))).tolist()


def top5(model, X, y, repeats: int) -> list[dict]:
    from scipy.sparse.linalg import LinearOperator, eigsh

    rows = []
    obj = Objective(model, X, y)
    obj64 = Objective(model, X, y, dtype=torch.float64)
    for name in CLI_ORDER:
        op64 = curvature_operator(obj64, name)
        ref = top_eigen(op64, K, tol=1e-9, max_hvp=2000)
        refv = np.asarray(ref.eigenvalues)

        def ours(seed):  # the seed varies the Lanczos start; the operator (MC Fisher draws: seed 0) is fixed
            op = curvature_operator(obj, name)
            t = time.perf_counter()
            r = top_eigen(op, K, tol=TOL, seed=seed)
            return time.perf_counter() - t, r.eigenvalues, r.eigenvectors.double(), r.n_hvp

        def theirs(seed):
            cl = curvlinops_operator(name, model, X, y)
            sc = cl.to_scipy()
            count = [0]

            def mv(v):
                count[0] += 1
                return sc.matvec(v)

            lin = LinearOperator(sc.shape, matvec=mv, dtype=sc.dtype)
            v0 = np.random.default_rng(seed).standard_normal(sc.shape[0])
            t = time.perf_counter()
            vals, vecs = eigsh(lin, k=K, which="LA", tol=TOL, v0=v0)
            sec = time.perf_counter() - t
            o = np.argsort(vals)[::-1]
            return sec, vals[o].tolist(), vecs[:, o], count[0]

        tools = [("sam-probe", ours)] + ([("curvlinops", theirs)] if name in CURVLINOPS else [])
        runs: dict[str, list] = {tool: [] for tool, _ in tools}
        for s in range(repeats):  # interleaved: load changes hit both tools alike
            for tool, fn in tools:
                runs[tool].append(fn(s))
        for tool, fn in tools:
            rs = runs[tool]
            rows.append({"curvature": name, "tool": tool, "seconds": statistics.median(r[0] for r in rs),
                         "n_products": statistics.median(r[3] for r in rs),
                         "max_rel_err": max(float(np.max(np.abs(np.sort(r[1])[::-1] - refv) / np.abs(refv)))
                                            for r in rs),
                         "max_residual_rechecked": max(max(residuals(op64, r[1], r[2])) for r in rs),
                         "peak_torch_bytes": peak_bytes(lambda: fn(0), "cpu"), "reference": ref.eigenvalues})
        if name in CURVLINOPS:
            rows[-1]["speedup_of_sam_probe"] = statistics.median(
                b[0] / a[0] for a, b in zip(runs["sam-probe"], runs["curvlinops"]))
    return rows


CLI_ORDER = ("hessian", "ggn", "fisher", "ef")


# ---------------------------------------------------------------- warm start
def warm_starts(run: Path) -> dict:
    """Top-5 at tol 1e-3 over every checkpoint of ``run``: cold vs warm-started from the previous
    checkpoint's Ritz vectors (products are deterministic: one pass); Hutch++ sketch likewise."""
    import sam_probe as sp

    cks = sorted(run.glob("*.pt"))
    objs = [sp.objective(str(c)) for c in cks]
    out: dict = {"run": str(run.relative_to(ROOT)), "n_params": objs[0].n_params, "n_samples": objs[0].n_samples,
                 "k": K, "tol": TOL, "checkpoints": [c.name for c in cks], "operators": {}}
    for name in ("hessian", "ggn"):
        cold, warm, diffs, secs_c, secs_w, trc, trw, tr_z = [], [], [], [], [], [], [], []
        prev = None
        for obj in objs:
            t = time.perf_counter()
            c = top_eigen(curvature_operator(obj, name), K, tol=TOL)
            secs_c.append(time.perf_counter() - t)
            t = time.perf_counter()
            w = top_eigen(curvature_operator(obj, name), K, tol=TOL, warm=prev)
            secs_w.append(time.perf_counter() - t)
            assert c.all_converged and w.all_converged
            cold.append(c.n_hvp)
            warm.append(w.n_hvp)
            diffs.append(max(abs(a - b) / abs(a) for a, b in zip(c.eigenvalues, w.eigenvalues)))
            tc = curvature_trace(curvature_operator(obj, name), "hutch++", tol=1e-2)
            tw = curvature_trace(curvature_operator(obj, name), "hutch++", tol=1e-2, warm=prev)
            trc.append(tc.n_hvp)
            trw.append(tw.n_hvp)
            tr_z.append(abs(tc.estimate - tw.estimate) / (tc.se ** 2 + tw.se ** 2) ** 0.5)
            prev = w.eigenvectors
        out["operators"][name] = {
            "cold_n_hvp": cold, "warm_n_hvp": warm, "cold_total": sum(cold), "warm_total": sum(warm),
            "ratio_total": sum(cold) / sum(warm),
            "ratio_after_first_two": sum(cold[2:]) / sum(warm[2:]),
            "max_rel_eigenvalue_diff": max(diffs), "cold_seconds": sum(secs_c), "warm_seconds": sum(secs_w),
            "hutchpp_cold_n_hvp": trc, "hutchpp_warm_n_hvp": trw,
            "hutchpp_ratio_total": sum(trc) / sum(trw), "hutchpp_max_diff_in_se": max(tr_z),
        }
    return out


# ---------------------------------------------------------------- report
def report(res: dict) -> str:
    lines = []
    for m in res["models"]:
        p = m["products"]
        lines.append(f"== {m['model']}: {m['n_params']:,} parameters, {m['n_samples']} samples, float32 ==")
        lines.append(f"one gradient {p['grad_ms']:.1f} ms ({p['grad_per_plain_autograd']:.2f}x a plain autograd gradient); "
                     "one product as multiples of a gradient (fresh / kept graph / block of 5 per vector), "
                     "and of a kept-graph HVP:")
        for name, r in p["sam_probe"].items():
            lines.append(f"  sam-probe  {name:<8} {r['fresh_per_grad']:5.2f}x / {r['kept_per_grad']:5.2f}x / "
                         f"{r['block5_per_vec_per_grad']:5.2f}x   = {r['kept_per_hvp']:.2f} HVP")
        for name, r in p["curvlinops"].items():
            lines.append(f"  curvlinops {name:<8} {r['per_grad']:5.2f}x (block of 5: {r['block5_per_vec_per_grad']:.2f}x/vec)"
                         f"   = {r['per_hvp']:.2f} HVP")
        lines.append(f"  top-{K} at residual {TOL:g}:")
        for r in m["top5"]:
            extra = f"  sam-probe {r['speedup_of_sam_probe']:.1f}x faster" if "speedup_of_sam_probe" in r else ""
            lines.append(f"  {r['tool']:<10} {r['curvature']:<8} {r['seconds']:7.3f} s {r['n_products']:5.0f} products, "
                         f"max rel err {r['max_rel_err']:.1e}, rechecked residual {r['max_residual_rechecked']:.1e}, "
                         f"peak {r['peak_torch_bytes'] / 2 ** 20:6.1f} MiB{extra}")
    w = res["warm_start"]
    lines.append(f"== warm starts over {len(w['checkpoints'])} checkpoints of {w['run']} (top-{K}, tol {TOL:g}) ==")
    for name, r in w["operators"].items():
        lines.append(f"  {name}: cold {r['cold_total']} HVPs, warm {r['warm_total']} ({r['ratio_total']:.2f}x fewer; "
                     f"{r['ratio_after_first_two']:.2f}x after the first two checkpoints), max rel eigenvalue diff "
                     f"{r['max_rel_eigenvalue_diff']:.1e}; per checkpoint cold {r['cold_n_hvp']} warm {r['warm_n_hvp']}")
        lines.append(f"    Hutch++ sketch: cold {sum(r['hutchpp_cold_n_hvp'])} warm {sum(r['hutchpp_warm_n_hvp'])} HVPs "
                     f"({r['hutchpp_ratio_total']:.2f}x), estimates within {r['hutchpp_max_diff_in_se']:.1f} SE")
    return "\n".join(lines)


def main(repeats: int, out: str) -> int:
    import curvlinops  # noqa: F401  (import cost outside the timings)

    t0 = time.perf_counter()
    res: dict = {"environment": environment(repeats=repeats, loadavg_start=os.getloadavg(),
                                            curvlinops=_version("curvlinops-for-pytorch")), "models": []}
    for name, build in (("mlp", build_mlp), ("cnn", build_cnn)):
        model, X, y = build()
        for p in model.parameters():
            p.requires_grad_(True)
        m = {"model": name, "n_params": sum(p.numel() for p in model.parameters()), "n_samples": len(X)}
        m["products"] = product_costs(model, X, y, repeats)
        m["top5"] = top5(model, X, y, repeats)
        res["models"].append(m)
    res["warm_start"] = warm_starts(ROOT / "sample_runs" / "digits-mlp-sgd")
    res["environment"]["loadavg_end"] = os.getloadavg()
    print(report(res), flush=True)
    write_results(out, res, time.perf_counter() - t0)
    return 0


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:  # pragma: no cover
        return None
