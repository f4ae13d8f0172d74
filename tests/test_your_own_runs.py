"""README "Your own runs": every command shown there runs, verbatim, on small stand-ins of those files."""
from __future__ import annotations

import argparse
import json
import re
import shlex
from pathlib import Path

import pytest
import torch

from clitools import run_cli
from writers import save_in_layout

pytestmark = pytest.mark.slow  # the README's commands end to end (pytest -m "not slow" skips it)

README = Path(__file__).resolve().parents[1] / "README.md"

MODELS_PY = """import torch
def classifier(hidden=32, classes=3):
    return torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, classes))
make_model = classifier
"""

DATA_PY = """import torch
X = torch.randn(80, 4, generator=torch.Generator().manual_seed(0)); Y = (X[:, 0] > 0).long() + (X[:, 1] > 1).long()
class Rows(torch.utils.data.Dataset):
    def __len__(self): return len(X)
    def __getitem__(self, i): return X[i], Y[i]
def train_set(split="train"):
    return Rows()
"""

FAKE_TIMM = """import torch
def create_model(model_name, pretrained=False, num_classes=1000, **kwargs):
    '''Stand-in for timm.create_model (timm needs torchvision, which does not install beside torch 2.13).'''
    assert not pretrained
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, num_classes))
"""

IMAGES_PY = """import torch
class Images(torch.utils.data.Dataset):
    def __len__(self): return 24
    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return torch.randn(3, 8, 8, generator=g), i % 10
def val_set():
    return torch.utils.data.DataLoader(Images(), batch_size=8)
"""


def commands(name: str) -> list[str]:
    """The ``sam-probe`` lines of the code block after ``<!-- run:NAME -->`` in the README."""
    text = README.read_text()
    m = re.search(rf"<!-- run:{re.escape(name)} -->\s*```bash\n(.*?)```", text, re.S)
    assert m, f"README has no example {name!r}"
    return [line for line in m.group(1).splitlines() if line.startswith("sam-probe ")]


def run_readme(name: str) -> list:
    outs = []
    for line in commands(name):
        res = run_cli(*shlex.split(line)[1:], "--json", "--no-plot")
        assert res.code == 0, f"{line}\n{res.stderr}"
        outs.append(res.json())
    return outs


@pytest.fixture
def here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def _trained_state(hidden: int, seed: int) -> dict:
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 3))
    return m.state_dict()


def test_lightning(here):
    (here / "my_models.py").write_text(MODELS_PY)
    ck = here / "lightning_logs" / "version_0" / "checkpoints"
    for step in (100, 200):
        save_in_layout(_trained_state(16, step), ck / f"epoch={step // 100 - 1}-step={step}.ckpt", "lightning",
                       step=step, hparams={"hidden": 16, "lr": 0.1})
    torch.save({"inputs": torch.randn(40, 4), "targets": torch.randint(0, 3, (40,))}, here / "val.pt")
    (out,) = run_readme("lightning")
    assert [r["step"] for r in out["results"]] == [100, 200]  # hidden=16 came from hyper_parameters


def test_hf_trainer(here):
    pytest.importorskip("transformers")  # CI installs it (the test extra)
    import hftiny

    hftiny.write_trainer_run(here / "trainer_out", hftiny.bert, steps=(500, 1000))
    torch.save(hftiny.token_batch(12), here / "tokens.pt")
    sharp, ratios = run_readme("hf-trainer")
    assert [r["step"] for r in sharp["results"]] == [500, 1000]
    assert all(len(r["eigenvalues"]) == 3 for r in sharp["results"])
    assert sum(ratios["results"][0]["counts"].values()) == ratios["results"][0]["n_params"]


def test_timm_factory_path_with_a_stand_in(here):
    (here / "timm").mkdir()
    (here / "timm" / "__init__.py").write_text(FAKE_TIMM)
    (here / "val_images.py").write_text(IMAGES_PY)
    import importlib
    import sys

    sys.modules.pop("timm", None)
    timm = importlib.import_module("timm")
    model = timm.create_model("resnet18", num_classes=10)
    path = here / "output" / "train" / "checkpoint-9.pth.tar"
    path.parent.mkdir(parents=True)
    args = argparse.Namespace(model="resnet18", num_classes=10, lr=0.05)
    torch.save({"epoch": 9, "arch": "resnet18", "state_dict": model.state_dict(), "optimizer": {},
                "version": 2, "args": args, "metric": 0.5}, path)
    try:
        (out,) = run_readme("timm")
    finally:
        sys.modules.pop("timm", None)
    assert out["results"][0]["step"] == 9 and len(out["results"][0]["eigenvalues"]) == 5


def test_plain_script(here):
    (here / "model.py").write_text(MODELS_PY)
    (here / "data.py").write_text(DATA_PY)
    (here / "ckpts").mkdir()
    for step in (0, 50):
        state = _trained_state(32, step)
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1).state_dict()
        torch.save({"model_state_dict": state, "optimizer": opt, "args": argparse.Namespace(lr=0.1, hidden=32),
                    "step": step}, here / "ckpts" / f"step_{step}.pt")
    (out,) = run_readme("plain")
    assert [r["step"] for r in out["results"]] == [0, 50]
    assert json.dumps(out)  # plain JSON


def test_the_readme_trainer_arguments_exist_in_the_installed_transformers():
    """The README's Trainer sentence uses only TrainingArguments keywords transformers (5) has."""
    import inspect
    import re

    transformers = pytest.importorskip("transformers")
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    calls = re.findall(r"TrainingArguments\(([^)]*)\)", text)
    assert calls
    accepted = inspect.signature(transformers.TrainingArguments).parameters
    for call in calls:
        for kw in re.findall(r"(\w+)\s*=", call):
            assert kw in accepted, (kw, transformers.__version__)
    assert "save_safetensors=" not in text
