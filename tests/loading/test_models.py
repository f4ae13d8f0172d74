"""Model zoo, factory specs and key=value parsing."""
import sys

import pytest
import torch
from torch import nn

from sam_probe.errors import SpecError
from sam_probe.loading.models import ZOO, build_model, factory_for, parse_kv


@pytest.mark.parametrize("spec,args,shape,out", [
    ("mlp", {}, (3, 64), 10),
    ("mlp", {"in_dim": 12, "hidden": "8", "out_dim": 2, "activation": "tanh"}, (3, 3, 4), 2),
    ("mlp", {"hidden": [], "activation": "gelu"}, (3, 1, 8, 8), 10),
    ("cnn", {}, (3, 1, 8, 8), 10),
    ("cnn", {}, (3, 64), 10),
    ("cnn", {"in_channels": 3, "image_size": 32, "width": 4, "num_classes": 5}, (2, 3 * 32 * 32), 5),
    ("linear", {"in_dim": 64, "out_dim": 3}, (3, 64), 3),
    ("diag-linear", {"in_dim": 10, "alpha": 0.5}, (3, 10), 1),
])
def test_small_zoo_models_forward(spec, args, shape, out):
    torch.manual_seed(0)
    m = build_model(spec, args)
    assert m(torch.randn(*shape)).shape == (shape[0], out)


@pytest.mark.parametrize("spec,args", [("resnet18", {}), ("wrn-16-4", {}), ("wrn", {"depth": 10, "widen": 1})])
def test_cifar_models_forward(spec, args):
    torch.manual_seed(0)
    m = build_model(spec, args).eval()
    with torch.no_grad():
        assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_zoo_deterministic_and_batchnorm():
    for name in ("mlp", "cnn", "linear"):
        torch.manual_seed(3)
        a = build_model(name).state_dict()
        torch.manual_seed(3)
        b = build_model(name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(isinstance(m, nn.BatchNorm2d) for m in build_model("cnn").modules())
    assert set(ZOO) >= {"mlp", "cnn", "resnet18", "wrn", "linear", "diag-linear"}


def test_wrn_pattern_and_bad_depth():
    m = build_model("wrn-10-2")
    assert m.fc.in_features == 128
    with pytest.raises(SpecError, match="6n\\+4"):
        build_model("wrn-15-2")


def test_diag_linear_init_and_coefficients():
    m = build_model("diag-linear", {"in_dim": 4, "alpha": 0.3})
    assert [n for n, _ in m.named_parameters()] == ["u", "v"]
    assert torch.allclose(m.u, torch.full((4,), 0.3)) and torch.allclose(m.v, torch.full((4,), 0.3))
    p = {"u": torch.tensor([1., 2, 3, 4]), "v": torch.tensor([2., 2, 2, 0])}
    assert torch.equal(m.end_to_end_coefficients(p), torch.tensor([2., 4, 6, 0]))
    x = torch.randn(5, 4)
    assert torch.allclose(m(x)[:, 0], x @ (m.u * m.v))


def test_linear_coefficients():
    one = build_model("linear", {"in_dim": 3, "out_dim": 1})
    w = torch.tensor([[1., -2, 3]])
    assert torch.equal(one.end_to_end_coefficients({"weight": w, "bias": torch.zeros(1)}), w[0])
    many = build_model("linear", {"in_dim": 2, "out_dim": 2, "bias": False})
    assert torch.allclose(many.end_to_end_coefficients({"weight": torch.tensor([[3., 0], [4, 1]])}), torch.tensor([5., 1]))


def test_file_and_module_factories(tmp_path, monkeypatch):
    f = tmp_path / "mymodels.py"
    f.write_text("import torch\n"
                 "def make(width=3):\n    return torch.nn.Linear(2, width)\n"
                 "def not_a_model():\n    return 5\n")
    m = build_model(f"{f}:make", {"width": 4})
    assert m.out_features == 4
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("mymodels", None)
    assert build_model("mymodels:make").out_features == 3
    with pytest.raises(SpecError, match="accepted: width"):
        build_model(f"{f}:make", {"widht": 4})
    with pytest.raises(SpecError, match="did you mean 'make'"):
        build_model(f"{f}:mak")
    with pytest.raises(SpecError, match="not a torch.nn.Module"):
        build_model(f"{f}:not_a_model")
    with pytest.raises(SpecError, match="not found"):
        build_model(f"{tmp_path / 'missing.py'}:make")
    with pytest.raises(SpecError, match="cannot import module"):
        build_model("no_such_pkg_xyz.models:make")


def test_unknown_names_and_args_suggest():
    with pytest.raises(SpecError, match="did you mean 'resnet18'"):
        build_model("resnet19")
    with pytest.raises(SpecError, match="did you mean 'diag-linear'"):
        factory_for("diag_linear")
    with pytest.raises(SpecError, match="did you mean 'hidden'.*accepted: in_dim, hidden"):
        build_model("mlp", {"hiden": 3})
    with pytest.raises(SpecError, match="activation"):
        build_model("mlp", {"activation": "relu6"})


def test_parse_kv():
    got = parse_kv(["hidden=64,64", "lr=0.1", "n=3", "bias=false", "x=None", "name=abc", "e=1e-3", "hidden=8,", "s= a "])
    assert got == {"hidden": [8], "lr": 0.1, "n": 3, "bias": False, "x": None, "name": "abc", "e": 1e-3, "s": "a"}
    assert parse_kv([]) == {} and parse_kv(None) == {}
    for bad in (["novalue"], ["=3"]):
        with pytest.raises(SpecError, match="key=value"):
            parse_kv(bad)
