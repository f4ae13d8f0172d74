"""Curvature benchmark: sam-probe vs PyHessian 0.1 (Hessian) and vs curvlinops (every operator),
side by side in one process.

    python bench/curvature.py [--repeats 3] [--threads 2] [--quick]          # vs PyHessian
    python bench/curvature.py --operators [--repeats 5] [--threads 2]       # vs curvlinops, warm starts

The ``--operators`` part needs curvlinops, a bench-only dependency (not a package
dependency), installed into the same virtual environment with torch pinned:

    pip install torch==2.13.0 curvlinops-for-pytorch

(its dependency backpack-for-pytorch pulls a torchvision that the operators used here do
not need; when that torchvision does not match the installed torch — ``operator
torchvision::nms does not exist`` on import — ``pip uninstall torchvision``.)

It writes bench/results/curvature_operators.json: the cost of one product of every
operator (hessian, ggn, fisher, ef) relative to a gradient and to an HVP; time, products
and peak torch memory to the top-5 eigenpairs at relative residual 1e-3 for sam-probe's
operators + certified Lanczos and for curvlinops' ``HessianLinearOperator`` /
``GGNLinearOperator`` / ``EFLinearOperator`` + scipy ``eigsh`` (ARPACK, ``tol=1e-3``,
whose stopping test is the same relative residual), with both results' residuals
recomputed by our own operator and their eigenvalues against a float64 reference; and
the warm-start savings over the checkpoints of sample_runs/digits-mlp-sgd.

Models (seeded, float32, all 1797 digits samples, standardised):
  mlp: 64-256-256-10 ReLU (85,002 parameters), briefly trained with SGD
  cnn: Conv(1,4)-BN-ReLU-pool-Conv(4,8)-BN-ReLU-pool-Linear(32,10) (690 parameters), BN in eval mode

References: top-5 eigenvalues by our Lanczos at tol 1e-10 in float64 (checked
against dense eigenvalues for the CNN); exact trace: for the ReLU MLP
tr(H) = tr(GGN) (f is piecewise linear in each layer's parameters, so the diagonal of
Σ_c r_c ∇²f_c vanishes; checked on a small ReLU MLP against a dense Hessian), for the
CNN the trace of the dense Hessian.  Medians of ``repeats`` runs (seeds 0..r-1);
errors are the worst over the repeats.  Writes bench/results/curvature.json.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.func import functional_call, jacrev, vmap

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import environment, train, write_results  # noqa: E402
from sam_probe.core.dense import dense_hessian  # noqa: E402
from sam_probe.core.lanczos import top_eigen  # noqa: E402
from sam_probe.core.objective import Objective  # noqa: E402
from sam_probe.core.pyhessian_backend import run_pyhessian  # noqa: E402
from sam_probe.core.trace import hessian_trace  # noqa: E402


# ------------------------------------------------------------------ setup
def digits(image: bool) -> tuple[torch.Tensor, torch.Tensor]:
    X, y = load_digits(return_X_y=True)
    X = (X - X.mean(0)) / (X.std(0) + 1e-8)
    X = torch.tensor(X, dtype=torch.float32)
    return (X.reshape(-1, 1, 8, 8) if image else X), torch.tensor(y)


def build_mlp():
    torch.manual_seed(0)
    X, y = digits(False)
    m = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    return train(m, X, y, epochs=2, lr=0.01), X, y


def build_cnn():
    torch.manual_seed(0)
    X, y = digits(True)
    m = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                      nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                      nn.Flatten(), nn.Linear(32, 10))
    return train(m, X, y, epochs=3, lr=0.02), X, y


# ------------------------------------------------------------- references
def ggn_trace(model: nn.Module, X, y, chunk: int = 32) -> float:
    """tr(J^T H_out J)/N with H_out = diag(p) - p p^T (CE), from per-sample Jacobians, float64."""
    params = {k: v.detach().double() for k, v in model.named_parameters()}

    def f1(p, x):
        return functional_call(model, p, (x[None],))[0]

    jac = vmap(jacrev(f1), in_dims=(None, 0))
    total = 0.0
    for s in range(0, len(X), chunk):
        x = X[s:s + chunk].double()
        J = jac(params, x)
        J = torch.cat([J[k].reshape(len(x), -1, params[k].numel()) for k in params], 2)  # [B, C, P]
        p = torch.softmax(functional_call(model, params, (x,)), 1)
        sq = (J * J).sum(2)  # ||J_nc||^2
        pj = torch.einsum("bc,bcp->bp", p, J)
        total += float((p * sq).sum() - (pj * pj).sum())
    return total / len(X)


def check_ggn_identity() -> float:
    """On a small ReLU MLP: |tr(H) - tr(GGN)| / tr(H) (should be ~1e-15)."""
    torch.manual_seed(3)
    m = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    X, y = torch.randn(50, 5), torch.randint(0, 4, (50,))
    exact = float(torch.trace(dense_hessian(Objective(m, X, y, "ce", dtype=torch.float64))))
    return abs(exact - ggn_trace(m, X, y)) / abs(exact)


# --------------------------------------------------------------- helpers
def median_time(fn, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def max_rel_err(vals, ref) -> float:
    a = np.sort(np.asarray(vals, dtype=float))[::-1]
    b = np.asarray(ref, dtype=float)
    return float(np.max(np.abs(a - b) / np.abs(b)))


def primitive_costs(model, X, y, repeats: int) -> dict:
    obj = Objective(model, X, y)
    fwd = Objective(model, X, y, hvp_method="fwd-rev")
    P = obj.n_params
    g = torch.Generator().manual_seed(0)
    v1, v5 = torch.randn(P, 1, generator=g), torch.randn(P, 5, generator=g)
    r = max(repeats, 7)
    t_grad = median_time(obj.grad_flat, r)
    out = {"grad_ms": 1e3 * t_grad}
    out["hvp_rev_rev"] = median_time(lambda: obj.hvp_block(v1), r) / t_grad
    out["hvp_fwd_rev"] = median_time(lambda: fwd.hvp_block(v1), r) / t_grad
    out["block5_rev_rev_per_vec"] = median_time(lambda: obj.hvp_block(v5), r) / 5 / t_grad
    out["block5_fwd_rev_per_vec"] = median_time(lambda: fwd.hvp_block(v5), r) / 5 / t_grad
    with obj.reuse_graph():
        out["hvp_cached_graph"] = median_time(lambda: obj.hvp_block(v1), r) / t_grad
    return out


def run_rows(label, fn, seeds, ref) -> dict:
    """fn(seed) -> (eigenvalues, n_hvp, seconds, extra)"""
    times, hvps, errs, extra = [], [], [], None
    for s in seeds:
        vals, n_hvp, sec, extra = fn(s)
        times.append(sec)
        hvps.append(n_hvp)
        errs.append(max_rel_err(vals, ref))
    return {"method": label, "seconds": statistics.median(times), "n_hvp": statistics.median(hvps),
            "max_rel_err": max(errs), **(extra or {})}


def eigen_bench(model, X, y, ref, seeds, pyhessian_tols, chunked: bool) -> list[dict]:
    rows = []
    obj = Objective(model, X, y)

    def ours(tol, b):
        def fn(seed):
            t = time.perf_counter()
            r = top_eigen(obj, 5, tol=tol, block_size=b, seed=seed)
            sec = time.perf_counter() - t
            return r.eigenvalues, r.n_hvp, sec, {"converged": all(r.converged), "max_residual": max(r.residuals)}
        return fn

    for tol, b in [(1e-2, 1), (1e-3, 1), (1e-4, 1), (1e-3, 5)]:
        rows.append({"tool": "sam-probe", **run_rows(f"lanczos b={b} tol={tol:g}", ours(tol, b), seeds, ref)})

    def ph(tol, o, max_iter=100):
        def fn(seed):
            r = run_pyhessian(o, 5, tol=tol, max_iter=max_iter, seed=seed, residuals=True)
            return r.eigenvalues, r.n_hvp_eigen, r.seconds_setup + r.seconds_eigen, {"max_residual": max(r.residuals)}
        return fn

    for tol, max_iter in pyhessian_tols:
        label = f"power iteration tol={tol:g}" + (" (default)" if (tol, max_iter) == (1e-3, 100) else "")
        label += f", maxIter={max_iter}" if max_iter != 100 else ""
        rows.append({"tool": "pyhessian", **run_rows(label, ph(tol, obj, max_iter), seeds, ref)})
    if chunked:  # chunks of 128: PyHessian's DataLoader mode vs our chunked objective
        o128 = Objective(model, X, y, chunk_size=128)
        rows.append({"tool": "pyhessian", **run_rows("power iteration tol=0.001, DataLoader batch 128",
                                                     ph(1e-3, o128), seeds, ref)})

        def ours128(seed):
            r, sec = timed(lambda: top_eigen(o128, 5, tol=1e-3, seed=seed))
            return r.eigenvalues, r.n_hvp, sec, {"converged": all(r.converged)}

        rows.append({"tool": "sam-probe", **run_rows("lanczos b=1 tol=0.001, chunks of 128", ours128, seeds, ref)})
    return rows


def timed(fn):
    t = time.perf_counter()
    r = fn()
    return r, time.perf_counter() - t


def trace_bench(model, X, y, exact, seeds) -> list[dict]:
    obj = Objective(model, X, y)
    rows = []
    configs = [
        ("sam-probe", "hutch++ (krylov, rank 20) tol=1e-2",
         lambda s: hessian_trace(obj, "hutch++", tol=1e-2, seed=s)),
        ("sam-probe", "hutch++ (krylov, rank 20) max_hvp=100",
         lambda s: hessian_trace(obj, "hutch++", tol=1e-9, max_hvp=100, seed=s)),
        ("sam-probe", "hutchinson max_hvp=100",
         lambda s: hessian_trace(obj, "hutchinson", tol=1e-9, max_hvp=100, seed=s)),
        ("pyhessian", "hutchinson (default tol=1e-3, maxIter=100)",
         lambda s: run_pyhessian(obj, eigen=False, trace=True, seed=s)),
    ]
    for tool, label, fn in configs:
        secs, hvps, errs, ses = [], [], [], []
        for s in seeds:
            r, sec = timed(lambda: fn(s))
            if tool == "pyhessian":
                est, se, n, sec = r.trace, r.trace_se, r.n_hvp_trace, r.seconds_setup + r.seconds_trace
            else:
                est, se, n = r.estimate, r.se, r.n_hvp
            secs.append(sec)
            hvps.append(n)
            errs.append(abs(est - exact) / abs(exact))
            ses.append(se / abs(exact))
        rows.append({"tool": tool, "method": label, "seconds": statistics.median(secs),
                     "n_hvp": statistics.median(hvps), "max_rel_err": max(errs),
                     "median_rel_err": statistics.median(errs), "median_rel_se": statistics.median(ses)})
    return rows


def equal_accuracy(rows: list[dict], targets=(1e-2, 1e-3, 1e-4, 1e-5)) -> list[dict]:
    """Fastest configuration of each tool reaching max relative error <= target."""
    out = []
    for t in targets:
        best = {}
        for tool in ("sam-probe", "pyhessian"):
            ok = [r for r in rows if r["tool"] == tool and r["max_rel_err"] <= t]
            best[tool] = min(ok, key=lambda r: r["seconds"]) if ok else None
        if best["sam-probe"] and best["pyhessian"]:
            out.append({"target_rel_err": t, "sam_probe": best["sam-probe"]["method"],
                        "pyhessian": best["pyhessian"]["method"],
                        "speedup": best["pyhessian"]["seconds"] / best["sam-probe"]["seconds"],
                        "hvp_ratio": best["pyhessian"]["n_hvp"] / best["sam-probe"]["n_hvp"]})
        else:
            out.append({"target_rel_err": t, "sam_probe": best["sam-probe"] and best["sam-probe"]["method"],
                        "pyhessian": None, "speedup": None, "hvp_ratio": None})
    return out


# ---------------------------------------------------------------- report
def fmt_rows(title: str, rows: list[dict]) -> str:
    lines = [title, f"  {'tool':<10} {'method':<48} {'seconds':>8} {'HVPs':>6} {'max rel err':>12}"]
    for r in rows:
        lines.append(f"  {r['tool']:<10} {r['method']:<48} {r['seconds']:>8.3f} {r['n_hvp']:>6.0f} "
                     f"{r['max_rel_err']:>12.2e}")
    return "\n".join(lines)


def bench_model(name: str, build, repeats: int, pyhessian_tols, chunked: bool) -> dict:
    t0 = time.perf_counter()
    model, X, y = build()
    P = sum(p.numel() for p in model.parameters())
    seeds = list(range(repeats))
    loss, acc = Objective(model, X, y).evaluate()
    res: dict = {"model": name, "n_params": P, "n_samples": len(X), "loss": loss, "accuracy": acc}
    res["primitives"] = primitive_costs(model, X, y, repeats)

    obj64 = Objective(model, X, y, dtype=torch.float64)
    ref, sec = timed(lambda: top_eigen(obj64, 5, tol=1e-10, max_hvp=3000))
    res["reference"] = {"eigenvalues": ref.eigenvalues, "residuals": ref.residuals, "n_hvp": ref.n_hvp,
                        "seconds": sec, "converged": all(ref.converged)}
    if name == "mlp":
        res["reference"]["trace"] = ggn_trace(model, X, y)
        res["reference"]["trace_method"] = "exact tr(GGN) (ReLU MLP identity)"
        res["reference"]["ggn_identity_check_rel_diff"] = check_ggn_identity()
    else:
        H = dense_hessian(Objective(model, X, y), block_size=128).double()
        dense_top = torch.linalg.eigvalsh(H).flip(0)[:5].tolist()
        res["reference"]["trace"] = float(torch.trace(H))
        res["reference"]["trace_method"] = "dense Hessian (float32 HVPs)"
        res["reference"]["dense_vs_lanczos_max_rel_diff"] = max_rel_err(dense_top, ref.eigenvalues)
    res["eigen"] = eigen_bench(model, X, y, ref.eigenvalues, seeds, pyhessian_tols, chunked)
    res["equal_accuracy"] = equal_accuracy(res["eigen"])
    ours_default = next(r for r in res["eigen"] if r["method"] == "lanczos b=1 tol=0.001")
    ph_default = next(r for r in res["eigen"] if r["method"].endswith("(default)"))
    res["defaults"] = {"speedup": ph_default["seconds"] / ours_default["seconds"],
                       "error_ratio": ph_default["max_rel_err"] / max(ours_default["max_rel_err"], 1e-300)}
    res["trace"] = trace_bench(model, X, y, res["reference"]["trace"], seeds)
    res["seconds_total"] = time.perf_counter() - t0
    return res


def report(res: dict) -> str:
    p = res["primitives"]
    ref = res["reference"]
    out = [f"== {res['model']}: {res['n_params']:,} parameters, {res['n_samples']} samples, float32, "
           f"loss {res['loss']:.3f}, accuracy {res['accuracy']:.3f} ==",
           f"one gradient {p['grad_ms']:.1f} ms; as multiples of one gradient: "
           f"HVP rev-rev {p['hvp_rev_rev']:.2f}x, fwd-rev {p['hvp_fwd_rev']:.2f}x, "
           f"block of 5 rev-rev {p['block5_rev_rev_per_vec']:.2f}x/vec, fwd-rev {p['block5_fwd_rev_per_vec']:.2f}x/vec, "
           f"HVP on a kept graph (reuse_graph, as PyHessian) {p['hvp_cached_graph']:.2f}x",
           f"reference top-5 (float64 Lanczos tol 1e-10, {ref['n_hvp']} HVPs, {ref['seconds']:.2f} s): "
           + ", ".join(f"{v:.6g}" for v in ref["eigenvalues"]),
           f"reference trace {ref['trace']:.6g} ({ref['trace_method']})",
           fmt_rows("top-5 eigenvalues", res["eigen"])]
    out.append("equal accuracy (fastest configuration of each reaching the target):")
    for e in res["equal_accuracy"]:
        if e["speedup"] is None:
            out.append(f"  err <= {e['target_rel_err']:.0e}: sam-probe {e['sam_probe']}; PyHessian: none reached it")
        else:
            out.append(f"  err <= {e['target_rel_err']:.0e}: sam-probe {e['sam_probe']} vs PyHessian {e['pyhessian']}: "
                       f"{e['speedup']:.1f}x faster, {e['hvp_ratio']:.1f}x fewer HVPs")
    d = res["defaults"]
    out.append(f"defaults (PyHessian tol 1e-3 vs sam-probe tol 1e-3): {d['speedup']:.1f}x faster, "
               f"{d['error_ratio']:.0f}x smaller error")
    lines = ["trace", f"  {'tool':<10} {'method':<48} {'seconds':>8} {'HVPs':>6} {'max rel err':>12} {'med rel SE':>11}"]
    for r in res["trace"]:
        lines.append(f"  {r['tool']:<10} {r['method']:<48} {r['seconds']:>8.3f} {r['n_hvp']:>6.0f} "
                     f"{r['max_rel_err']:>12.2e} {r['median_rel_se']:>11.2e}")
    out += lines
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="MLP only, fewer PyHessian tolerances")
    ap.add_argument("--out", default=None)
    ap.add_argument("--operators", action="store_true",
                    help="curvature operators vs curvlinops, and warm starts (needs curvlinops-for-pytorch)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.operators:
        from bench.curvature_operators import main as operators_main

        return operators_main(a.repeats, a.out or str(ROOT / "bench" / "results" / "curvature_operators.json"))
    a.out = a.out or str(ROOT / "bench" / "results" / "curvature.json")
    t_start = time.perf_counter()
    import pyhessian  # noqa: F401  (import cost outside the timings)

    results = {"environment": environment(repeats=a.repeats), "models": []}
    tols = [(1e-3, 100), (1e-6, 100)]
    if not a.quick:
        tols = [(1e-3, 100), (1e-4, 100), (1e-5, 100), (1e-6, 100), (1e-6, 1000)]
    models = [("mlp", build_mlp, True)] + ([] if a.quick else [("cnn", build_cnn, False)])
    for name, build, chunked in models:
        res = bench_model(name, build, a.repeats, tols, chunked)
        results["models"].append(res)
        print(report(res), flush=True)
        print(flush=True)
    write_results(a.out, results, time.perf_counter() - t_start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
