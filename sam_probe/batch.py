"""Batch analysis specs: parse a TOML spec into jobs and run them, each in its own process.

A spec (paths and globs relative to the spec file's folder)::

    out = "results"                 # optional (default ./sam_probe_results; --out wins)
    jobs = 2                        # optional (--jobs wins)
    runs = ["digits-mlp-*"]         # default targets of every analysis

    [defaults]                      # options given to every analysis (CLI names, without --)
    max-samples = 500

    [[analysis]]
    command = "sharpness"           # any analysis command
    runs = ["digits-mlp-sgd", "digits-mlp-late-sam"]   # or paths = ["run/step_000100.pt", ...]
    top-k = 3                       # true -> --flag, false -> omitted, list -> repeated
    trace = true

    [[analysis]]
    command = "interpolate"
    pairs = [["run/step_000200.pt", "run/step_000400.pt"]]

One job is one command on one target (a run, a file or a pair), run as
``python -m sam_probe COMMAND TARGET ... --out OUT --json --quiet --no-plot``
in a fresh process: a crash or a kill loses at most the unit being written
(units are written atomically), and a re-run skips every stored unit. Each job
appends one status line per unit (ok / skipped / failed + reason) to a file
the batch reads back (``SAM_PROBE_STATUS_FILE``).
"""
from __future__ import annotations

import glob as globmod
import json
import os
import subprocess
import sys
import tempfile
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .commands.output import STATUS_FILE_ENV
from .errors import SpecError, suggest

COMMANDS = ("sharpness", "ratios", "overlap", "alignment", "distance", "interpolate", "features")
RESERVED = ("command", "runs", "paths", "pairs", "name")


@dataclass
class Job:
    """One command on one target."""

    analysis: str
    targets: list[str]
    argv: list[str]

    @property
    def label(self) -> str:
        return " ".join(self.targets)


@dataclass
class UnitStatus:
    analysis: str
    target: str
    unit: str
    step: int | None
    status: str  # ok | skipped | failed
    reason: str | None = None
    stored_at: str | None = None


@dataclass
class Spec:
    out: Path | None
    jobs: int | None
    items: list[Job] = field(default_factory=list)


def _options(opts: dict[str, Any], where: str) -> list[str]:
    argv: list[str] = []
    for key, value in opts.items():
        flag = "--" + str(key).replace("_", "-")
        if isinstance(value, bool):
            if value:
                argv.append(flag)
        elif isinstance(value, list):
            for v in value:
                argv += [flag, str(v)]
        elif isinstance(value, dict):
            raise SpecError(f"{where}: option {key} must be a value or a list, not a table")
        else:
            argv += [flag, str(value)]
    return argv


def _expand(patterns: list[str], base: Path, where: str) -> list[str]:
    out: list[str] = []
    for pat in patterns:
        full = pat if os.path.isabs(pat) else str(base / pat)
        hits = sorted(globmod.glob(full)) if any(c in pat for c in "*?[") else ([full] if os.path.exists(full) else [])
        if not hits:
            raise SpecError(f"{where}: {pat!r} matches nothing (relative to {base})")
        out += [h for h in hits if h not in out]
    return out


def load_spec(path: str | Path) -> Spec:
    """Parse and check a spec; every problem is one :class:`SpecError` line."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"{path}: no such spec file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SpecError(f"{path}: not valid TOML ({exc})") from None
    base = path.resolve().parent
    unknown = set(raw) - {"out", "jobs", "runs", "defaults", "analysis"}
    if unknown:
        raise SpecError(f"{path}: unknown top-level keys {sorted(unknown)} (use out, jobs, runs, defaults, [[analysis]])")
    analyses = raw.get("analysis") or []
    if not isinstance(analyses, list) or not analyses:
        raise SpecError(f"{path}: no [[analysis]] tables")
    defaults = raw.get("defaults") or {}
    top_runs = raw.get("runs") or []
    spec = Spec(out=(base / raw["out"]) if "out" in raw else None, jobs=raw.get("jobs"))
    for i, a in enumerate(analyses):
        where = f"{path} [[analysis]] #{i + 1}"
        cmd = a.get("command")
        if cmd not in COMMANDS:
            raise SpecError(f"{where}: command {cmd!r}{suggest(str(cmd), COMMANDS)}; choose one of {', '.join(COMMANDS)}")
        opts = {**defaults, **{k: v for k, v in a.items() if k not in RESERVED}}
        argv_opts = _options(opts, where)
        if cmd == "interpolate":
            pairs = a.get("pairs") or []
            if not pairs or any(not isinstance(p, list) or len(p) != 2 for p in pairs):
                raise SpecError(f"{where}: interpolate needs pairs = [[A, B], ...]")
            targets = [_expand([p[0]], base, where) + _expand([p[1]], base, where) for p in pairs]
        else:
            patterns = a.get("paths") or a.get("runs") or top_runs
            if not patterns:
                raise SpecError(f"{where}: no runs (give runs = [...] here or at the top)")
            targets = [[t] for t in _expand(list(patterns), base, where)]
        for t in targets:
            spec.items.append(Job(cmd, t, [cmd, *t, *argv_opts]))
    return spec


def parse_statuses(job: Job, lines: list[str]) -> list[UnitStatus]:
    out = []
    for line in lines:
        try:
            d = json.loads(line)
        except ValueError:
            continue
        out.append(UnitStatus(job.analysis, job.label, d.get("path") or job.label, d.get("step"), d.get("status"),
                              d.get("error"), d.get("stored_at")))
    return out


def run_job(job: Job, out: Path, threads: int, python: str = sys.executable) -> list[UnitStatus]:
    """Run one job in a fresh process and return its units' statuses."""
    fd, status_file = tempfile.mkstemp(prefix="sam-probe-status-", suffix=".jsonl")
    os.close(fd)
    env = {**os.environ, STATUS_FILE_ENV: status_file, "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads)}
    try:
        proc = subprocess.run([python, "-m", "sam_probe", *job.argv, "--out", str(out), "--json", "--quiet",
                               "--no-plot"], env=env, capture_output=True, text=True)
        with open(status_file) as fh:
            units = parse_statuses(job, fh.read().splitlines())
    finally:
        os.unlink(status_file)
    if proc.returncode != 0 and not any(u.status == "failed" for u in units):
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        reason = next((ln for ln in lines if ln.startswith("error:")), lines[-1] if lines else f"exit {proc.returncode}")
        units.append(UnitStatus(job.analysis, job.label, job.label, None, "failed",
                                reason.removeprefix("error:").strip()))
    return units


def run_spec(spec: Spec, out: Path, jobs: int = 1,
             on_done: Callable[[Job, list[UnitStatus]], None] | None = None) -> list[UnitStatus]:
    """Run every job (``jobs`` at a time), continuing past failures."""
    jobs = max(1, int(jobs))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    statuses: list[UnitStatus] = []

    def one(job: Job) -> list[UnitStatus]:
        units = run_job(job, out, threads)
        if on_done:
            on_done(job, units)
        return units

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for units in pool.map(one, spec.items):
            statuses += units
    return statuses
