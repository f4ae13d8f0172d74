"""Reliability of batches: kill -9, bad checkpoints among good ones, concurrent writers, readers while
writing, and a malicious checkpoint that must never run."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest
import torch

from sam_probe import store

pytestmark = pytest.mark.slow  # batches as processes: kill -9, concurrency (pytest -m "not slow" skips it)

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_RUN = ROOT / "sample_runs" / "digits-mlp-sgd"  # 11 checkpoints of the sample runs' MLP
N_CKPT = 5  # the first five of them: a kill after 2 units still leaves 3 to resume


@pytest.fixture
def slow_run(tmp_path) -> Path:
    """A run directory of :data:`N_CKPT` of the sample run's checkpoints (links to the shipped files)."""
    run = tmp_path / "digits-mlp-sgd"
    run.mkdir()
    for f in sorted(SAMPLE_RUN.glob("step_*.pt"))[:N_CKPT]:
        (run / f.name).symlink_to(f)
    return run


def _batch(spec: Path, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sam_probe", "batch", str(spec), "--json", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kw)


def _finish(p: subprocess.Popen) -> tuple[int, dict]:
    out, err = p.communicate(timeout=300)
    return p.returncode, json.loads(out) if out.strip() else {"stderr": err}


def _spec(tmp_path: Path, run: Path, extra: str = "top-k = 2\nrho = 0\n", name="spec.toml") -> Path:
    spec = tmp_path / name
    spec.write_text(f'runs = ["{run}"]\n[[analysis]]\ncommand = "sharpness"\n{extra}')
    return spec


def _units(out: Path) -> list[Path]:
    return sorted(out.rglob("*.h5"))


GATE = """
import glob, os, time

from sam_probe.loading.models import build_model

OUT, HOLD, AFTER = {out!r}, {hold!r}, {after}


def model():
    \"\"\"The sample runs' MLP; while HOLD exists, its forward waits as soon as AFTER units are stored.\"\"\"
    net = build_model("mlp", {{"in_dim": 64, "hidden": [64, 64], "out_dim": 10}})

    class Gated(type(net)):
        def forward(self, x):
            while os.path.exists(HOLD) and len(glob.glob(os.path.join(OUT, "**", "*.h5"), recursive=True)) >= AFTER:
                time.sleep(0.02)
            return super().forward(x)

    net.__class__ = Gated
    return net
"""


def _gated(tmp_path: Path, out: Path, after: int) -> tuple[str, Path]:
    """A ``--model`` that holds the batch inside its next unit once ``after`` units are stored, for as long
    as the returned hold file exists: the test then acts on a batch known to be mid-run (an event, not a
    clock), and deleting the file lets it finish."""
    hold = tmp_path / "hold"
    hold.touch()
    gate = tmp_path / "gate.py"
    gate.write_text(GATE.format(out=str(out), hold=str(hold), after=after))
    return f"{gate}:model", hold


def _wait_for_units(p: subprocess.Popen, out: Path, n: int) -> list[Path]:
    """The stored units once ``n`` exist (or the batch ended, which the caller's asserts then show)."""
    while len(_units(out)) < n and p.poll() is None:
        time.sleep(0.02)
    return _units(out)


def test_kill_9_mid_batch_keeps_every_written_unit_and_resume_completes(tmp_path, slow_run):
    out = tmp_path / "res"
    model, hold = _gated(tmp_path, out, after=2)
    spec = _spec(tmp_path, slow_run, f'top-k = 5\nmax-samples = 60\nmodel = "{model}"\n')
    p = _batch(spec, "--out", str(out))
    try:
        _wait_for_units(p, out, 2)  # the worker now waits inside the third unit
        assert p.poll() is None, _finish(p)
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    before = _units(out)
    assert len(before) == 2, "the batch must be killed in the middle"
    for u in before:  # every unit written before the kill is complete and readable
        result, meta = store.read_unit(u)
        assert len(result["eigenvalues"]) == 5 and meta["analysis"] == "sharpness"
    hold.unlink()
    code, d = _finish(_batch(spec, "--out", str(out)))
    assert code == 0, d
    assert d["counts"]["failed"] == 0
    assert d["counts"]["skipped"] == d["counts"]["reused"] == 2 and d["counts"]["ok"] == N_CKPT - 2
    assert len(_units(out)) == N_CKPT


def test_bad_checkpoints_among_good_ones(tmp_path, tiny_runs):
    run = tmp_path / "run"
    shutil.copytree(tiny_runs["sam"], run)
    good = torch.load(run / "step_000020.pt", weights_only=True)
    data = (run / "step_000020.pt").read_bytes()
    (run / "step_000030.pt").write_bytes(data[: len(data) // 3])  # truncated
    (run / "step_000040.pt").write_bytes(os.urandom(2000))  # corrupt
    nan = {**good, "step": 50, "model": {k: v.clone() for k, v in good["model"].items()}}
    next(iter(nan["model"].values()))[0] = float("nan")
    torch.save(nan, run / "step_000050.pt")
    wrong = {**good, "step": 60, "model": {k: torch.zeros(3, 3) if k.endswith("weight") else v
                                            for k, v in good["model"].items()}}
    torch.save(wrong, run / "step_000060.pt")
    out = tmp_path / "res"
    code, d = _finish(_batch(_spec(tmp_path, run, "top-k = 1\nrho = 0\nmax-samples = 60\n"), "--out", str(out)))
    assert code == 1
    failed = {Path(u["unit"]).name: u["reason"] for u in d["units"] if u["status"] == "failed"}
    assert set(failed) == {"step_000030.pt", "step_000040.pt", "step_000050.pt", "step_000060.pt"}
    assert "truncated" in failed["step_000030.pt"]
    assert "non-finite" in failed["step_000050.pt"]
    assert "shape" in failed["step_000060.pt"] or "mismatch" in failed["step_000060.pt"]
    assert all("\n" not in r for r in failed.values())
    assert sorted(u["step"] for u in d["units"] if u["status"] == "ok") == [0, 10, 20]
    assert len(_units(out)) == 3


def test_two_batches_into_one_output_directory(tmp_path, slow_run):
    out = tmp_path / "res"
    spec = _spec(tmp_path, slow_run, "top-k = 1\nrho = 0\nmax-samples = 40\n")  # the writes race, not the maths
    a, b = _batch(spec, "--out", str(out)), _batch(spec, "--out", str(out))
    (ca, da), (cb, db) = _finish(a), _finish(b)
    assert ca == cb == 0, (da, db)
    units = _units(out)
    assert len(units) == N_CKPT and not list(out.rglob("*.tmp"))
    evs = {}
    for u in units:
        result, _ = store.read_unit(u)
        evs[int(result["step"])] = list(result["eigenvalues"])
    # both batches computed the same numbers; whichever rename came last, every file is whole
    assert sorted(evs) == list(range(0, 40 * N_CKPT, 40))


def test_results_readable_from_another_process_while_a_batch_runs(tmp_path, slow_run):
    out = tmp_path / "res"
    model, hold = _gated(tmp_path, out, after=2)
    p = _batch(_spec(tmp_path, slow_run, f'top-k = 2\nmax-samples = 60\nmodel = "{model}"\n'), "--out", str(out))
    try:
        units = _wait_for_units(p, out, 2)
        assert p.poll() is None, _finish(p)  # held inside its third unit: still running
        for u in units:  # this test process is "another process" for the batch
            with h5py.File(u, "r") as f:
                assert "result" in f and f.attrs["analysis"] == "sharpness"
    finally:
        hold.unlink()  # let it finish
    code, d = _finish(p)
    assert code == 0 and d["counts"]["ok"] == N_CKPT, d
    for u in _units(out):  # and every unit it wrote after the reads is whole
        assert store.read_unit(u)[1]["analysis"] == "sharpness"


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_checkpoint_in_a_batch_is_refused_and_never_runs(tmp_path, tiny_runs):
    run = tmp_path / "run"
    shutil.copytree(tiny_runs["sgd"], run)
    marker = tmp_path / "PWNED"
    good = torch.load(run / "step_000020.pt", weights_only=True)
    torch.save({**good, "step": 30, "config": _Evil(marker)}, run / "step_000030.pt")
    torch.save({**good, "step": 40}, run / "step_000040.pt")
    code, d = _finish(_batch(_spec(tmp_path, run, "top-k = 1\nrho = 0\nmax-samples = 60\n"), "--out",
                             str(tmp_path / "res")))
    assert code == 1
    assert not marker.exists()
    failed = [u for u in d["units"] if u["status"] == "failed"]
    assert len(failed) == 1 and "step_000030.pt" in failed[0]["unit"] and "refused" in failed[0]["reason"]
    assert sum(u["status"] == "ok" for u in d["units"]) == 4
