"""Run labels (``sam_probe/run_names.py``): stable, informative, told apart, safe as store folders."""
from __future__ import annotations

import pytest

from sam_probe import run_names as rn


def lightning(root, *versions):
    dirs = []
    for v in versions:
        d = root / "lightning_logs" / f"version_{v}" / "checkpoints"
        d.mkdir(parents=True)
        (d / "epoch=0-step=10.ckpt").write_bytes(b"x")
        dirs.append(d)
    return dirs


def test_default_labels_skip_generic_folder_names(tmp_path):
    v0, v1 = lightning(tmp_path / "exp", 0, 1)
    assert rn.label_for(v0) == "version_0/checkpoints" and rn.label_for(v1) == "version_1/checkpoints"
    assert rn.label_for(v0 / "epoch=0-step=10.ckpt") == "version_0/checkpoints"  # a file belongs to its folder
    run = tmp_path / "digits-mlp-sgd"
    run.mkdir()
    assert rn.label_for(run) == "digits-mlp-sgd"
    assert rn.default_label("/") == "run"


def test_a_hugging_face_folder_checkpoint_belongs_to_its_trainer_run(tmp_path):
    ck = tmp_path / "trainer_out" / "checkpoint-500"
    ck.mkdir(parents=True)
    (ck / "config.json").write_text("{}")
    (ck / "model.safetensors").write_bytes(b"x")
    assert rn.run_dir(ck) == tmp_path / "trainer_out" and rn.label_for(ck) == "trainer_out"
    assert rn.run_of({"path": str(ck)}) == str(tmp_path / "trainer_out")


def test_runs_shown_together_never_share_a_label():
    got = rn.labels(["/x/exp1/lightning_logs/version_0/checkpoints", "/x/exp2/lightning_logs/version_0/checkpoints",
                     "/a/run", "/b/run", "/c/other"])
    assert got == {"/x/exp1/lightning_logs/version_0/checkpoints": "exp1/lightning_logs/version_0/checkpoints",
                   "/x/exp2/lightning_logs/version_0/checkpoints": "exp2/lightning_logs/version_0/checkpoints",
                   "/a/run": "a/run", "/b/run": "b/run", "/c/other": "other"}
    given = rn.labels(["/a/run", "/b/run"], {"/a/run": "mine", "/b/run": "mine"})
    assert given == {"/a/run": "mine (a/run)", "/b/run": "mine (b/run)"}
    assert len(set(rn.labels(["/a/run", "/a/run/", "/a//run"]).values())) == 3  # never equal, even textually odd


def test_run_names_from_the_command_line(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    assert rn.parse_names(["first", "second"], [a, b]) == {str(a.resolve()): "first", str(b.resolve()): "second"}
    assert rn.parse_names([f"{b}=B"], [a, b]) == {str(b.resolve()): "B"}
    assert rn.parse_names([f"{b}=B", "A"], [a, b]) == {str(b.resolve()): "B", str(a.resolve()): "A"}
    with rn.given(rn.parse_names(["first"], [a])):
        assert rn.label_for(a) == "first"
    assert rn.label_for(a) == "a"
    for bad in (["../up"], ["x y"], ["a", "b", "c"], ["same", "same"], [""]):
        with pytest.raises(ValueError):
            rn.parse_names(bad, [a, b])


def test_stored_labels_are_read_back_only_when_well_formed():
    assert rn.stored_label("sharpness/digits-mlp-sgd/step_000400-abc.h5") == "digits-mlp-sgd"
    assert rn.stored_label("sharpness/version_0/checkpoints/x.h5") == "version_0/checkpoints"
    for bad in ("sharpness/x.h5", "sharpness/../x/y.h5", "sharpness/a b/y.h5", "s/\x1b[31m/y.h5", "s//y.h5"):
        assert rn.stored_label(bad) is None, bad


def test_run_of_a_result():
    assert rn.run_of({"path": "runs/a/step_10.pt"}) == "runs/a"
    assert rn.run_of({"run": "runs/a", "paths": ["runs/a/x.pt"]}) == "runs/a"  # a run-level result
    assert rn.run_of({"run": "label", "run_dir": "runs/a/", "path": "runs/a/x.pt"}) == "runs/a"
    assert rn.run_of({"a": "runs/a/x.pt", "b": "runs/b/y.pt"}) == "runs/a"
    assert rn.run_of({"path": "step_10.pt"}) == "."
