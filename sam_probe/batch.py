"""Batch analysis specs: parse a TOML spec into jobs, check them all, and run them on a pool of workers.

A spec (paths and globs relative to the spec file's folder)::

    out = "results"                 # optional (default ./sam_probe_results; --out wins)
    jobs = 2                        # optional (--jobs wins)
    runs = ["digits-mlp-*"]         # default targets of every analysis

    [defaults]                      # options given to every analysis (CLI names, without --)
    max-samples = 500

    [[analysis]]
    command = "sharpness"           # any analysis command (sam_probe.analyses)
    runs = ["digits-mlp-sgd", "digits-mlp-late-sam"]   # or paths = ["run/step_000100.pt", ...]
    top-k = 3                       # true -> --flag, false -> omitted, list -> repeated
    trace = true

    [[analysis]]
    command = "interpolate"
    pairs = [["run/step_000200.pt", "run/step_000400.pt"]]

One job is one command on one target (a run, a file or a pair).  Every job's
options are checked before any job starts (a typo fails at once, naming the
analysis table and the option).  Jobs run on ``--jobs`` long-lived worker
processes (:mod:`sam_probe.batch_worker`), each running many jobs in turn and
reusing data selections, models and objectives across jobs that share them; a
worker that crashes or is killed is replaced, its job is reported failed with
the reason, and every unit already stored stays whole (units are written
atomically; a re-run skips them).

Trust: a spec is code-like (factories it names run, like a script), but it
cannot turn on full unpickling by itself: ``trust-checkpoint = true`` in a spec
is refused unless the ``batch`` command line says ``--trust-checkpoint`` too.

``--shard i/n`` runs a deterministic share of the jobs (balanced by their
number of checkpoint files), so n processes or machines split one spec with no
coordinator; shards may write into one results directory at once.
"""
from __future__ import annotations

import contextlib
import glob as globmod
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import SpecError, suggest

RESERVED = ("command", "runs", "paths", "pairs", "name")
TOP_LEVEL = ("out", "jobs", "runs", "defaults", "analysis")
TRUST_OPTION = "trust-checkpoint"


def commands() -> tuple[str, ...]:
    """The analyses a spec may run (the registry's, in its order)."""
    from .analyses import names

    return names()


@dataclass
class Job:
    """One command on one target."""

    analysis: str
    targets: list[str]
    argv: list[str]
    where: str = ""
    trusted: bool = False

    @property
    def label(self) -> str:
        return " ".join(self.targets)

    def size(self) -> int:
        """Checkpoints this job reads (its share of the work, for sharding), as run discovery finds them."""
        from .errors import SamProbeError
        from .loading.sources import discover

        n = 0
        for t in self.targets:
            try:
                n += len(discover(t))
            except (SamProbeError, OSError):
                n += 1
        return max(1, n)


@dataclass
class UnitStatus:
    analysis: str
    target: str
    unit: str
    step: int | None
    status: str  # ok | reused | failed
    reason: str | None = None
    stored_at: str | None = None
    seconds: float | None = None


@dataclass
class Spec:
    out: Path | None
    jobs: int | None
    items: list[Job] = field(default_factory=list)


def _negatable(command: str) -> set[str]:
    """Options of ``command`` declared as ``--x/--no-x`` (a spec's ``x = false`` means ``--no-x``)."""
    from .analyses import get

    try:
        return {o.flag for o in get(command).options if any("/--no-" in f for f in o.flags)}
    except SpecError:
        return set()


def _options(opts: dict[str, Any], where: str, negatable: set[str] | frozenset[str] = frozenset()) -> list[str]:
    argv: list[str] = []
    for key, value in opts.items():
        flag = "--" + str(key).replace("_", "-")
        if isinstance(value, bool):
            if value:
                argv.append(flag)
            elif flag in negatable:  # warm_start = false: --no-warm-start (not silently the default)
                argv.append("--no-" + flag[2:])
        elif isinstance(value, list):
            for v in value:
                if isinstance(v, (dict, list)):
                    raise SpecError(f"{where}: option {key} must be a value or a list of values")
                argv += [flag, str(v)]
        elif isinstance(value, dict):
            raise SpecError(f"{where}: option {key} must be a value or a list, not a table")
        else:
            argv += [flag, str(value)]
    return argv


def _expand(patterns: list[Any], base: Path, where: str) -> list[str]:
    out: list[str] = []
    for pat in patterns:
        if not isinstance(pat, str):
            raise SpecError(f"{where}: runs and paths are strings, got {pat!r}")
        full = pat if os.path.isabs(pat) else str(base / pat)
        hits = sorted(globmod.glob(full)) if any(c in pat for c in "*?[") else ([full] if os.path.exists(full) else [])
        if not hits:
            raise SpecError(f"{where}: {pat!r} matches nothing (relative to {base})")
        out += [h for h in hits if h not in out]
    return out


MAX_SPEC_BYTES = 4 << 20  # a spec is a few lines of TOML


def _read(path: Path) -> dict[str, Any]:
    import stat

    try:
        st = path.stat()
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(path)
        if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block or never end
            raise SpecError(f"{path}: not a regular file; give a TOML spec file")
        if st.st_size > MAX_SPEC_BYTES:
            raise SpecError(f"{path}: {st.st_size:,} bytes is not a spec (at most {MAX_SPEC_BYTES:,})")
        return tomllib.loads(path.read_text())
    except RecursionError:
        raise SpecError(f"{path}: not valid TOML (nested too deeply)") from None
    except FileNotFoundError:
        raise SpecError(f"{path}: no such spec file") from None
    except IsADirectoryError:
        raise SpecError(f"{path}: is a directory; give a TOML spec file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SpecError(f"{path}: not valid TOML ({exc})") from None


def _check_top_level(raw: dict[str, Any], path: Path) -> None:
    unknown = set(raw) - set(TOP_LEVEL)
    if unknown:
        raise SpecError(f"{path}: unknown top-level keys {sorted(unknown)} (use out, jobs, runs, defaults, [[analysis]])")
    jobs = raw.get("jobs")
    if jobs is not None and (isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1):
        raise SpecError(f"{path}: jobs = {jobs!r}: give a positive whole number, e.g. jobs = 2")
    if "out" in raw and not isinstance(raw["out"], str):
        raise SpecError(f"{path}: out = {raw['out']!r}: give a folder name as a string")
    if not isinstance(raw.get("defaults", {}), dict):
        raise SpecError(f"{path}: [defaults] must be a table of options")
    if not isinstance(raw.get("runs", []), list):
        raise SpecError(f"{path}: runs must be a list of paths or globs")
    analyses = raw.get("analysis")
    if not isinstance(analyses, list) or not analyses or not all(isinstance(a, dict) for a in analyses):
        raise SpecError(f"{path}: no [[analysis]] tables (each names a command and its options)")


def load_spec(path: str | Path, *, trust: bool = False) -> Spec:
    """Parse a spec and check every job's options; every problem is one :class:`SpecError` line.

    ``trust``: the batch command line said ``--trust-checkpoint`` (only then may a job unpickle fully)."""
    path = Path(path)
    raw = _read(path)
    _check_top_level(raw, path)
    base = path.resolve().parent
    defaults = raw.get("defaults") or {}
    top_runs = raw.get("runs") or []
    names = commands()
    spec = Spec(out=(base / raw["out"]) if "out" in raw else None, jobs=raw.get("jobs"))
    for i, a in enumerate(raw["analysis"]):
        where = f"{path} [[analysis]] #{i + 1}"
        cmd = a.get("command")
        if cmd not in names:
            raise SpecError(f"{where}: command {cmd!r}{suggest(str(cmd), names)}; choose one of {', '.join(names)}")
        where = f"{where} ({cmd})"
        opts = {**defaults, **{k: v for k, v in a.items() if k not in RESERVED}}
        wants_trust = bool(opts.get(TRUST_OPTION) or opts.get(TRUST_OPTION.replace("-", "_")))
        if wants_trust and not trust:
            raise SpecError(f"{where}: {TRUST_OPTION} = true in a spec is refused unless the batch command line "
                            "says --trust-checkpoint too (full unpickling runs any code a checkpoint holds)")
        opts = {k: v for k, v in opts.items() if k not in (TRUST_OPTION, TRUST_OPTION.replace("-", "_"))}
        argv_opts = _options(opts, where, _negatable(cmd)) + (["--trust-checkpoint"] if trust else [])
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
            spec.items.append(Job(cmd, t, [cmd, *t, *argv_opts], where, trust))
    validate(spec)
    return spec


def validate(spec: Spec) -> None:
    """Parse every job's command line and check its options as the command would, before
    anything runs (no torch, no files read beyond the spec's paths)."""
    import typer.main

    from .analyses import get
    from .cli import app
    from .commands.options import ANALYSIS_OPTIONS, build_common

    group = typer.main.get_command(app)
    seen: set[tuple[str, tuple[str, ...]]] = set()
    for job in spec.items:
        opts_key = (job.analysis, tuple(job.argv[1 + len(job.targets):]))
        if opts_key in seen:
            continue
        seen.add(opts_key)
        command = group.commands[job.analysis]  # type: ignore[attr-defined]
        try:
            ctx = command.make_context(job.analysis, list(job.argv[1:]), resilient_parsing=False)
        except Exception as exc:  # click's usage errors (vendored by typer, or click itself)
            if not hasattr(exc, "format_message"):
                raise
            raise SpecError(f"{job.where}: {exc.format_message()}") from None
        values = dict(ctx.params)
        common = build_common({k: values[k] for k in ANALYSIS_OPTIONS if k in values})
        analysis = get(job.analysis)
        from .analyses.base import check_sharding

        check_sharding(analysis, common.settings)
        analysis.impl.configure({o.name: values[o.name] for o in analysis.compute_options()}, common.settings)


# ------------------------------------------------------------------ sharding
MAX_SHARDS = 2**31  # --shard i/n: n shards (any n works in time and memory proportional to the jobs)


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"i/n"`` (1 <= i <= n <= MAX_SHARDS) -> ``(i, n)``."""
    if text is None:
        return None
    try:
        parts = text.split("/")
        if len(parts) != 2 or any(len(x.strip()) > 12 for x in parts):
            raise ValueError(text)
        i, n = (int(x) for x in parts)
    except ValueError:
        raise SpecError(f"--shard {text[:40]}: give i/n, e.g. --shard 2/4 (n at most {MAX_SHARDS:,})") from None
    if n > MAX_SHARDS:
        raise SpecError(f"--shard {text[:40]}: n must be at most {MAX_SHARDS:,}")
    if not 1 <= i <= n:
        raise SpecError(f"--shard {text}: i must be between 1 and n")
    return i, n


def shard(jobs: list[Job], i: int, n: int) -> list[Job]:
    """Shard ``i`` of ``n``: jobs dealt largest first to the least loaded shard (ties to the
    lowest shard), so the split depends only on the spec and its files.

    Time and memory grow with the jobs, not with ``n``: only shards that got a job are kept
    (in a heap by ``(load, shard)``); the untouched ones are all at load 0, the lowest next."""
    import heapq

    sizes = [job.size() for job in jobs]
    used: list[tuple[int, int]] = []  # (load, shard) of shards that got a job
    fresh = 0  # shards fresh..n-1 have no job yet
    mine: list[int] = []
    for j in sorted(range(len(jobs)), key=lambda j: (-sizes[j], j)):
        if fresh < n and (not used or (0, fresh) < used[0]):
            s, load = fresh, 0
            fresh += 1
        else:
            load, s = heapq.heappop(used)
        heapq.heappush(used, (load + sizes[j], s))
        if s == i - 1:
            mine.append(j)
    return [jobs[j] for j in sorted(mine)]


# ------------------------------------------------------------------ running
def parse_statuses(job: Job, lines: list[str]) -> list[UnitStatus]:
    out = []
    for line in lines:
        try:
            d = json.loads(line)
        except ValueError:
            continue
        out.append(UnitStatus(job.analysis, job.label, d.get("path") or job.label, d.get("step"), d.get("status"),
                              d.get("error"), d.get("stored_at"), d.get("seconds")))
    return out


class Worker:
    """One long-lived ``python -m sam_probe.batch_worker`` process: jobs in on stdin, one reply
    line per job on stdout; its stderr goes to a log file (read when it dies)."""

    def __init__(self, threads: int, python: str = sys.executable):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
               "SAM_PROBE_THREADS": str(threads)}
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([python, "-m", "sam_probe.batch_worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, env=env, text=True, bufsize=1)

    def run(self, job: Job, out: Path) -> tuple[int | None, str]:
        """``(exit code, what the job printed on stderr)``; ``None`` when the worker died."""
        request = {"argv": [*job.argv, "--out", str(out), "--json", "--quiet", "--no-plot"],
                   "status_file": job_status_file(job)}
        try:
            assert self.proc.stdin is not None and self.proc.stdout is not None
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        if not line:
            return None, self.death()
        reply = json.loads(line)
        return int(reply["rc"]), str(reply.get("stderr") or "")

    def death(self) -> str:
        """Why the worker is gone (its exit status and the last line it wrote)."""
        try:
            code = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.log.seek(0)
        tail = [ln for ln in self.log.read().strip().splitlines() if ln.strip()][-1:]
        how = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
        return f"the worker process running this job {how}" + (f" ({tail[0][:160]})" if tail else "")

    def close(self) -> None:
        try:
            if self.proc.stdin:
                self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
        self.log.close()

    def interrupt(self) -> None:
        """Stop the worker as Ctrl-C stops a command: SIGINT (its job ends at once, stored units stay whole),
        and no further jobs (its stdin is closed, so it exits)."""
        import signal

        try:
            self.proc.send_signal(signal.SIGINT)
        except OSError:
            pass
        try:
            if self.proc.stdin:
                self.proc.stdin.close()
        except OSError:
            pass

    def reap(self, grace: float = 10.0) -> None:
        """Wait for an interrupted worker, killing it when it does not end within ``grace`` seconds."""
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


_STATUS_FILES: dict[int, str] = {}


def job_status_file(job: Job) -> str:
    fd, path = tempfile.mkstemp(prefix="sam-probe-status-", suffix=".jsonl")
    os.close(fd)
    _STATUS_FILES[id(job)] = path
    return path


def _drop_status_file(job: Job) -> None:
    """Remove ``job``'s status file (if any) and forget it."""
    path = _STATUS_FILES.pop(id(job), None)
    if path:
        with contextlib.suppress(OSError):
            os.unlink(path)


def _finish_job(job: Job, rc: int | None, stderr: str) -> list[UnitStatus]:
    path = _STATUS_FILES.get(id(job))
    units: list[UnitStatus] = []
    if path:
        try:
            with open(path) as fh:
                units = parse_statuses(job, fh.read().splitlines())
        finally:
            _drop_status_file(job)
    if rc is None:  # the worker died: units it reported stay; the job itself failed
        units.append(UnitStatus(job.analysis, job.label, job.label, None, "failed", stderr))
    elif rc != 0 and not any(u.status == "failed" for u in units):
        lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
        reason = next((ln for ln in lines if ln.startswith("error:")), lines[-1] if lines else f"exit {rc}")
        units.append(UnitStatus(job.analysis, job.label, job.label, None, "failed", reason.removeprefix("error:").strip()))
    return units


def run_spec(spec: Spec, out: Path, jobs: int = 1, items: list[Job] | None = None,
             on_done: Callable[[Job, list[UnitStatus], str], None] | None = None) -> list[UnitStatus]:
    """Run ``items`` (default: every job of ``spec``) on ``jobs`` workers, continuing past failures;
    statuses come back in job order."""
    items = spec.items if items is None else items
    jobs = max(1, min(int(jobs), len(items) or 1))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    todo: queue.Queue[tuple[int, Job]] = queue.Queue()
    for pair in enumerate(items):
        todo.put(pair)
    done: dict[int, list[UnitStatus]] = {}
    lock = threading.Lock()
    stop = threading.Event()
    live: set[Worker] = set()

    def drive() -> None:
        worker: Worker | None = None
        try:
            while not stop.is_set():
                try:
                    index, job = todo.get_nowait()
                except queue.Empty:
                    return
                if worker is None:
                    with lock:
                        if stop.is_set():
                            return
                        worker = Worker(threads)
                        live.add(worker)
                rc, stderr = worker.run(job, out)
                if stop.is_set():
                    return
                if rc is None:  # replace a dead worker before the next job
                    worker.log.close()
                    with lock:
                        live.discard(worker)
                    worker = None
                units = _finish_job(job, rc, stderr)
                with lock:
                    done[index] = units
                    if on_done:
                        on_done(job, units, stderr)
        finally:
            if worker is not None and not stop.is_set():
                worker.close()

    threads_ = [threading.Thread(target=drive, daemon=True) for _ in range(jobs)]
    try:
        for t in threads_:
            t.start()
        for t in threads_:
            t.join()
    except BaseException:  # Ctrl-C / SIGINT (or any exit) of this process: its workers stop with it
        stop.set()
        with lock:
            workers = list(live)
        for w in workers:
            w.interrupt()
        for w in workers:
            w.reap()
        for job in items:  # the status files of interrupted jobs (read and removed by _finish_job otherwise)
            _drop_status_file(job)
        raise
    return [u for i in sorted(done) for u in done[i]]
