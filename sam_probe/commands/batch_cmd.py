"""``sam-probe batch SPEC.toml``: many analyses on many runs; survives failures, kills and concurrency."""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import typer

from ..report import console


def batch(
    spec: Path = typer.Argument(..., help="TOML spec (see sample_runs/batch.toml).", metavar="SPEC"),
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j", help="Worker processes (default: the spec's, else 1)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Results directory (default: the spec's, else ./sam_probe_results)."),
    shard: Optional[str] = typer.Option(None, "--shard", help="Run only shard i of n (i/n, 1 <= i <= n): a deterministic, balanced share of the jobs, for Slurm arrays, CI matrices or several shells.", metavar="I/N"),
    trust_checkpoint: bool = typer.Option(False, "--trust-checkpoint", help="DANGEROUS: let every job fully unpickle checkpoints (runs any code they contain); a spec alone can never turn this on."),
    json: bool = typer.Option(False, "--json", help="Print only the JSON summary on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only the summary."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Run every analysis of SPEC; print ok / reused (already stored) / failed per unit; exit 0 only if all succeeded.

    Every job's options are checked before any job runs. Jobs run on --jobs long-lived worker processes that keep
    torch, data and models loaded; a crashed worker is replaced and its job reported failed. Re-running resumes:
    stored units are reused, not recomputed. A spec that names factories runs them, like a script.
    """
    from ..batch import load_spec, parse_shard, run_spec
    from ..batch import shard as shard_of
    from ..errors import SpecError
    from ..pipeline.outcome import LEGACY_REUSED, REUSED

    which = parse_shard(shard)
    if jobs is not None and jobs < 1:
        raise SpecError("--jobs must be >= 1")
    parsed = load_spec(spec, trust=trust_checkpoint)
    target = out or parsed.out or Path("sam_probe_results")
    n_jobs = jobs or parsed.jobs or 1
    items = shard_of(parsed.items, *which) if which else parsed.items
    if not (quiet or json):
        part = f" (shard {which[0]}/{which[1]}: {len(items)} of {len(parsed.items)} jobs)" if which else ""
        console.note(f"batch {spec.name}: {len(items)} jobs on {min(n_jobs, max(1, len(items)))} workers{part}")

    def on_done(job, units, stderr) -> None:
        if job.trusted:
            console.warn(f"{job.analysis} {job.label}: --trust-checkpoint: fully unpickling; a malicious file can "
                         "run code on this machine")
        if quiet or json:
            return
        c = Counter(u.status for u in units)
        took = sum(u.seconds or 0 for u in units)
        console.note(f"{job.analysis} {job.label}: " + ", ".join(f"{v} {k}" for k, v in sorted(c.items()))
                     + (f" ({took:.1f} s computing)" if took else ""))

    statuses = run_spec(parsed, target, n_jobs, items, on_done)
    counts = Counter(u.status for u in statuses)
    code = 0 if (statuses or not items) and counts.get("failed", 0) == 0 else 1
    if json:
        console.print_json({"out": str(target), "jobs": len(items), "jobs_in_spec": len(parsed.items),
                            "shard": f"{which[0]}/{which[1]}" if which else None,
                            "units": [_unit_json(u, REUSED, LEGACY_REUSED) for u in statuses],
                            "counts": {"ok": counts.get("ok", 0), LEGACY_REUSED: counts.get(REUSED, 0),
                                       "failed": counts.get("failed", 0), REUSED: counts.get(REUSED, 0)},
                            "exit_code": code})
    else:
        rows = [[u.analysis, _short(u.unit), u.step, u.status, u.reason or ""] for u in statuses]
        console.out.print(console.table(f"batch {spec.name} -> {target}", ["analysis", "unit", "step", "status", "reason"],
                                        rows))
        console.out.print(f"{counts.get('ok', 0)} ok, {counts.get(REUSED, 0)} reused (already stored), "
                          f"{counts.get('failed', 0)} failed", highlight=False, markup=False)
    raise typer.Exit(code)


def _unit_json(u: Any, reused: str, legacy: str) -> dict[str, Any]:
    """A unit's JSON: ``status`` keeps its old spelling ``skipped`` for reused units (a contract);
    ``reused`` says it plainly."""
    d = asdict(u)
    return {**d, "status": legacy if u.status == reused else u.status, "reused": u.status == reused}


def _short(unit: str) -> str:
    """``run/file`` (or ``run``) instead of a long absolute path; pairs stay pairs."""
    return " -> ".join("/".join(Path(p).parts[-2:]) for p in unit.split(" -> "))
