"""Shared fixtures: tiny models with buffers, and tiny real runs written by the trainer for command tests."""
from __future__ import annotations

import os
from pathlib import Path

# One thread per process, here and in every process a test starts (they inherit the environment): the
# models are tiny and CI has 2 shared cores, where OpenMP's spin-waiting threads made the suite ~8x slower
# under load (tests/core/test_trace.py + test_lanczos.py + test_density.py: 90 s with 2 threads, 11 s with 1,
# the other core busy).  Results do not depend on it (no test compares across thread counts).
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from sam_probe.commands.train_cmd import write_run  # noqa: E402

torch.set_num_threads(1)


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


# ---------------------------------------------------------------- parallel test processes (pytest-xdist)
# Files that start gloo ranks as processes (2-4 each) run one after another in one test process, so they never
# share the 2 cores with each other, while the other test processes take the single-process files.
GLOO_FILES = frozenset({"test_sharded.py", "test_sharded_eigen.py", "test_sharded_four_ranks.py",
                        "test_sharded_analyses.py", "test_operators_distributed.py", "test_distributed.py",
                        "test_dcp_rows.py"})


@pytest.hookimpl(optionalhook=True)  # `-p no:xdist` runs without it
def pytest_xdist_make_scheduler(config, log):
    """Whole files to a test process (a module fixture runs once), the :data:`GLOO_FILES` as one unit.
    (``--dist loadgroup`` with ``xdist_group`` marks would say the same, but with pytest 9 the group never
    reaches the node ids, so every test went alone and module fixtures ran once per process.)"""
    from xdist.scheduler import LoadScopeScheduling

    class FilesAndGlooRanks(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "gloo-ranks" if Path(path).name in GLOO_FILES else path

    return FilesAndGlooRanks(config, log)


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
