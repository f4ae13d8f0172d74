"""The error boundary: only what the user's model, data or code raised is worded as the user's mistake."""
from __future__ import annotations

import types

import pytest
import torch
from torch import nn

from sam_probe.errors import CLI, SpecError, style
from sam_probe.pipeline.blame import blame, explain
from sam_probe.pipeline.outcome import failure


def _module(name: str, source: str) -> types.ModuleType:
    """A module called ``name`` (its frames belong to it) holding ``source``."""
    mod = types.ModuleType(name)
    mod.__dict__["__file__"] = f"/somewhere/{name.replace('.', '/')}.py"
    exec(compile(source, mod.__file__, "exec"), mod.__dict__)
    return mod


def _raised(fn, *args) -> BaseException:
    try:
        fn(*args)
    except BaseException as exc:  # noqa: BLE001 - the test inspects whatever was raised
        return exc
    raise AssertionError("nothing raised")


OURS = _module("sam_probe.fake_core", """
import torch
def lookup(cfg):
    return cfg["by_"]
def concat():
    return torch.cat([torch.ones(2), torch.ones(2, 2)], dim=1)
def call(fn, *args):
    return fn(*args)
""")

USERS = _module("my_project.model", """
import torch
from torch import nn
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)
    def forward(self, x):
        if x.shape[0] > 2:
            raise KeyError("by_")
        return self.fc(x)
def loss(out, y):
    raise ValueError("my loss broke")
""")


def test_a_python_error_in_sam_probe_code_is_a_sam_probe_bug():
    exc = _raised(OURS.lookup, {})
    b = blame(exc)
    assert b.who == "sam-probe" and b.location.endswith("fake_core.py:4")
    with style(CLI):
        line = explain(exc, "run/step_10.pt")
    assert line.startswith("run/step_10.pt: KeyError: 'by_'")
    assert "bug in sam-probe" in line and "--debug" in line
    assert "--model" not in line and "--data" not in line  # never the advice that misleads


def test_a_torch_operation_failing_in_sam_probe_code_is_not_blamed_on_anyone():
    exc = _raised(OURS.concat)
    assert isinstance(exc, (RuntimeError, IndexError))
    b = blame(exc)
    assert b.who == "library" and b.location.endswith("fake_core.py:6")
    with style(CLI):
        line = explain(exc, "ck.pt")
    assert "if --model, --data and --loss fit together, this is a bug in sam-probe" in line


def test_an_error_raised_in_the_users_forward_is_the_models():
    net = USERS.Net()
    net(torch.ones(2, 3))
    exc = _raised(OURS.call, net, torch.ones(4, 3))  # sam-probe calls the model, the model raises
    b = blame(exc)
    assert b.who == "model" and b.users and b.location == "/somewhere/my_project/model.py:10"
    with style(CLI):
        line = explain(exc, "ck.pt")
    assert line == ("ck.pt: KeyError: 'by_' (in the model's forward at /somewhere/my_project/model.py:10: "
                    "check that --model/--model-arg fit --data and --loss)")
    assert "model_args" in explain(exc, "ck.pt")  # in Python, settings keep their Python names


def test_a_shape_error_inside_a_builtin_forward_is_the_models():
    exc = _raised(OURS.call, nn.Linear(3, 2), torch.ones(4, 5))  # torch's own forward, sam-probe's call
    assert blame(exc).who == "model"


def test_an_error_in_the_users_function_names_its_file():
    exc = _raised(OURS.call, USERS.loss, None, None)
    b = blame(exc)
    assert b.who == "code" and b.location == "/somewhere/my_project/model.py:13"
    with style(CLI):
        assert "in your code at /somewhere/my_project/model.py:13" in explain(exc, "x")


def test_errors_of_the_data_source():
    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            raise RuntimeError("corrupt record")

    exc = _raised(lambda: next(iter(torch.utils.data.DataLoader(Items(), batch_size=2))))
    assert blame(exc).who == "data"
    with style(CLI):
        assert "while reading the data" in explain(exc, "x") and "--data" in explain(exc, "x")


def test_memory_and_system_errors_say_what_they_are():
    with style(CLI):
        assert "--max-memory" in explain(MemoryError(), "ck.pt")
        line = explain(_raised(open, "/nonexistent/file"), "ck.pt")
    assert line.startswith("ck.pt: FileNotFoundError") and "bug" not in line and "--model" not in line


def test_outcomes_keep_the_traceback_and_user_errors_as_they_are():
    o = failure("ck.pt", 10, _raised(OURS.lookup, {}))
    assert o.status == "failed" and o.step == 10 and "KeyError" in o.trace and "fake_core.py" in o.trace
    o = failure("ck.pt", None, SpecError("no such thing", option="loss", value="xyz"))
    assert o.error == "loss='xyz': no such thing" and o.trace is None


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), SystemExit(2)])
def test_interrupts_are_never_units(exc, tmp_path):
    from sam_probe.pipeline import units

    from sam_probe.settings import Settings

    class Session:  # the smallest session one_checkpoint touches before computing
        settings = Settings(store=False)
        loaded: dict = {}

        def load(self, path):
            raise exc

    class Analysis:
        name, version, unkeyed, gradients = "x", 1, (), False

    with pytest.raises(type(exc)):
        units.one_checkpoint(Session(), Analysis(), "run", _checkpoint(tmp_path), 1, {}, None, {})


def _checkpoint(tmp_path):
    path = tmp_path / "step_1.pt"  # hashed, then "loaded"
    torch.save({"model": {"w": torch.ones(2)}}, path)
    return path
