"""Finite-difference Hessian products (``hvp_method='fd'``) against exact double backward in float64, their
error estimates, and ``auto`` on models without a double backward."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cases import BY_NAME, objective  # noqa: E402

from sam_probe.core.errors import DoubleBackwardError  # noqa: E402
from sam_probe.core.lanczos import top_eigen  # noqa: E402
from sam_probe.core.objective import Objective  # noqa: E402
from sam_probe.core.operators import curvature_operator  # noqa: E402


@pytest.mark.parametrize("name", ["mlp-ce", "bn-cnn-ce", "gpt-lm"])
def test_fd_products_match_double_backward_to_1e_8(name):
    exact = objective(BY_NAME[name])
    fd = objective(BY_NAME[name], hvp_method="fd", vector_block=2)
    V = torch.randn(exact.n_params, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref = exact.hvp_block(V)
    got = fd.hvp_block(V)
    err = (got - ref).norm(dim=0)
    assert (err / ref.norm(dim=0)).max() <= 1e-8, err / ref.norm(dim=0)
    est = fd.hessian_products.last_error
    assert est.shape == (3,) and (err <= est).all() and (est / ref.norm(dim=0)).max() < 1e-6, (err, est)
    assert fd.n_hvp == 3 and fd.n_grad == 0  # gradients of the differences are products, not gradients
    op = curvature_operator(fd, "hessian")
    assert not op.exact and op.product_error(V[:, :1]).shape == (1,)


def test_fd_error_estimate_flags_a_kink():
    """A ReLU kink crossed by the steps makes the difference quotients disagree: the estimate says so."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 1), nn.ReLU()).double()
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].bias.fill_(0.0)
    # pre-activation 1e-12: every step tried (6e-6 down to 6e-6 / 16^3) crosses 0
    x = torch.tensor([[1e-12]], dtype=torch.float64)
    obj = Objective(model, x, torch.tensor([[1.0]], dtype=torch.float64), "mse", hvp_method="fd")
    obj.hvp_block(torch.tensor([[0.0], [1.0]], dtype=torch.float64))
    assert float(obj.hessian_products.last_error[0]) > 0.1


def test_fd_retries_a_smaller_step_at_relu_kinks():
    """A ReLU network whose steps cross kinks: the product is retried at h/16 until no kink is crossed,
    and the reported error bounds the actual one (exact double backward, float64)."""
    from sam_probe.core.hessian import extrapolated_difference

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).double()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 16, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (300,), generator=g)
    exact = Objective(model, x, y, "ce")
    fd = Objective(model, x, y, "ce", hvp_method="fd")
    V = torch.randn(exact.n_params, 2, generator=g, dtype=torch.float64)
    ref = exact.hvp_block(V)
    got = fd.hvp_block(V)
    err = (got - ref).norm(dim=0)
    assert (err <= fd.hessian_products.last_error).all()
    assert float((err / ref.norm(dim=0)).max()) <= 1e-7
    # one step only (no retry) is far off on the same products: the retry is what makes them exact
    w = fd.flat_params()
    prods = fd.hessian_products
    one, _, _ = extrapolated_difference(lambda h: prods._difference(w, V[:, 0], h), prods.step(w, V[:, 0]), 0.0,
                                        lambda *ts: [0.0] * len(ts))  # error measure 0: accept the first step
    assert float((one - ref[:, 0]).norm() / ref[:, 0].norm()) > 1e-5


class NoDoubleBackward(torch.autograd.Function):
    """tanh whose backward is @once_differentiable (no second derivative)."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


class Custom(nn.Module):
    def __init__(self, op=None):
        super().__init__()
        self.a, self.b, self.op = nn.Linear(4, 6), nn.Linear(6, 3), op

    def forward(self, x):
        h = self.a(x)
        h = NoDoubleBackward.apply(h) if self.op == "custom" else \
            checkpoint(torch.tanh, h, use_reentrant=False) if self.op == "checkpoint" else torch.tanh(h)
        return self.b(h)


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g)


def _model(op):
    torch.manual_seed(3)
    return Custom(op).double()


@pytest.mark.parametrize("op", ["custom", "checkpoint"])
def test_fd_works_where_double_backward_does_not(op):
    x, y = _data()
    plain = Objective(_model(None), x, y, "ce")  # the same function, twice differentiable
    V = torch.randn(plain.n_params, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    ref = plain.hvp_block(V)
    fd = Objective(_model(op), x, y, "ce", hvp_method="fd")
    assert ((fd.hvp_block(V) - ref).norm(dim=0) / ref.norm(dim=0)).max() <= 1e-8
    auto = Objective(_model(op), x, y, "ce", hvp_method="auto")
    auto.check_inputs()
    if op == "custom":
        with pytest.raises(DoubleBackwardError, match="once_differentiable"):
            Objective(_model(op), x, y, "ce").hvp_block(V)
        assert auto.hvp_method == "fd" and any("finite differences" in n for n in auto.notes)
    else:  # non-reentrant checkpointing keeps double backward: auto stays exact
        assert auto.hvp_method == "rev-rev" and not any("finite differences" in n for n in auto.notes)
    assert ((auto.hvp_block(V) - ref).norm(dim=0) / ref.norm(dim=0)).max() <= 1e-8
    assert auto.subset(torch.arange(4)).hvp_method == auto.hvp_method  # resolved once, inherited


def test_fd_through_a_solver_reports_its_product_error():
    x, y = _data()
    obj = Objective(_model("custom"), x, y, "ce", hvp_method="fd")
    exact = torch.linalg.eigvalsh(torch.stack([Objective(_model(None), x, y, "ce").hvp_block(e[:, None])[:, 0]
                                               for e in torch.eye(obj.n_params, dtype=torch.float64)], 1))
    eig = top_eigen(obj, 2, tol=1e-6)
    assert eig.eigenvalues[0] == pytest.approx(float(exact[-1]), rel=1e-7)
    op = curvature_operator(obj, "hessian")
    assert float(op.product_error(eig.eigenvectors[:, :1])[0]) < 1e-6 * abs(eig.eigenvalues[0])
