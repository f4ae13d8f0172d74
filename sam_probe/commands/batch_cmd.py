"""``sam-probe batch SPEC.toml``: many analyses on many runs; survives failures, kills and concurrency."""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import typer

from ..report import console


def batch(
    spec: Path = typer.Argument(..., help="TOML spec (see sample_runs/batch.toml)."),
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j", help="Jobs run at once (default: the spec's, else 1)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Results directory (default: the spec's, else ./sam_probe_results)."),
    json: bool = typer.Option(False, "--json", help="Print only the JSON summary on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only the summary."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Run every analysis of SPEC; print ok / skipped (already stored) / failed per unit; exit 0 only if all succeeded.

    Re-running resumes: stored units are skipped. Each job runs in its own process.
    """
    from ..batch import load_spec, run_spec

    parsed = load_spec(spec)
    target = out or parsed.out or Path("sam_probe_results")
    n_jobs = jobs or parsed.jobs or 1

    def on_done(job, units) -> None:
        if quiet or json:
            return
        c = Counter(u.status for u in units)
        console.err.print(f"{job.analysis} {job.label}: " + ", ".join(f"{v} {k}" for k, v in sorted(c.items())),
                          highlight=False)

    statuses = run_spec(parsed, target, n_jobs, on_done)
    counts = Counter(u.status for u in statuses)
    code = 0 if statuses and counts.get("failed", 0) == 0 else 1
    if json:
        console.print_json({"out": str(target), "jobs": len(parsed.items), "units": [asdict(u) for u in statuses],
                            "counts": {k: counts.get(k, 0) for k in ("ok", "skipped", "failed")}, "exit_code": code})
    else:
        rows = [[u.analysis, _short(u.unit), u.step, u.status, u.reason or ""] for u in statuses]
        console.out.print(console.table(f"batch {spec.name} -> {target}", ["analysis", "unit", "step", "status", "reason"],
                                        rows))
        console.out.print(f"{counts.get('ok', 0)} ok, {counts.get('skipped', 0)} skipped (already stored), "
                          f"{counts.get('failed', 0)} failed", highlight=False)
    raise typer.Exit(code)


def _short(unit: str) -> str:
    """``run/file`` (or ``run``) instead of a long absolute path; pairs stay pairs."""
    return " -> ".join("/".join(Path(p).parts[-2:]) for p in unit.split(" -> "))


def register(app: typer.Typer) -> None:
    app.command("batch")(batch)
