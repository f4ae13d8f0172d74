"""``sam-probe inspect``: every layout, JSON contract, bad files in a run directory."""
from __future__ import annotations

import os

import torch
from torch import nn

from writers import LAYOUTS, save_in_layout
from clitools import run_cli

INSPECT_KEYS = {"path", "format", "step", "step_source", "n_params", "n_tensors", "tensors", "nonfinite", "extra_keys"}


def _state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).state_dict()


def test_inspect_every_layout_json(tmp_path):
    for i, layout in enumerate(LAYOUTS):
        save_in_layout(_state(), tmp_path / f"{layout}.pt", layout, step=10 * i, hparams={"lr": 0.1})
    res = run_cli("inspect", tmp_path, "--json")
    assert res.code == 0, res.stderr
    cks = res.json()["checkpoints"]
    assert len(cks) == len(LAYOUTS)
    for c in cks:
        assert INSPECT_KEYS <= set(c)
        names = {t["name"] for t in c["tensors"]}
        # DDP/compile prefixes are stripped; Lightning's attribute prefix is inferred only against a model
        pre = "model." if c["layout"] == "lightning" else ""
        assert f"{pre}0.weight" in names and f"{pre}1.running_mean" in names
        assert c["n_params"] == 3 * 4 + 4 + 4 + 4 + 4 + 4 + 4 * 2 + 2  # floats incl. BN buffers
        assert c["nonfinite"] == 0
        assert c["step_source"].startswith("content:") or c["path"].endswith("plain.pt")
    assert {c["format"] for c in cks} == {"torch-zip", "torch-legacy", "safetensors"}


def test_inspect_reports_bad_files_and_keeps_good_ones(tmp_path):
    save_in_layout(_state(), tmp_path / "step_1.pt", "plain")
    (tmp_path / "step_2.pt").write_bytes(b"not a checkpoint at all")
    good = tmp_path / "step_3.pt"
    save_in_layout(_state(), good, "plain")
    data = good.read_bytes()
    (tmp_path / "step_4.pt").write_bytes(data[: len(data) // 2])
    res = run_cli("inspect", tmp_path, "--json")
    assert res.code == 2
    cks = res.json()["checkpoints"]
    ok = [c for c in cks if "error" not in c]
    bad = [c for c in cks if "error" in c]
    assert [c["step"] for c in ok] == [1, 3]
    assert len(bad) == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 2 and "Traceback" not in res.stderr


def test_inspect_nonfinite_and_table(tmp_path):
    st = _state()
    st["0.weight"][0, 0] = float("nan")
    save_in_layout(st, tmp_path / "nan.pt", "plain")
    res = run_cli("inspect", tmp_path / "nan.pt", "--json")
    assert res.code == 0
    assert res.json()["checkpoints"][0]["nonfinite"] == 1
    res = run_cli("inspect", tmp_path / "nan.pt")
    assert res.code == 0 and "nan.pt" in res.stdout


def test_inspect_refuses_code_running_pickle(tmp_path):
    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"model": _state(), "payload": Evil()}, tmp_path / "evil.pt")
    res = run_cli("inspect", tmp_path / "evil.pt")
    assert res.code == 2
    assert not marker.exists()
    assert "refused" in res.stderr and "os.system" in res.stderr.replace("posix", "os")


def test_missing_path_is_one_line_error(tmp_path):
    res = run_cli("inspect", tmp_path / "nope.pt")
    assert res.code == 2
    assert res.stderr.strip().startswith("error:") and len(res.stderr.strip().splitlines()) == 1
