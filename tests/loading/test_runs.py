"""A CHECKPOINT argument: a single file or a run directory sorted by the step in the names."""
from __future__ import annotations

import pytest
import torch

from sam_probe.errors import CheckpointError
from sam_probe.loading.runs import CHECKPOINT_SUFFIXES, discover, run_label


def _touch(d, *names):
    for n in names:
        (d / n).write_bytes(b"x")


def test_sorted_by_step_in_name_not_lexically(run_dir):
    _touch(run_dir, "step_10.pt", "step_9.pt", "step_100.pt", "step_000001.pt")
    assert [p.name for p in discover(run_dir)] == ["step_000001.pt", "step_9.pt", "step_10.pt", "step_100.pt"]


def test_mixed_name_styles_and_unnumbered_last(run_dir):
    _touch(run_dir, "last.ckpt", "epoch=3-step=1200.ckpt", "epoch=0-step=50.ckpt", "ckpt_172.pth", "best.pt",
           "model.safetensors")
    assert [p.name for p in discover(run_dir)] == [
        "epoch=0-step=50.ckpt", "ckpt_172.pth", "epoch=3-step=1200.ckpt",  # by step
        "best.pt", "last.ckpt", "model.safetensors",  # no step: after, by name
    ]


def test_same_step_ties_broken_by_name(run_dir):
    _touch(run_dir, "b_step_5.pt", "a_step_5.pt")
    assert [p.name for p in discover(run_dir)] == ["a_step_5.pt", "b_step_5.pt"]


def test_only_checkpoint_suffixes_and_no_recursion(run_dir):
    _touch(run_dir, "step_1.pt", "step_2.bin", "step_3.tar", "notes.txt", "results.h5", "config.yaml", "STEP_4.PTH")
    (run_dir / "sub").mkdir()
    _touch(run_dir / "sub", "step_0.pt")
    (run_dir / "dir.pt").mkdir()  # a directory with a checkpoint suffix is not a file
    assert [p.name for p in discover(run_dir)] == ["step_1.pt", "step_2.bin", "step_3.tar", "STEP_4.PTH"]
    assert {".pt", ".pth", ".ckpt", ".bin", ".safetensors"} <= set(CHECKPOINT_SUFFIXES)


def test_glob_filter(run_dir):
    _touch(run_dir, "ema_step_2.pt", "ema_step_1.pt", "model_step_1.pt", "weights_step_3.data")
    assert [p.name for p in discover(run_dir, glob="ema_*")] == ["ema_step_1.pt", "ema_step_2.pt"]
    # the glob may select files without a checkpoint suffix
    assert [p.name for p in discover(run_dir, glob="*.data")] == ["weights_step_3.data"]


def test_glob_matching_nothing(run_dir):
    _touch(run_dir, "step_1.pt")
    with pytest.raises(CheckpointError, match=r"no checkpoint files matching '\*\.safetensors'") as ei:
        discover(run_dir, glob="*.safetensors")
    assert "\n" not in str(ei.value)


def test_empty_dir_error(run_dir):
    with pytest.raises(CheckpointError, match="no checkpoint files in this directory") as ei:
        discover(run_dir)
    assert "--glob" in str(ei.value) and "\n" not in str(ei.value)
    _touch(run_dir, "readme.md")
    with pytest.raises(CheckpointError, match="no checkpoint files"):
        discover(run_dir)


def test_single_file_and_missing(tmp_path):
    f = tmp_path / "anything.weird"
    f.write_bytes(b"x")
    assert discover(f) == [f]
    assert discover(str(f), glob="*.pt") == [f]  # a file is taken as given
    with pytest.raises(CheckpointError, match="no such file or directory"):
        discover(tmp_path / "missing")


def test_discovered_files_load_in_step_order(run_dir, tiny_state):
    from sam_probe.loading.checkpoints import load_checkpoint
    for s in (30, 4, 200):
        torch.save(tiny_state, run_dir / f"step_{s}.pt")
    assert [load_checkpoint(p).step for p in discover(run_dir)] == [4, 30, 200]


def test_run_label(tmp_path, run_dir):
    f = run_dir / "step_1.pt"
    f.write_bytes(b"x")
    assert run_label(run_dir) == "run"
    assert run_label(f) == "run"
