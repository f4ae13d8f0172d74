"""Top-k Hessian eigenvalues at scale: sam-probe against its peers on GPT-2-style LMs and a ResNet-18.

Peers (bench-only dependencies, not in the test extra; a missing one is recorded and skipped)::

    pip install torch==2.13.0 curvlinops-for-pytorch hessian-eigenthings   # PyHessian 0.1 is a dependency
    pip uninstall -y torchvision   # pulled in by backpack-for-pytorch; breaks `import transformers` beside torch 2.13
    python bench/scale.py --sizes gpt1m,gpt10m --tools sam-probe,pyhessian,curvlinops,eigenthings --timeout 1800

Models (built from a config, seeded random init, nothing downloaded; eval mode, no dropout):

    gpt1m     GPT2Config vocab 1024,  d 128,  4 layers,  4 heads   (~0.9M)
    gpt10m    GPT2Config vocab 8192,  d 256, 10 layers,  4 heads   (~10M)
    gpt50m    GPT2Config vocab 50257, d 512,  8 layers,  8 heads   (~51M)
    gpt124m   GPT2Config vocab 50257, d 768, 12 layers, 12 heads   (GPT-2 small, 124M)
    gpt350m   GPT2Config vocab 50257, d 1024, 24 layers, 16 heads  (GPT-2 medium, 355M; top-1 only)
    resnet18  CIFAR ResNet-18 at full width 64 (sam_probe.loading.models.resnet18, written by hand,
              no torchvision; 11.2M), BatchNorm in eval mode, 32 random 3x32x32 images, 10 classes

LMs see 8 sequences of 32 random token ids (eager attention, tied head); the loss is the mean
next-token cross-entropy (sam-probe ``--loss lm``; PyHessian and curvlinops get the same loss
through ``bench.compare.LMLogits``, hessian-eigenthings the HF model and ``hf_lm_loss``).

Every (model, tool) run is a child process (``python bench/scale.py child ...``) so peak RSS
is that tool's alone: ``peak_rss_mib`` = the child's ``ru_maxrss`` (model, data and solve),
``solve_rss_mib`` = the high-water mark above the RSS after the model was built
(bench/measure.py ``PeakRSS``).  A child that runs past ``--timeout`` is killed and recorded
as such; one that fails (e.g. out of memory) is recorded with its last line of output.

Settings (one per tool, the ones that reached 1e-3 on the small GPT of bench/compare.py or
tighter; top-5 unless the size says top-1): sam-probe ``top_eigen(tol=1e-3)`` (certified:
relative residual <= 1e-3 by explicit products); PyHessian ``eigenvalues(tol=1e-4,
maxIter=100)``; curvlinops ``HessianLinearOperator`` + ``eigsh(which='LA', tol=1e-3)``;
hessian-eigenthings ``lanczos(max_iter=30, which='LA')``.  Error: against a reference —
sam-probe at residual 1e-8 in float64 (``--reference``; computed where it fits in the time
limit), else against sam-probe's own certified float32 values (``error_vs``, a bound of
about ``||r||`` on their accuracy) — never invented.  The machine's load (``os.getloadavg``
and CPUs used by other processes) is recorded before each run; medians over ``--repeats``.
Results merge into bench/results/scale.json (one entry per size and tool; rerun to replace).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OUT = ROOT / "bench" / "results" / "scale.json"
SIZES: dict[str, dict[str, Any]] = {
    "gpt1m": {"vocab": 1024, "d": 128, "layers": 4, "heads": 4, "k": 5},
    "gpt10m": {"vocab": 8192, "d": 256, "layers": 10, "heads": 4, "k": 5},
    "gpt50m": {"vocab": 50257, "d": 512, "layers": 8, "heads": 8, "k": 5},
    "gpt124m": {"vocab": 50257, "d": 768, "layers": 12, "heads": 12, "k": 5, "positions": 1024},
    "gpt350m": {"vocab": 50257, "d": 1024, "layers": 24, "heads": 16, "k": 1, "positions": 1024},
    "resnet18": {"k": 5},
}
TOOLS = ("sam-probe", "sam-probe-residual", "sam-probe-basis21", "pyhessian", "curvlinops", "eigenthings", "eigenthings-1e-3", "reference",
         "ratios", "pyhessian-memory")
EIGENTHINGS_LADDER = (30, 45, 60, 80, 100, 130)  # its Lanczos steps, tried in turn for eigenthings-1e-3
TARGET = 1e-3  # the accuracy of "time to top-k at 1e-3": max relative eigenvalue error
SEQS, SEQ_LEN, IMAGES = 8, 32, 32


# ------------------------------------------------------------------ child
def build(size: str):
    import torch

    from bench.compare import Problem

    spec = SIZES[size]
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if size == "resnet18":
        from sam_probe.loading.models import resnet18

        model = resnet18(width=64).eval()
        x = torch.randn(IMAGES, 3, 32, 32, generator=g)
        y = torch.randint(0, 10, (IMAGES,), generator=g)
        prob = Problem(size, model, x, y, "ce", "CIFAR ResNet-18 width 64, BN eval, random images and labels")
    else:
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(vocab_size=spec["vocab"], n_positions=spec.get("positions", SEQ_LEN), n_embd=spec["d"],
                         n_layer=spec["layers"], n_head=spec["heads"], resid_pdrop=0.0, embd_pdrop=0.0,
                         attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0, use_cache=False)
        model = GPT2LMHeadModel._from_config(cfg, attn_implementation="eager").eval()
        ids = torch.randint(0, spec["vocab"], (SEQS, SEQ_LEN), generator=g)
        prob = Problem(size, model, ids, None, "lm", f"GPT2Config d={spec['d']} layers={spec['layers']} "
                       f"vocab={spec['vocab']}, random init, {SEQS}x{SEQ_LEN} random tokens")
    for p in prob.model.parameters():
        p.requires_grad_(True)
    return prob


def child(size: str, tool: str, k: int, seed: int, threads: int, max_iter: int = 30) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    from bench import compare
    from bench.measure import PeakRSS

    compare.K = k
    compare.HVP_CAP = 3000
    prob = build(size)
    seen = progress_writer(os.environ.get("SCALE_PROGRESS"))
    compare.ON_HVP = seen
    n_params = sum(p.numel() for p in prob.params())
    out: dict[str, Any] = {"n_params": n_params}
    with PeakRSS() as mem:
        if tool in ("sam-probe", "sam-probe-residual", "sam-probe-basis21", "reference"):
            from sam_probe.core.lanczos import top_eigen

            from sam_probe.core.operators import as_operator

            t0 = time.perf_counter()
            obj = prob.objective(torch.float64 if tool == "reference" else None)
            op = as_operator(obj)
            op.matmat = counted_matmat(op.matmat, seen)
            # sam-probe-residual: residuals certified by explicit products, no order check (what eigsh offers)
            # sam-probe-basis21: 22 vectors allowed (what --max-memory with room gives): a 21-row basis, lean
            r = top_eigen(op, k, tol=1e-8 if tool == "reference" else 1e-3, seed=seed, max_hvp=3000,
                          check=tool != "sam-probe-residual",
                          max_vectors=k + 17 if tool == "sam-probe-basis21" else None)
            sec = time.perf_counter() - t0
            out.update(values=list(r.eigenvalues), n_hvp=r.n_hvp, seconds=sec, certified=bool(r.certified),
                       max_residual=max(r.residuals), plan=r.plan, n_check_products=r.n_check_products,
                       n_certify=r.n_certify, guard=r.guard, guard_bound=r.guard_bound,
                       order_confidence=r.order_confidence, gap=r.gap, subspace_bound=r.subspace_bound)
        elif tool == "ratios":  # not an eigen solve: sam-probe ratios (issue 20, item 6), its tracked peak
            from sam_probe.analyses.ratios import compute_ratios
            from sam_probe.core.memory import peak_bytes

            obj = prob.objective()
            cfg = {"rho": 0.05, "variant": "l2", "m": None, "eta": 0.01, "eps": 1e-12, "faithful": False,
                   "edges": [1.2, 1.5, 2.0, 4.0, 8.0, 16.0], "ire_rank": 0.9}
            box: dict[str, Any] = {}
            t0 = time.perf_counter()
            tracked = peak_bytes(lambda: box.setdefault("r", compute_ratios(obj, cfg)), "cpu")
            sec = time.perf_counter() - t0
            box_counts = box["r"]["counts"]
            vec = 4 * obj.n_params
            del box
            one_pass = peak_bytes(obj.grad_flat, "cpu")  # gradient + its flat copy + the graph's activations
            out.update(values=[], n_hvp=0, seconds=sec, counts=box_counts,
                       tracked_peak_bytes=tracked, tracked_peak_vectors=tracked / vec,
                       gradient_pass_vectors=one_pass / vec,
                       note="seconds include torch-profiler memory tracking; tracked peak = torch allocations "
                            "during compute_ratios above those before it, in float32 parameter-sized vectors "
                            "(the gradient autograd returns is one of them); gradient_pass_vectors: the same for "
                            "one plain obj.grad_flat() (gradient, its flat copy, the graph's activations)")
        elif tool == "pyhessian":
            run = compare._ph_solve(prob, {"tol": 1e-4, "maxIter": 100}, seed)
            out.update(values=run.values, n_hvp=run.n_hvp, seconds=run.seconds)
        elif tool == "pyhessian-memory":  # its memory at top-k, not its answer: 3 power steps per eigenvalue
            run = compare._ph_solve(prob, {"tol": 0.0, "maxIter": 3}, seed)
            out.update(values=[], n_hvp=run.n_hvp, seconds=run.seconds,
                       note="memory only: PyHessian eigenvalues(top_n=k, maxIter=3) holds what a converged run "
                            "holds (the k - 1 earlier eigenvectors, v, Hv and the gradient graph); its values "
                            "are not converged and not reported")
        elif tool == "curvlinops":
            run = compare._cl_solve(prob, {"which": "LA", "tol": 1e-3, "v0": True, "check_deterministic": False},
                                    seed)
            out.update(values=run.values, n_hvp=run.n_hvp, seconds=run.seconds)
        elif tool == "eigenthings":
            cfg = {"max_iter": max_iter, "which": "LA"}
            if max_iter > 50:  # its default turns reorthogonalisation off above 50 steps; bench/compare.py's ladder too
                cfg["reorthogonalize"] = True
            run = compare._eig_solve("lanczos")(prob, cfg, seed)
            out.update(values=run.values, n_hvp=run.n_hvp, seconds=run.seconds, max_iter=max_iter, **run.extra)
        else:
            raise SystemExit(f"unknown tool {tool}")
    out["solve_rss_mib"] = mem.mib
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def progress_writer(path: str | None):
    """``seen(n)``: adds ``n`` products and rewrites ``path`` with the count, the seconds since the first
    call's start and the RSS (so a run killed at ``--timeout`` still says how far it got); ``None``: a no-op."""
    state = {"n": 0, "t0": None}

    def seen(n: int) -> None:
        if path is None:
            return
        if state["t0"] is None:
            state["t0"] = time.perf_counter()
        state["n"] += int(n)
        rss = next((int(ln.split()[1]) / 1024 for ln in Path("/proc/self/status").read_text().splitlines()
                    if ln.startswith("VmRSS:")), None) if Path("/proc/self/status").exists() else None
        tmp = Path(path + ".tmp")
        tmp.write_text(json.dumps({"n_hvp": state["n"], "seconds": time.perf_counter() - state["t0"], "rss_mib": rss}))
        os.replace(tmp, path)

    return seen


def counted_matmat(matmat, seen):
    def counted(V):
        out = matmat(V)
        seen(V.shape[1] if V.dim() > 1 else 1)
        return out

    return counted


# ----------------------------------------------------------------- parent
def versions() -> dict[str, Any]:
    import importlib
    import importlib.metadata

    out: dict[str, Any] = {}
    for mod, dist in (("pyhessian", "PyHessian"), ("curvlinops", "curvlinops-for-pytorch"),
                      ("hessian_eigenthings", "hessian-eigenthings"), ("transformers", "transformers"),
                      ("scipy", "scipy"), ("torch", "torch")):
        try:
            importlib.import_module(mod)
            out[dist] = importlib.metadata.version(dist)
        except Exception as exc:  # noqa: BLE001 - not installable / not importable: recorded
            out[dist] = f"unavailable: {type(exc).__name__}: {str(exc)[:120]}"
    return out


def run_child(size: str, tool: str, k: int, seed: int, threads: int, timeout: float,
              max_iter: int = 30) -> dict[str, Any]:
    from bench.measure import other_cpu

    load = {"loadavg": [round(x, 2) for x in os.getloadavg()], "other_cpus": other_cpu(1.0)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "child", size, tool, "--k", str(k), "--seed", str(seed),
           "--threads", str(threads), "--max-iter", str(max_iter)]
    import tempfile

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        prog = Path(tmp, "progress.json")
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                               env={**os.environ, "SCALE_PROGRESS": str(prog)})
        except subprocess.TimeoutExpired:
            seen = json.loads(prog.read_text()) if prog.exists() else None
            what = "" if not seen else (f" ({seen['n_hvp']} products done, {seen['seconds'] / max(seen['n_hvp'], 1):.1f} s "
                                        f"each; RSS {seen['rss_mib'] / 1024:.1f} GiB)")
            return {"seed": seed, "failed": f"timeout after {timeout:.0f} s{what}", "progress": seen,
                    "load_before": load, "load_after": [round(x, 2) for x in os.getloadavg()]}
    wall = time.perf_counter() - t0
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr.strip().splitlines() or [f"exit code {p.returncode}"])[-1]
        if p.returncode in (-9, 137):
            tail = f"killed (exit {p.returncode}; out of memory?) {tail}"
        return {"seed": seed, "failed": tail[:300], "wall_s": wall, "load_before": load}
    res = json.loads(lines[-1])
    res.update(seed=seed, wall_s=wall, load_before=load, load_after=[round(x, 2) for x in os.getloadavg()])
    return res


def max_rel_err(values, ref) -> float | None:
    a = sorted((v for v in values if v is not None and math.isfinite(v)), reverse=True)
    if not ref or len(a) < len(ref):
        return None
    return max(abs(x - r) / abs(r) for x, r in zip(a, ref))


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if "failed" not in r]
    if not ok:
        return {"failed": runs[0]["failed"], "runs": runs}
    med = lambda key: statistics.median(r[key] for r in ok) if all(r.get(key) is not None for r in ok) else None  # noqa: E731
    return {"n_params": ok[0]["n_params"], "seconds": med("seconds"), "n_hvp": med("n_hvp"),
            "peak_rss_mib": med("peak_rss_mib"), "solve_rss_mib": med("solve_rss_mib"),
            "eigenvalues": ok[0]["values"], "certified": ok[0].get("certified"),
            "failed_runs": len(runs) - len(ok), "runs": runs}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="gpt1m,gpt10m,resnet18,gpt50m,gpt124m,gpt350m")
    ap.add_argument("--tools", default="reference,sam-probe,pyhessian,curvlinops,eigenthings")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per child run")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--table", action="store_true", help="print the README table from --out and exit")
    ap.add_argument("--merge", default=None, help="merge the sizes of another results file into --out and exit")
    args = ap.parse_args(argv)
    if args.merge:
        base = json.loads(Path(args.out).read_text())
        other = json.loads(Path(args.merge).read_text())
        for size, e in other.get("sizes", {}).items():
            mine = base["sizes"].setdefault(size, {"k": e["k"], "tools": {}})
            mine["tools"].update(e["tools"])
            add_errors(mine)
        base.setdefault("merged_from", []).append({"environment": other.get("environment"),
                                                   "sizes": sorted(other.get("sizes", {}))})
        base["largest_handled"] = largest(base)
        Path(args.out).write_text(json.dumps(base, indent=1))
        return
    if args.table:
        print(table(json.loads(Path(args.out).read_text())))
        return
    sizes = [s for s in args.sizes.split(",") if s]
    tools = [t for t in args.tools.split(",") if t]
    for s in sizes:
        if s not in SIZES:
            raise SystemExit(f"--sizes: unknown {s}; choose from {', '.join(SIZES)}")
    for t in tools:
        if t not in TOOLS:
            raise SystemExit(f"--tools: unknown {t}; choose from {', '.join(TOOLS)}")
    out_path = Path(args.out)
    data = json.loads(out_path.read_text()) if out_path.exists() else {"sizes": {}}
    from bench.common import environment

    data["environment"] = environment(mem_total_gib=round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
                                                          / 2 ** 30, 1))
    data["versions"] = versions()
    data["settings"] = {"sam-probe": "top_eigen(tol=1e-3), certified by explicit products",
                        "sam-probe-basis21": "top_eigen(tol=1e-3, max_vectors=k + 17): a 21-row basis (k = 5) "
                                             "instead of 12, the rest as sam-probe",
                        "sam-probe-residual": "top_eigen(tol=1e-3, check=False): residuals certified by explicit "
                                              "products, no order check (--no-order-check; what eigsh offers)",
                        "eigenthings-1e-3": f"hessian_eigenthings.lanczos(max_iter=m, which='LA'), m the first of "
                                            f"{list(EIGENTHINGS_LADDER)} within {TARGET:g} of the reference values "
                                            "(reorthogonalize=True above 50 steps)",
                        "pyhessian": "hessian.eigenvalues(tol=1e-4, maxIter=100)",
                        "curvlinops": "HessianLinearOperator + scipy eigsh(which='LA', tol=1e-3), BLAS 1 thread",
                        "eigenthings": "hessian_eigenthings.lanczos(max_iter=30, which='LA')",
                        "reference": "sam-probe top_eigen(tol=1e-8) in float64",
                        "data": f"LMs: {SEQS} sequences x {SEQ_LEN} random tokens; resnet18: {IMAGES} random images",
                        "threads": args.threads, "timeout_s": args.timeout}
    t_all = time.perf_counter()
    for size in sizes:
        k = SIZES[size]["k"]
        entry = data["sizes"].setdefault(size, {"k": k, "tools": {}})
        entry["k"] = k
        for tool in tools:
            avail = data["versions"]
            dist = {"pyhessian": "PyHessian", "curvlinops": "curvlinops-for-pytorch",
                    "eigenthings": "hessian-eigenthings"}.get(tool)
            if dist and str(avail.get(dist, "")).startswith("unavailable"):
                entry["tools"][tool] = {"failed": f"{dist} {avail[dist]}"}
                continue
            if tool == "eigenthings-1e-3":
                entry["tools"][tool] = ladder(entry, size, k, args)
            else:
                runs = [run_child(size, tool, k, seed, args.threads, args.timeout) for seed in range(args.repeats)]
                entry["tools"][tool] = summarise(runs)
            s = entry["tools"][tool]
            if tool == "ratios" and "failed" not in s:
                s.update({k: s["runs"][0].get(k) for k in ("tracked_peak_vectors", "tracked_peak_bytes", "counts",
                                                           "gradient_pass_vectors")})
            print(f"{size:9s} {tool:12s} " + (f"FAILED {s['failed']}" if "failed" in s else
                  f"{s['seconds']:.1f} s  {s['n_hvp']} HVPs  peak RSS {s['peak_rss_mib']:.0f} MiB  "
                  f"{[round(v, 5) for v in s['eigenvalues']]}"), flush=True)
            add_errors(entry)
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps(data, indent=1))
    data["largest_handled"] = largest(data)
    out_path.write_text(json.dumps(data, indent=1))
    print(f"total {time.perf_counter() - t_all:.0f} s; wrote {out_path}")


def reference_values(entry: dict[str, Any]) -> tuple[list[float] | None, str]:
    """The values errors are measured against: the float64 reference, else sam-probe's certified ones."""
    for tool, what in (("reference", "reference"), ("sam-probe", "sam-probe certified (tol 1e-3)")):
        if "eigenvalues" in entry["tools"].get(tool, {}):
            return entry["tools"][tool]["eigenvalues"], what
    return None, ""


def ladder(entry: dict[str, Any], size: str, k: int, args) -> dict[str, Any]:
    """hessian-eigenthings' time to top-k at :data:`TARGET`: its Lanczos with the step counts of
    :data:`EIGENTHINGS_LADDER` in turn until the error against :func:`reference_values` is within
    TARGET; the first run that is gives ``seconds`` (as if the user had known that step count; the
    runs before it are not added).  Needs the reference or sam-probe row of this size first."""
    ref, what = reference_values(entry)
    if ref is None:
        return {"failed": "no reference values for this size: run the reference or sam-probe first"}
    tried = []
    for steps in EIGENTHINGS_LADDER:
        r = run_child(size, "eigenthings", k, 0, args.threads, args.timeout, max_iter=steps)
        err = None if "failed" in r else max_rel_err(r["values"], ref)
        tried.append({"max_iter": steps, "seconds": r.get("seconds"), "n_hvp": r.get("n_hvp"), "max_rel_err": err,
                      "peak_rss_mib": r.get("peak_rss_mib"), "converged_flag": r.get("converged"),
                      "failed": r.get("failed")})
        print(f"  eigenthings max_iter={steps}: " + (f"FAILED {r['failed']}" if "failed" in r else
              f"{r['seconds']:.1f} s, error {err:.1e}"), flush=True)
        if "failed" in r:
            return {"failed": f"max_iter={steps}: {r['failed']}", "ladder": tried}
        if err is not None and err <= TARGET:
            out = summarise([r])
            out.update(ladder=tried, error_vs=what, note=f"first of max_iter {list(EIGENTHINGS_LADDER)} within "
                       f"{TARGET:g} of the {what} values; seconds of that run alone")
            return out
    return {"failed": f"not within {TARGET:g} after max_iter={EIGENTHINGS_LADDER[-1]}", "ladder": tried}


def add_errors(entry: dict[str, Any]) -> None:
    """Each tool's ``max_rel_err`` in one size's ``entry``: against the float64 reference where it exists, else
    against sam-probe's certified values (``error_vs`` says which)."""
    ref, what = reference_values(entry)
    if ref is None:
        return
    source = "reference" if what == "reference" else "sam-probe"  # the row the values came from: no error of its own
    for t, v in entry["tools"].items():
        if "eigenvalues" in v and t not in (source, "reference"):
            v["max_rel_err"], v["error_vs"] = max_rel_err(v["eigenvalues"], ref), what


def table(data: dict[str, Any]) -> str:
    """The README's markdown table from the recorded results (missing rows say so)."""
    rows = ["| model | P | k | tool | time (s) | HVPs | max rel. error | peak RSS (MiB) | solve RSS (MiB) | load (1 min) |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for size in SIZES:
        e = data.get("sizes", {}).get(size)
        if e is None or not e.get("tools"):
            rows.append(f"| {size} | | {SIZES[size]['k']} | (not run) | | | | | | |")
            continue
        for tool in TOOLS:
            v = e["tools"].get(tool)
            if v is None:
                continue
            if "failed" in v:
                why = v['failed'].split(';')[0][:70]
                why += ")" if why.count("(") > why.count(")") else ""
                rows.append(f"| {size} | | {e['k']} | {tool} | {why} | | | | | |")
                continue
            err = v.get("max_rel_err")
            err_s = "" if err is None else f"{err:.1e}" + (" (vs sam-probe)" if v.get("error_vs", "").startswith("sam") else "")
            if tool in ("sam-probe", "sam-probe-residual", "sam-probe-basis21"):
                run0 = v["runs"][0]
                order = ("no order check" if tool == "sam-probe-residual" else
                         f"order check {run0['n_check_products']} of them" if "n_check_products" in run0
                         else "order: the residual test before 7 Dec")
                err_s = (f"residual <= {run0.get('max_residual', float('nan')):.1e}; {order}"
                         + (f"; {err_s}" if err_s else ""))
            if tool == "eigenthings-1e-3":
                err_s += f"; max_iter {v['runs'][0].get('max_iter', '?')}"
            if tool.endswith("-memory"):
                err_s = "(memory only, 3 steps per eigenvalue)"
            if tool == "ratios":
                err_s = (f"(ratios: tracked peak {v.get('tracked_peak_vectors') or 0:.2f} v; one gradient pass "
                         f"{v.get('gradient_pass_vectors') or 0:.2f} v)")
            load = v["runs"][0].get("load_before", {}).get("loadavg", [None])[0]
            rows.append(f"| {size} | {v['n_params'] / 1e6:.1f}M | {e['k']} | {tool} | {v['seconds']:.0f} | {v['n_hvp']:.0f} | "
                        f"{err_s} | {v['peak_rss_mib']:.0f} | {v['solve_rss_mib'] or 0:.0f} | {load} |")
    return "\n".join(rows)


def largest(data: dict[str, Any]) -> dict[str, Any]:
    """Per tool: the largest model (by parameters) it finished on, from the recorded runs."""
    best: dict[str, Any] = {}
    for size, e in data.get("sizes", {}).items():
        for tool, v in e.get("tools", {}).items():
            if tool.endswith("-memory"):
                continue  # not an answer
            if "n_params" in v and v.get("n_params", 0) > best.get(tool, {}).get("n_params", 0):
                best[tool] = {"size": size, "n_params": v["n_params"]}
    return best


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        ap = argparse.ArgumentParser()
        ap.add_argument("child")
        ap.add_argument("size")
        ap.add_argument("tool")
        ap.add_argument("--k", type=int, default=5)
        ap.add_argument("--seed", type=int, default=0)
        ap.add_argument("--threads", type=int, default=2)
        ap.add_argument("--max-iter", type=int, default=30)
        a = ap.parse_args()
        print(json.dumps(child(a.size, a.tool, a.k, a.seed, a.threads, a.max_iter), default=str), flush=True)
    else:
        main()
