"""Checkpoint sources: the registry's contract, discovery through it, and one verified pass per file."""
from __future__ import annotations

import hashlib
import os
import re
import time
from pathlib import Path

import pytest
import torch

from sam_probe.errors import CheckpointError
from sam_probe.loading import sources, verify
from sam_probe.loading.checkpoints import file_sha256, load_checkpoint
from sam_probe.loading.sources.base import FILE, FOLDER, RUN, Source

ROOT = Path(__file__).resolve().parents[2]


def test_every_source_is_one_module_that_declares_itself():
    srcs = sources.registry()
    assert {s.name for s in srcs} >= {"torch", "safetensors", "hf-folder", "folder-run", "deepspeed"}
    assert len({s.name for s in srcs}) == len(srcs)
    for s in srcs:
        assert s.kind in (FILE, FOLDER, RUN) and s.summary and "\n" not in s.summary
        if s.kind in (FILE, FOLDER):
            assert s.load and s.digest and s.step
    with pytest.raises(TypeError, match="lacks"):
        Source(name="x", kind=FOLDER, summary="x", load=lambda *a, **k: None)  # no digest, no claims


def test_source_modules_import_no_torch():
    import subprocess
    import sys

    code = ("import sys; from sam_probe.loading import sources; sources.registry(); sources.help_text(); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_every_registered_source_is_documented_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    for name, kind, summary, step in sources.table():
        assert f"`{name}`" in readme, name
    assert sources.markdown_table() in readme  # the README table is generated from the registry


def test_dispatch_by_content_and_folder_claims(tmp_path, tiny_state):
    from safetensors.torch import save_file

    torch.save(tiny_state, tmp_path / "weights.safetensors")  # a torch file, whatever its name says
    save_file(tiny_state, str(tmp_path / "weights.pt"))
    assert sources.of(tmp_path / "weights.safetensors").name == "torch"
    assert sources.of(tmp_path / "weights.pt").name == "safetensors"
    assert load_checkpoint(tmp_path / "weights.pt").source == "safetensors"
    with pytest.raises(CheckpointError, match="is a directory that is not a checkpoint") as ei:
        sources.of(tmp_path)
    assert "Hugging Face" in str(ei.value) and "\n" not in str(ei.value)
    assert sources.is_checkpoint(tmp_path / "weights.pt") and not sources.is_checkpoint(tmp_path)


def _single_file(tmp_path: Path, state: dict, name: str = "ck.pt") -> Path:
    p = tmp_path / name
    torch.save({"model": state, "step": 3, "optimizer": {"m": {k: v.clone() for k, v in state.items()}}}, p)
    return p


def test_one_pass_hashes_verifies_and_scans_and_is_remembered(tmp_path):
    verify.forget()
    g = torch.Generator().manual_seed(0)
    state = {"w": torch.randn(300, 40, generator=g), "b": torch.randn(40, generator=g), "n": torch.tensor(5)}
    state["w"][3, 4] = float("nan")
    state["b"][0] = float("inf")
    p = _single_file(tmp_path, state)
    time.sleep(verify.RACY_NS / 1e9)  # a file changed within a timestamp tick is never remembered
    before = verify.PASSES[0]
    ck = load_checkpoint(p)
    assert verify.PASSES[0] == before + 1  # CRCs, sha256 and the NaN/Inf scan: one pass
    assert ck.digest == hashlib.sha256(p.read_bytes()).hexdigest() == ck.sha256()
    assert ck.nonfinite() == {"w": 1, "b": 1}
    assert file_sha256(p) == ck.digest
    again = load_checkpoint(p)  # ordering a run, then loading each checkpoint: no second pass
    assert again.nonfinite() == {"w": 1, "b": 1} and verify.PASSES[0] == before + 1
    sub = load_checkpoint(p, key="optimizer.m")  # other tensors of the verified file: scanned, not re-verified
    assert sub.nonfinite() == {"w": 1, "b": 1}


def test_a_file_rewritten_in_place_is_verified_again(tmp_path):
    verify.forget()
    state = {"w": torch.arange(4096, dtype=torch.float32)}
    p = _single_file(tmp_path, state)
    time.sleep(verify.RACY_NS / 1e9)
    load_checkpoint(p)
    load_checkpoint(p)
    assert verify._KNOWN  # remembered: the rewrite below must be noticed anyway
    data = bytearray(p.read_bytes())
    at = data.find(torch.arange(4096, dtype=torch.float32).numpy().tobytes()[4000:4016])
    assert at > 0
    data[at:at + 4] = b"\x00\x00\x80\x7f"  # +inf over a weight: the zip CRC no longer matches
    with open(p, "r+b") as fh:  # same inode, same size, new ctime
        fh.write(data)
    with pytest.raises(CheckpointError, match="fails its CRC"):
        load_checkpoint(p)


def test_a_file_changed_within_a_timestamp_tick_is_not_remembered(tmp_path):
    verify.forget()
    p = _single_file(tmp_path, {"w": torch.ones(64)})
    before = verify.PASSES[0]
    load_checkpoint(p)
    load_checkpoint(p)  # just written: read again rather than trusted by its times
    assert verify.PASSES[0] - before == 2


def test_a_run_is_read_once_per_analysis(tmp_path, monkeypatch):
    """Ordering a run by step and computing each checkpoint read each file's bytes in one pass, even when the
    run is too large to keep loaded between the two (KEEP_LOADED_BYTES = 0 here)."""
    from sam_probe.commands.train_cmd import write_run

    run = tmp_path / "run"
    write_run(run, model="mlp", model_args={"in_dim": 64, "hidden": [4], "out_dim": 10}, data="digits",
              max_samples=40, steps=4, lr=0.1, batch_size=20, checkpoint_every=2, seed=0, optimizer="sgd")
    files = sorted(run.glob("*.pt"))
    time.sleep(verify.RACY_NS / 1e9)  # files changed within a timestamp tick are never remembered
    verify.forget()
    import sam_probe.pipeline as pipeline_pkg

    for mod in [pipeline_pkg, *(getattr(pipeline_pkg, n) for n in ("units", "session") if hasattr(pipeline_pkg, n))]:
        if hasattr(mod, "KEEP_LOADED_BYTES"):
            monkeypatch.setattr(mod, "KEEP_LOADED_BYTES", 0)
    before = verify.PASSES[0]
    from sam_probe.cli import main

    with pytest.raises(SystemExit) as ei:
        main(["distance", str(run), "--data", "digits", "--max-samples", "20", "--out", str(tmp_path / "o"), "--json",
              "--no-plot", "-q"])
    assert ei.value.code == 0
    assert verify.PASSES[0] - before == len(files)


def test_discovery_orders_runs_and_keeps_unreadable_entries(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    for n in ("step_10.pt", "step_9.pt", "notes.txt"):
        (d / n).write_bytes(b"x")
    os.mkfifo(d / "step_5.pt")  # kept: loading reports it instead of discovery hiding it
    assert [p.name for p in sources.discover(d)] == ["step_5.pt", "step_9.pt", "step_10.pt"]
    with pytest.raises(CheckpointError, match="is a FIFO"):
        load_checkpoint(d / "step_5.pt")


def test_help_text_names_every_source():
    text = sources.help_text()
    assert all(s.name in text for s in sources.registry())
    assert re.fullmatch(r"[^\n]+", text)


def test_every_builtin_model_and_data_name_is_documented_and_in_help():
    from sam_probe.loading import catalog
    from sam_probe.loading.data import BUILTIN
    from sam_probe.loading.models import ZOO

    readme = (ROOT / "README.md").read_text()
    assert list(ZOO) == list(catalog.ZOO) and BUILTIN == tuple(catalog.DATA)
    for name in [*catalog.ZOO, *catalog.DATA]:
        assert f"`{name}`" in readme, name
        assert name in catalog.model_help() + catalog.data_help()
    assert set(catalog.CHECKPOINT_DATA) <= set(catalog.DATA)
