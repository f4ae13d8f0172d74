"""``sam-probe batch``: specs, summary, exit codes, resuming; and the shipped sample spec end to end."""
from __future__ import annotations

from pathlib import Path

import pytest

from clitools import run_cli
from sam_probe import store

ROOT = Path(__file__).resolve().parents[2]


def _spec(path: Path, body: str) -> Path:
    path.write_text(body)
    return path


def test_batch_runs_resumes_and_summarises(tiny_runs, tmp_path):
    spec = _spec(tmp_path / "spec.toml", f'''
out = "res"
runs = ["{tiny_runs['sgd']}", "{tiny_runs['sam']}"]
[defaults]
max-samples = 60
[[analysis]]
command = "sharpness"
top-k = 1
[[analysis]]
command = "ratios"
runs = ["{tiny_runs['sam']}/step_0000[12]0.pt"]
''')
    res = run_cli("batch", spec, "--jobs", "2", "--json")
    assert res.code == 0, res.stderr
    d = res.json()
    assert d["counts"] == {"ok": 8, "skipped": 0, "failed": 0, "reused": 0} and d["exit_code"] == 0
    assert {(u["analysis"], u["step"]) for u in d["units"]} >= {("sharpness", 0), ("ratios", 10), ("ratios", 20)}
    assert len(list(store.iter_units(tmp_path / "res"))) == 8
    again = run_cli("batch", spec, "--json")
    assert again.code == 0 and again.json()["counts"] == {"ok": 0, "skipped": 8, "failed": 0, "reused": 8}
    assert {(u["status"], u["reused"]) for u in again.json()["units"]} == {("skipped", True)}  # the old name kept
    table = run_cli("batch", spec)
    assert "0 ok, 8 reused (already stored), 0 failed" in table.stdout


def test_batch_spec_errors_are_one_line(tmp_path, tiny_runs):
    bad = _spec(tmp_path / "bad.toml", '[[analysis]]\ncommand = "sharpnes"\nruns = ["x"]\n')
    res = run_cli("batch", bad)
    assert res.code == 2 and "sharpness" in res.stderr and "Traceback" not in res.stderr
    missing = _spec(tmp_path / "m.toml", '[[analysis]]\ncommand = "ratios"\nruns = ["nope-*"]\n')
    assert "matches nothing" in run_cli("batch", missing).stderr
    assert run_cli("batch", tmp_path / "absent.toml").code == 2
    broken = _spec(tmp_path / "b.toml", "[[analysis]\n")
    assert "not valid TOML" in run_cli("batch", broken).stderr


@pytest.mark.slow
def test_shipped_sample_spec_and_report(tmp_path):
    """The README's batch, every job of it, at a small size: every unit ok, then `report` makes every figure.

    The shipped spec runs as written (its relative paths resolve to the sample runs) with a
    ``[defaults]`` table prepended: 64 samples and the checkpoints at round hundreds (2-5 per run)."""
    shipped = (ROOT / "sample_runs" / "batch.toml").read_text()
    assert "[defaults]" not in shipped, "the shipped spec has defaults: merge the test's into them"
    for run in (ROOT / "sample_runs").iterdir():
        if run.is_dir():
            (tmp_path / run.name).symlink_to(run)
    spec = _spec(tmp_path / "batch.toml", '[defaults]\nmax-samples = 64\nglob = "step_000[0-4]00.pt"\n\n' + shipped)
    out = tmp_path / "res"
    res = run_cli("batch", spec, "--out", out, "--jobs", "2", "--json")
    assert res.code == 0, res.stdout[-2000:] + res.stderr
    d = res.json()
    assert d["counts"]["failed"] == 0 and d["counts"]["ok"] > 30
    commands = {line.split('"')[1] for line in shipped.splitlines() if line.startswith("command =")}
    assert {u["analysis"] for u in d["units"]} == commands  # every job of the shipped spec ran
    rep = run_cli("report", out, "-o", tmp_path / "figs")
    assert rep.code == 0, rep.stderr
    names = {p.stem.split("__")[0] for p in (tmp_path / "figs").glob("*.png")}  # <figure>__<runs>__<id>
    assert names >= {"sharpness", "sharpness_density", "ratios_categories", "ratios_buckets", "overlap_C1",
                     "overlap_C1_jaccard", "alignment", "distance", "interpolate", "features"}


def test_spec_alone_cannot_turn_on_trust(tmp_path, tiny_runs):
    spec = _spec(tmp_path / "t.toml", f'''
[[analysis]]
command = "distance"
runs = ["{tiny_runs['sgd']}"]
trust-checkpoint = true
''')
    res = run_cli("batch", spec, "--out", tmp_path / "res")
    assert res.code == 2 and "refused unless the batch command line says --trust-checkpoint" in res.stderr
    assert not (tmp_path / "res").exists()
    ok = run_cli("batch", spec, "--out", tmp_path / "res", "--trust-checkpoint")
    assert ok.code == 0, ok.stderr
    assert ok.stderr.count("--trust-checkpoint: fully unpickling") == 1  # once per job, on the batch's stderr


def test_a_killed_worker_is_replaced_and_its_job_reported(tmp_path, tiny_runs):
    killer = tmp_path / "killer.py"
    killer.write_text("import os, signal\ndef make(**kw):\n    os.kill(os.getpid(), signal.SIGKILL)\n")
    spec = _spec(tmp_path / "k.toml", f'''
[defaults]
max-samples = 40
top-k = 1
rho = 0
[[analysis]]
command = "sharpness"
runs = ["{tiny_runs['sgd']}/step_000010.pt"]
[[analysis]]
command = "sharpness"
runs = ["{tiny_runs['sgd']}/step_000020.pt"]
model = "{killer}:make"
[[analysis]]
command = "sharpness"
runs = ["{tiny_runs['sam']}/step_000020.pt"]
''')
    res = run_cli("batch", spec, "--out", tmp_path / "res", "--jobs", "1", "--json")
    assert res.code == 1
    units = res.json()["units"]
    assert [u["status"] for u in units] == ["ok", "failed", "ok"]
    assert "killed by signal 9" in units[1]["reason"]
    assert len(list(store.iter_units(tmp_path / "res"))) == 2


def test_shards_split_the_jobs_deterministically(tmp_path, tiny_runs):
    from sam_probe.batch import load_spec, shard

    spec = _spec(tmp_path / "s.toml", f'''
runs = ["{tiny_runs['sgd']}", "{tiny_runs['sam']}", "{tiny_runs['sgd']}/step_000010.pt"]
[[analysis]]
command = "sharpness"
[[analysis]]
command = "distance"
runs = ["{tiny_runs['sgd']}", "{tiny_runs['sam']}"]
''')
    jobs = load_spec(spec).items
    parts = [shard(jobs, i, 3) for i in (1, 2, 3)]
    assert sorted(id(j) for p in parts for j in p) == sorted(id(j) for j in jobs)  # each job in one shard
    assert [[j.argv for j in p] for p in parts] == [[j.argv for j in shard(load_spec(spec).items, i, 3)]
                                                    for i in (1, 2, 3)]
    assert all(p for p in parts)
    res = run_cli("batch", spec, "--shard", "2/3", "--out", tmp_path / "res", "--json",
                  "--jobs", "1")
    d = res.json()
    assert res.code == 0 and d["shard"] == "2/3" and d["jobs"] == len(parts[1]) and d["jobs_in_spec"] == 5
    assert run_cli("batch", spec, "--shard", "4/3").code == 2


def test_spec_booleans_map_to_flags(tmp_path):
    """``x = true`` is ``--x``; ``x = false`` is ``--no-x`` where the option has one (never silently the default)."""
    from sam_probe.batch import load_spec

    spec = _spec(tmp_path / "spec.toml", f'''
runs = ["{ROOT / 'sample_runs' / 'digits-mlp-sgd'}"]
[[analysis]]
command = "sharpness"
warm-start = false
trace = true
density = false
per-layer = true
[[analysis]]
command = "subspace"
save_vectors = false
''')
    jobs = load_spec(spec).items
    sharp, sub = jobs[0].argv, jobs[1].argv
    assert "--no-warm-start" in sharp and "--trace" in sharp and "--per-layer" in sharp
    assert not any(a in ("--density", "--no-density") for a in sharp)  # plain flag: false is the default
    assert "--no-save-vectors" in sub


def test_hostile_spec_files_are_one_line(tmp_path):
    import os

    deep = _spec(tmp_path / "deep.toml", "x = " + "[" * 100000 + "]" * 100000 + "\n")
    big = tmp_path / "big.toml"
    big.write_bytes(b"# " + b"x" * (5 << 20) + b"\n")
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    for spec, words in ((deep, "nested too deeply"), (big, "is not a spec"), (fifo, "not a regular file")):
        res = run_cli("batch", spec)
        assert res.code == 2 and words in res.stderr and "Traceback" not in res.stderr, (spec, res.stderr)


def test_sigint_to_a_batch_parent_stops_its_workers(tiny_runs, tmp_path):
    """SIGINT to the batch process alone (not its process group) ends it with 130 and ends its workers: the job
    blocks in a data factory (a FIFO nobody writes) until the parent is interrupted; waits are on events."""
    import os
    import signal
    import subprocess
    import sys
    import time

    started, fifo = tmp_path / "started", tmp_path / "never"
    os.mkfifo(fifo)
    factory = tmp_path / "blocking.py"
    factory.write_text(f"def data():\n    open({str(started)!r}, 'w').close()\n    open({str(fifo)!r}).read()\n")
    spec = _spec(tmp_path / "spec.toml", f'''
[[analysis]]
command = "sharpness"
runs = ["{tiny_runs['sgd']}/step_000000.pt"]
data = "{factory}:data"
''')
    tmp = tmp_path / "tmp"  # its TMPDIR: the workers' status files must not outlive the interrupted batch
    tmp.mkdir()
    parent = subprocess.Popen([sys.executable, "-m", "sam_probe", "batch", str(spec), "--out", str(tmp_path / "o")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                              env={**os.environ, "TMPDIR": str(tmp)},
                              # Ctrl-C as a terminal delivers it, also when pytest runs where SIGINT is ignored
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        while not started.exists():  # the worker reached the job
            assert parent.poll() is None, parent.communicate()
            time.sleep(0.05)  # polling for the event, not a time bound
        workers = [int(p) for p in os.listdir("/proc") if p.isdigit() and _ppid(int(p)) == parent.pid]
        assert workers
        parent.send_signal(signal.SIGINT)
        out, err = parent.communicate(timeout=240)
        assert parent.returncode == 130, err
        assert "interrupted" in err
        assert not [w for w in workers if _alive(w)]
        assert not [f.name for f in tmp.iterdir() if f.name.startswith("sam-probe-status-")]
    finally:
        if parent.poll() is None:
            os.killpg(parent.pid, signal.SIGKILL)


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("PPid:"))
    except (OSError, StopIteration, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as fh:
            return not any(line.startswith("State:") and "Z" in line for line in fh)
    except OSError:
        return False


def test_shard_counts_are_linear_in_the_jobs_and_match_the_greedy_split():
    import random

    from sam_probe.batch import Job, parse_shard, shard
    from sam_probe.errors import SpecError

    class Sized(Job):
        def size(self) -> int:
            return self.where_size

    rng = random.Random(0)
    for _ in range(50):
        jobs = []
        for j in range(rng.randrange(1, 12)):
            job = Sized("sharpness", [f"t{j}"], [])
            job.where_size = rng.randrange(1, 6)
            jobs.append(job)
        n = rng.randrange(1, 8)
        load, want = [0] * n, [[] for _ in range(n)]
        for j in sorted(range(len(jobs)), key=lambda j: (-jobs[j].size(), j)):  # the documented greedy rule
            s = min(range(n), key=lambda k: (load[k], k))
            load[s] += jobs[j].size()
            want[s].append(j)
        for i in range(1, n + 1):
            assert [jobs.index(x) for x in shard(jobs, i, n)] == sorted(want[i - 1])
    assert [j.targets for j in shard(jobs, 1, 30_000_000)] == [jobs[0].targets] or len(jobs) >= 1
    assert parse_shard("1/2147483648") == (1, 2**31)
    for bad in ("1/100000000000", "1/" + "9" * 5000, "0/3", "a/b"):
        try:
            parse_shard(bad)
        except SpecError as exc:
            assert "\n" not in str(exc) and len(str(exc)) < 200
        else:
            raise AssertionError(bad)
