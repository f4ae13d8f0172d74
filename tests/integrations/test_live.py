"""``sam_probe.integrations.live.probe``, what the training callbacks run: the numbers of the Python API on
a live module, which keeps its weights, ``.grad``, BatchNorm statistics, train/eval flags and the RNG."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import sam_probe as sp
from sam_probe.integrations.live import probe


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.3), nn.Linear(6, 3))


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g)


def test_probe_leaves_the_module_and_the_rng_as_they_were():
    model, (x, y) = net().train(), data()
    model(x).sum().backward()  # a .grad and updated BN statistics, as during training
    model[3].eval()  # a mixed mode that must come back as it was
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    for analysis in ("sharpness", "trace", "ratios", "gradnorm"):  # lambda_max: sharpness without its SAM step
        out = probe(model, (x, y), analysis, "ce", tol=1e-2)
        assert out and all(isinstance(v, float) for v in out.values()), analysis
    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_probe_numbers_are_the_python_apis():
    model, (x, y) = net(), data()
    out = probe(model, (x, y), "sharpness", "ce", top_k=2, tol=1e-6, dtype="float64")
    obj = sp.Objective(model, x, y, "ce", dtype=torch.float64)
    eig = sp.top_eigen(obj, k=2, tol=1e-6)
    assert out["lambda_max"] == eig.eigenvalues[0] and out["eigenvalue_2"] == eig.eigenvalues[1]
    assert out["sam_sharpness"] == pytest.approx(sp.sam_sharpness(obj, rho=0.05), rel=1e-12)
    ratios = probe(model, (x, y), "ratios", "ce")
    assert sum(v for k, v in ratios.items() if k.startswith("fraction.")) == pytest.approx(1.0)


def test_half_precision_weights_are_probed_in_float32():
    (x, y), half = data(), net().to(torch.bfloat16)
    out = probe(half, (x, y), "lambda_max", "ce", tol=1e-4)  # 1e-4 is below bfloat16's resolution: float32 ran
    assert next(half.parameters()).dtype == torch.bfloat16
    ref = probe(half.float(), (x, y), "lambda_max", "ce", tol=1e-4)
    assert out["lambda_max"] == pytest.approx(ref["lambda_max"], rel=1e-5)
    with pytest.raises(ValueError, match="choose one of"):
        probe(half, (x, y), "hessian")
