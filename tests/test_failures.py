"""Every failure is one clear line with exit code 2, and nothing already computed is lost."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from clitools import run_cli
from sam_probe import store

FAST = ["--max-samples", "40", "--top-k", "1", "--rho", "0", "--no-plot"]


def _errors(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error:")]


@contextmanager
def _tmpfs(path: Path, size: str, readonly: bool = False):
    """A small tmpfs at ``path`` (root only; the test is skipped where mounting is not allowed)."""
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if readonly else "")
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root and mount to make a small tmpfs")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_out_is_a_file_results_still_printed(tiny_runs, tmp_path):
    out = tmp_path / "a-file"
    out.write_text("x")
    res = run_cli("sharpness", tiny_runs["sgd"] / "step_000010.pt", *FAST, "--out", out, "--json")
    assert res.code == 2
    assert res.json()["results"][0]["eigenvalues"], "the computed result must still be printed"
    (line,) = _errors(res.stderr)
    assert str(out) in line and "not stored" in line and "Traceback" not in res.stderr


def test_out_on_a_read_only_filesystem(tiny_runs, tmp_path):
    with _tmpfs(tmp_path / "ro", "1m", readonly=True) as ro:
        res = run_cli("sharpness", tiny_runs["sgd"], *FAST, "--out", ro / "res", "--json")
    assert res.code == 2
    assert len(res.json()["results"]) == 3
    (line,) = _errors(res.stderr)  # one line for the whole command, not one per unit
    assert "read-only" in line or "not writable" in line


def test_disk_full_during_a_unit_keeps_earlier_units_and_prints_all(tiny_runs, tmp_path):
    ok = run_cli("ratios", tiny_runs["sam"] / "step_000000.pt", "--max-samples", "40", "--no-store", "--json")
    assert ok.code == 0
    with _tmpfs(tmp_path / "small", "120k") as small:
        res = run_cli("ratios", tiny_runs["sam"], "--max-samples", "40", "--out", small, "--json", "--no-plot")
        units = [p for p in small.rglob("*.h5")]
        readable = [p for p in units if store.exists(p)]
        leftovers = [p for p in small.rglob(".*") if p.is_file()]
    assert len(res.json()["results"]) == 3
    if res.code == 0:
        pytest.skip("the tmpfs held every unit (h5py wrote less than expected)")
    assert res.code == 2 and "no space left" in " ".join(_errors(res.stderr))
    assert readable == units and not leftovers


def test_model_that_does_not_accept_the_data_is_one_line(tiny_runs, tmp_path):
    res = run_cli("sharpness", tiny_runs["sgd"] / "step_000010.pt", "--data", "synthetic-minor-major", *FAST,
                  "--no-store")
    assert res.code == 2
    (line,) = _errors(res.stderr)
    assert "--model" in line and "Traceback" not in res.stderr


def test_nonfinite_weights_allowed_then_failing_numerics_are_one_line(tiny_runs, tmp_path):
    ck = torch.load(tiny_runs["sgd"] / "step_000010.pt", weights_only=True)
    ck["model"] = {k: torch.full_like(v, float("nan")) for k, v in ck["model"].items()}
    bad = tmp_path / "step_000010.pt"
    torch.save(ck, bad)
    assert "--allow-nonfinite" in run_cli("sharpness", bad, *FAST, "--no-store").stderr
    res = run_cli("sharpness", bad, *FAST, "--no-store", "--allow-nonfinite")
    assert res.code in (0, 2) and "Traceback" not in res.stderr
    if res.code == 2:
        assert len(_errors(res.stderr)) == 1


def test_messages_escape_markup_and_control_characters(tmp_path):
    weird = tmp_path / "run [bold]x \x1b[31mred"
    weird.mkdir()
    (weird / "[red]ckpt[blink].pt").write_bytes(b"not a checkpoint at all")
    res = run_cli("inspect", weird)
    assert res.code == 2
    (line,) = _errors(res.stderr)
    assert "[red]ckpt[blink].pt" in line and "run [bold]x" in line and "\x1b" not in res.stderr


def test_unknown_analysis_option_in_a_spec_names_it_fast(tmp_path, tiny_runs):
    spec = tmp_path / "s.toml"
    spec.write_text(f'[[analysis]]\ncommand = "sharpness"\nruns = ["{tiny_runs["sgd"]}"]\ntop-kk = 3\n')
    res = run_cli("batch", spec)
    assert res.code == 2
    (line,) = _errors(res.stderr)
    assert "#1 (sharpness)" in line and "--top-kk" in line and "╰" not in line
    spec.write_text(f'jobs = "two"\n[[analysis]]\ncommand = "sharpness"\nruns = ["{tiny_runs["sgd"]}"]\n')
    res = run_cli("batch", spec)
    assert res.code == 2 and "jobs" in _errors(res.stderr)[0]
    spec.write_text(f'[[analysis]]\ncommand = "sharpness"\nruns = ["{tiny_runs["sgd"]}"]\nwhich = "XX"\n')
    assert "--which XX" in run_cli("batch", spec).stderr


def _torch_loaded(pid: int) -> bool:
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def test_sigint_prints_interrupted_exits_130_and_leaves_no_partial_files(tiny_runs, tmp_path):
    import time

    out = tmp_path / "res"
    proc = subprocess.Popen([sys.executable, "-m", "sam_probe", "sharpness", str(tiny_runs["sgd"]), "--max-samples",
                             "60", "--trace", "--trace-tol", "1e-9", "--trace-max-hvp", "1000000", "--batch-size", "1",
                             "--out", str(out)],  # chunks of 1: every product 60 passes, so the run outlasts the wait
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for _ in range(1200):  # until torch is loaded: the command is then inside its analysis
        if proc.poll() is not None or _torch_loaded(proc.pid):
            break
        time.sleep(0.1)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert not [p for p in out.rglob(".*") if p.is_file()]


SWALLOWED = """
import os, signal, sys, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
try:  # a library's optional import that hides whatever it raises, KeyboardInterrupt included
    import slow_import  # Ctrl-C arrives while it is imported
except BaseException:
    pass
from sam_probe.loading.models import build_model


def factory():
    return build_model("mlp", {"in_dim": 64, "hidden": [6], "out_dim": 10})
"""


def test_ctrl_c_during_an_import_a_library_swallows_still_interrupts(tiny_runs, tmp_path):
    """SIGINT that lands inside an import is delivered once the import is over (raised inside it, a library's
    ``except`` can hide it, leave half-imported modules behind and turn the run into unrelated failures, or a
    C++ callback can abort): the command ends as interrupted, exit 130 (before: the run went on, exit 0)."""
    (tmp_path / "slow_import.py").write_text("import os, signal, time\nos.kill(os.getpid(), signal.SIGINT)\n"
                                             "time.sleep(0.5)\n")
    (tmp_path / "hidden.py").write_text(SWALLOWED)
    proc = subprocess.run([sys.executable, "-m", "sam_probe", "sharpness", str(tiny_runs["sgd"] / "step_000010.pt"),
                           "--model", f"{tmp_path / 'hidden.py'}:factory", *FAST, "--no-store"],
                          capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.returncode == 130, proc.stderr
    assert "interrupted" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------ the error boundary (whose error is it?)
def test_a_bug_in_sam_probe_is_never_blamed_on_the_inputs(tiny_runs, monkeypatch):
    """A KeyError in sam-probe's own code: one line that calls it a sam-probe bug and where (no advice
    about --model/--data), exit 2; ``--debug`` prints its traceback."""
    from sam_probe.analyses import sharpness

    configure = sharpness.configure
    monkeypatch.setattr(sharpness, "configure",  # a config that lacks a key the analysis reads: our bug
                        lambda opts, settings: {k: v for k, v in configure(opts, settings).items() if k != "warm_start"})
    ck = tiny_runs["sgd"] / "step_000010.pt"
    res = run_cli("sharpness", ck, *FAST, "--no-store")
    assert res.code == 2 and "Traceback" not in res.stderr
    (line,) = _errors(res.stderr)
    assert "KeyError: 'warm_start'" in line and "bug in sam-probe" in line and "sam_probe/analyses/base.py:" in line
    assert "--model" not in line and "--data" not in line and "--debug" in line
    debug = run_cli("sharpness", ck, *FAST, "--no-store", "--debug")
    assert debug.code == 2 and "Traceback" in debug.stderr and "warm_started" in debug.stderr


FLAKY = '''
from sam_probe.loading.models import build_model


def factory():
    model = build_model("mlp", {"in_dim": 64, "hidden": [6], "out_dim": 10})

    class Flaky(type(model)):
        def forward(self, x):
            if x.shape[0] > 2:  # takes the 2-sample probe, fails on the selection
                raise KeyError("by_")
            return super().forward(x)

    model.__class__ = Flaky
    return model
'''


def test_an_error_in_the_users_forward_names_it_and_the_options(tiny_runs, tmp_path):
    flaky = tmp_path / "flaky.py"
    flaky.write_text(FLAKY)
    res = run_cli("sharpness", tiny_runs["sgd"] / "step_000010.pt", "--model", f"{flaky}:factory", *FAST,
                  "--no-store")
    assert res.code == 2 and "Traceback" not in res.stderr
    (line,) = _errors(res.stderr)
    assert f"KeyError: 'by_' (in the model's forward at {flaky}:11: check that --model/--model-arg fit --data " \
           "and --loss)" in line


def test_outputs_that_do_not_fit_the_labels_do_not_accept_the_data(tiny_runs, tmp_path):
    """torch's loss failing on the model's outputs in the two-sample probe is the inputs' mismatch."""
    odd = tmp_path / "odd.py"
    odd.write_text(FLAKY.replace('            if x.shape[0] > 2:  # takes the 2-sample probe, fails on the selection\n'
                                 '                raise KeyError("by_")\n            return super().forward(x)',
                                 '            return super().forward(x)[:, None, :]  # [B, 1, C] for labels [B]'))
    res = run_cli("sharpness", tiny_runs["sgd"] / "step_000010.pt", "--model", f"{odd}:factory", *FAST, "--no-store")
    assert res.code == 2 and "Traceback" not in res.stderr
    (line,) = _errors(res.stderr)
    assert "the model does not accept the data" in line and "check --model/--model-arg against --data" in line
