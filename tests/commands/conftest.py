"""Fixtures for end-to-end command tests: tiny real runs written by the trainer."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from sam_probe.commands.train_cmd import write_run  # noqa: E402

TINY = dict(model="mlp", model_args={"in_dim": 64, "hidden": [6], "out_dim": 10}, data="digits",
            max_samples=60, steps=20, lr=0.1, batch_size=20, checkpoint_every=10, seed=0)


def make_run(root: Path, name: str, optimizer: str = "sam", **kw) -> Path:
    out = root / name
    write_run(out, optimizer=optimizer, **{**TINY, **kw})
    return out


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory) -> dict[str, Path]:
    """``{'sgd': dir, 'sam': dir}``: 3 checkpoints each (steps 0, 10, 20) of a 460-parameter digits MLP."""
    root = tmp_path_factory.mktemp("runs")
    return {opt: make_run(root, f"tiny-{opt}", opt) for opt in ("sgd", "sam")}


@pytest.fixture
def out(tmp_path) -> Path:
    return tmp_path / "results"
