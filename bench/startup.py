"""Start-up and batch overheads, measured side by side (issue: instant start-up, batches without
per-job start-up).

1. ``sam-probe --help`` and ``--version`` against a bare ``python -c pass`` and
   ``python -c "import torch"`` (fresh processes, median of 5);
2. a command's fixed overhead: ``sam-probe distance`` on a one-checkpoint run minus
   ``import torch`` (goal: <= 0.3 s);
3. a unit's reported ``seconds`` against its solver time alone (the Lanczos solve
   on the same objective in the same process) on the digits MLP (goal: <= 1.5x);
4. 12 small ``distance`` jobs through ``sam-probe batch --jobs 1`` against one
   process doing the same 12 analyses in a loop (goal: <= 2x).

Run: ``python bench/startup.py`` (writes bench/results/startup.json).
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import environment, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "sample_runs"
PY = sys.executable


def wall(cmd: list[str], repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def unit_vs_solver() -> dict:
    """``seconds`` of a sharpness unit (top-5, no trace, rho 0) vs the same solve timed alone."""
    import torch

    from sam_probe.analyses import get
    from sam_probe.core.lanczos import top_eigen
    from sam_probe.pipeline import Session, Settings

    torch.set_num_threads(2)
    ck_path = RUNS / "digits-mlp-sgd" / "step_000400.pt"
    out = []
    for _ in range(3):
        s = Settings(data="digits", store=False)
        session = Session(s, command=["bench"])
        analysis = get("sharpness")
        cfg = analysis.impl.configure({o.name: o.default for o in analysis.compute_options()} | {"rho": 0.0}, s)
        (o,) = session.per_checkpoint(analysis, ck_path, cfg, analysis.impl.compute)
        obj = session.objective(session.load(ck_path))
        t0 = time.perf_counter()
        top_eigen(obj, 5, tol=1e-3)
        solver = time.perf_counter() - t0
        out.append((o.result["seconds"], solver))
    unit, solver = statistics.median(u for u, _ in out), statistics.median(s for _, s in out)
    return {"unit_seconds": unit, "solver_seconds": solver, "ratio": unit / solver}


def batch_vs_one_process(tmp: Path) -> dict:
    """12 distance jobs (one per shipped run) via batch vs the same 12 analyses in one process,
    both storing their units (the same work: hashing, HDF5 writes, fsync)."""
    runs = sorted(p for p in RUNS.iterdir() if p.is_dir() and p.name.startswith(("digits", "diag")))[:12]
    spec = tmp / "spec.toml"
    spec.write_text("[[analysis]]\ncommand = \"distance\"\nruns = [" + ", ".join(f'"{r}"' for r in runs) + "]\n")
    t0 = time.perf_counter()
    subprocess.run([PY, "-m", "sam_probe", "batch", str(spec), "--jobs", "1", "--out", str(tmp / "b"), "--json"],
                   check=True, capture_output=True)
    batch = time.perf_counter() - t0
    code = ("import time, sys\nt0 = time.perf_counter()\nimport sam_probe as sp\n"
            f"for r in {[str(r) for r in runs]!r}:\n    sp.analyze('distance', r, store=True, out={str(tmp / 'one')!r})\n"
            "print(time.perf_counter() - t0)")
    t0 = time.perf_counter()
    subprocess.run([PY, "-c", code], check=True, capture_output=True)
    one = time.perf_counter() - t0
    return {"jobs": len(runs), "batch_seconds": batch, "one_process_seconds": one, "ratio": batch / one}


def main() -> None:
    t_start = time.perf_counter()
    res: dict = {"env": environment()}
    bare = wall([PY, "-c", "pass"])
    torch_import = wall([PY, "-c", "import torch"])
    help_ = wall([PY, "-m", "sam_probe", "--help"])
    version = wall([PY, "-m", "sam_probe", "--version"])
    sub_help = wall([PY, "-m", "sam_probe", "sharpness", "--help"])
    with tempfile.TemporaryDirectory() as d:
        run = Path(d) / "one"
        run.mkdir()
        (run / "step_000000.pt").write_bytes((RUNS / "digits-mlp-sgd" / "step_000000.pt").read_bytes())
        cmd = wall([PY, "-m", "sam_probe", "distance", str(run), "--no-store", "--json"])
        res["startup"] = {"python_bare": bare, "import_torch": torch_import, "help": help_,
                          "version": version, "command_help": sub_help, "distance_one_checkpoint": cmd,
                          "command_overhead_over_torch_import": cmd - torch_import}
        print(json.dumps(res["startup"], indent=2))
        res["unit_vs_solver"] = unit_vs_solver()
        print(json.dumps(res["unit_vs_solver"], indent=2))
        res["batch_vs_one_process"] = batch_vs_one_process(Path(d))
        print(json.dumps(res["batch_vs_one_process"], indent=2))
    write_results(ROOT / "bench" / "results" / "startup.json", res, time.perf_counter() - t_start)


if __name__ == "__main__":
    main()
