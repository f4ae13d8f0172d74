"""Shared fixtures: tiny models with buffers, and tiny real runs written by the trainer for command tests."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from sam_probe.commands.train_cmd import write_run


class TinyNet(nn.Module):
    """Linear -> BatchNorm -> ReLU -> Linear: parameters *and* buffers, readable names."""

    def __init__(self, d_in: int = 3, hidden: int = 4, d_out: int = 2):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


@pytest.fixture
def tiny_model() -> TinyNet:
    """A seeded :class:`TinyNet` whose BatchNorm running stats are non-trivial."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    m = TinyNet()
    m.train()
    with torch.no_grad():
        m(torch.randn(8, 3, generator=g))
    return m.eval()


@pytest.fixture
def tiny_state(tiny_model) -> dict[str, torch.Tensor]:
    """``tiny_model.state_dict()`` (detached copies)."""
    return {k: v.detach().clone() for k, v in tiny_model.state_dict().items()}


@pytest.fixture
def run_dir(tmp_path):
    """An empty run directory."""
    d = tmp_path / "run"
    d.mkdir()
    return d


# ---------------------------------------------------------------- tiny real runs (end-to-end command tests)
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
