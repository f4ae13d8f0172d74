"""Small shared fixtures (keep this file minimal; test-specific helpers live in the test files)."""
from __future__ import annotations

import pytest
import torch
from torch import nn


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
