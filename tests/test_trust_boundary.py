"""What a checkpoint may choose: only built-in models, data and losses; never code.

A checkpoint's ``model_spec`` (torch zip, legacy file or safetensors metadata) or its
hyper-parameters' ``data`` / ``loss`` naming ``module:attr`` or ``file.py:fn`` is
refused for every command and the Python API, and nothing it names is imported or
called. A factory the *user* names (``--model``, ``--allow-model``) is theirs to run.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from clitools import run_cli

COMMANDS = {
    "sharpness": ["--top-k", "1", "--rho", "0"],
    "ratios": [],
    "overlap": [],
    "alignment": ["--k", "1", "--vectors", "full"],
    "distance": [],
    "features": [],
}


def _evil_file(tmp_path: Path, marker: Path) -> Path:
    """A Python file that leaves ``marker`` behind if it is ever imported."""
    f = tmp_path / "evil.py"
    f.write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
                 "def make(**kw):\n    raise SystemExit('called')\n")
    return f


def _specs(tmp_path: Path, marker: Path) -> dict[str, dict]:
    evil = _evil_file(tmp_path, marker)
    return {
        "os-system": {"model_spec": {"name": "os:system", "args": {"command": f"touch {marker}"}}},
        "subprocess": {"model_spec": {"name": "subprocess:run", "args": {"args": f"touch {marker}", "shell": True}}},
        "file-factory": {"model_spec": {"name": f"{evil}:make", "args": {}}},
        "zoo-kwargs": {"model_spec": {"name": "mlp", "args": {"in_dim": 64, "hidden": [6], "out_dim": 10,
                                                              "evil": {"__class__": "os.system"}}}},
        "data-factory": {"hparams": {"data": f"{evil}:make"}},
        "loss-factory": {"hparams": {"loss": f"{evil}:make", "data": "digits"}},
    }


MLP = {"name": "mlp", "args": {"in_dim": 64, "hidden": [6], "out_dim": 10}}


def _write(path: Path, state: dict, extra: dict, fmt: str, step: int = 10) -> None:
    extra = {"model_spec": MLP, **extra}
    if fmt == "safetensors":
        from safetensors.torch import save_file

        meta = {"step": str(step)}
        if "model_spec" in extra:
            meta["model_spec"] = json.dumps(extra["model_spec"])
        if "hparams" in extra:
            meta["hparams"] = json.dumps(extra["hparams"])
        save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=meta)
        return
    payload = {"model": state, "step": step, **extra}
    torch.save(payload, path, _use_new_zipfile_serialization=(fmt == "zip"))


@pytest.fixture(scope="module")
def state(tiny_runs):
    return torch.load(tiny_runs["sgd"] / "step_000010.pt", weights_only=True)["model"]


@pytest.mark.parametrize("fmt", ["zip", "legacy", "safetensors"])
def test_checkpoint_named_code_is_never_run_by_any_command(tmp_path, state, fmt):
    marker = tmp_path / "PWNED"
    for name, extra in _specs(tmp_path, marker).items():
        if fmt == "safetensors" and name == "zoo-kwargs":
            continue
        run = tmp_path / f"run-{name}"
        run.mkdir()
        for step in (10, 20):
            _write(run / f"step_{step:06d}.{'safetensors' if fmt == 'safetensors' else 'pt'}", state, extra, fmt, step)
        for cmd, opts in COMMANDS.items():
            if cmd == "distance" and name in ("data-factory", "loss-factory"):
                continue  # distance reads no data and no loss
            data = [] if name in ("data-factory", "loss-factory") else ["--data", "digits"]
            res = run_cli(cmd, run, *data, "--max-samples", "40", *opts, "--out", tmp_path / "res", "--no-plot")
            assert res.code == 2, (name, cmd, res.stdout, res.stderr)
            errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
            assert errors and all("never" in ln or "not a plain value" in ln for ln in errors), (name, cmd, res.stderr)
            assert "Traceback" not in res.stderr
        pair = sorted(run.iterdir())
        data = [] if name in ("data-factory", "loss-factory") else ["--data", "digits"]
        res = run_cli("interpolate", *pair, *data, "--max-samples", "40", "--out", tmp_path / "res", "--no-plot")
        assert res.code == 2 and ("never" in res.stderr or "not a plain value" in res.stderr), (name, res.stderr)
    assert not marker.exists()


def test_checkpoint_named_code_refused_by_the_api_and_batch(tmp_path, state):
    import sam_probe as sp
    from sam_probe.errors import SamProbeError

    marker = tmp_path / "PWNED"
    specs = _specs(tmp_path, marker)
    run = tmp_path / "run"
    run.mkdir()
    _write(run / "step_000010.pt", state, specs["os-system"], "zip")
    with pytest.raises(SamProbeError, match="never imports or calls code"):
        sp.objective(run / "step_000010.pt", data="digits", max_samples=20)
    spec = tmp_path / "spec.toml"
    spec.write_text(f'[[analysis]]\ncommand = "sharpness"\nruns = ["{run}"]\ndata = "digits"\nmax-samples = 20\n'
                    'top-k = 1\nrho = 0\n')
    res = run_cli("batch", spec, "--out", tmp_path / "res", "--json")
    assert res.code == 1
    failed = [u for u in res.json()["units"] if u["status"] == "failed"]
    assert len(failed) == 1 and "os:system" in failed[0]["reason"]
    assert not marker.exists()


def test_a_factory_the_user_names_or_allows_is_theirs_to_run(tmp_path, state):
    f = tmp_path / "mine.py"
    f.write_text("from sam_probe.loading.models import mlp\n"
                 "def make(in_dim=64, hidden='6', out_dim=10):\n    return mlp(in_dim, hidden, out_dim)\n")
    ck = tmp_path / "step_000010.pt"
    torch.save({"model": state, "step": 10, "model_spec": {"name": f"{f}:make", "args": {"hidden": "6"}}}, ck)
    common = ["--data", "digits", "--max-samples", "40", "--top-k", "1", "--rho", "0", "--no-store", "--json"]
    assert run_cli("sharpness", ck, *common).code == 2
    assert run_cli("sharpness", ck, "--model", f"{f}:make", *common).code == 0
    assert run_cli("sharpness", ck, "--allow-model", f"{f}:make", *common).code == 0


def test_zoo_names_and_plain_args_from_a_checkpoint_still_work(tiny_runs, tmp_path):
    """The trainer's own checkpoints name a zoo model and their data: nothing to pass."""
    res = run_cli("sharpness", tiny_runs["sgd"] / "step_000020.pt", "--max-samples", "40", "--top-k", "1",
                  "--no-store", "--json")
    assert res.code == 0, res.stderr
    assert res.json()["results"][0]["eigenvalues"][0] > 0


# ---------------------------------------------------------------- issue 23: what a checkpoint chooses, end to end
def test_a_checkpoint_cannot_choose_model_or_data_sizes_its_weights_do_not_hold(tiny_runs, tmp_path):
    from capped import run_capped

    ck = tiny_runs["sgd"] / "step_000010.pt"
    obj = torch.load(ck, weights_only=False)
    wide = dict(obj, model_spec={"name": "mlp", "args": {"in_dim": 64, "hidden": [25000, 25000], "out_dim": 10}})
    torch.save(wide, tmp_path / "wide.pt")
    big_data = dict(obj, hparams={**obj.get("hparams", {}), "data": "synthetic-minor-major",
                                  "data_args": {"n": 250000, "d": 1000}})
    torch.save(big_data, tmp_path / "data.pt")
    got = run_capped(r"""
import contextlib, io
from sam_probe.cli import main
out = {}
for name, extra in (("wide.pt", ["--data", "digits"]), ("data.pt", [])):
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            main(["sharpness", ARGS["d"] + "/" + name, "--max-samples", "40", "--top-k", "1", "--no-store", *extra])
        except SystemExit as exc:
            out[name] = [exc.code, err.getvalue()]
print(json.dumps(out))
""", d=str(tmp_path))
    code, err = got["wide.pt"]
    assert code == 2 and "do not belong together" in err and "Traceback" not in err
    code, err = got["data.pt"]
    assert code == 2 and "the data the checkpoint names" in err and "312,500,000 values" in err


def test_steps_and_names_that_broke_the_store_are_stored(tiny_runs, tmp_path):
    from clitools import run_cli

    obj = torch.load(tiny_runs["sgd"] / "step_000010.pt", weights_only=False)
    run = tmp_path / "run"
    run.mkdir()
    torch.save(dict(obj, step=2**64), run / "huge_step.pt")
    long = run / ("c" * 240 + ".pt")
    torch.save(obj, long)
    res = run_cli("sharpness", run, "--max-samples", "40", "--top-k", "1", "--out", tmp_path / "o", "--json")
    assert res.code == 0, res.stderr
    stored = [r for r in res.json()["results"] if r.get("eigenvalues")]
    assert len(stored) == 2
    assert len(list((tmp_path / "o").rglob("*.h5"))) == 2


def test_a_loss_the_checkpoint_names_is_reported_as_the_checkpoints(tiny_runs, tmp_path):
    from clitools import run_cli

    obj = torch.load(tiny_runs["sgd"] / "step_000010.pt", weights_only=False)
    torch.save(dict(obj, hparams={**obj.get("hparams", {}), "loss": "hinge"}), tmp_path / "ck.pt")
    res = run_cli("sharpness", tmp_path / "ck.pt", "--max-samples", "40", "--top-k", "1", "--no-store")
    assert res.code == 2 and "the loss the checkpoint names cannot be used" in res.stderr and "pass --loss" in res.stderr
