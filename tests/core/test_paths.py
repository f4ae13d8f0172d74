"""Paths: distances (global = per-tensor in quadrature), escape rate, interpolation and barrier."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from sam_probe.core.objective import Objective
from sam_probe.core.paths import distance, escape_rate, interpolate, interpolate_state


def seeded(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_escape_rate_of_geometric_sequence():
    c, q = 0.3, 1.7
    ref = {"a": seeded((3, 4), 0), "b": seeded((5,), 1)}
    u = {n: seeded(t.shape, 10 + i) for i, (n, t) in enumerate(ref.items())}
    norm = math.sqrt(sum(float(t.pow(2).sum()) for t in u.values()))
    states = [ref] + [{n: ref[n] + c * q ** t * u[n] / norm for n in ref} for t in range(1, 9)]
    steps = [100 * t for t in range(9)]
    res = distance(states, 0, steps=steps, k=5)
    assert res.distance[0] == 0
    assert np.allclose(res.distance[1:], [c * q ** t for t in range(1, 9)], rtol=1e-12)
    assert res.escape_rate == pytest.approx(math.log(q) / 100, rel=1e-10)
    assert res.escape_steps == [100.0, 200.0, 300.0, 400.0, 500.0] and res.escape_by == "step"
    by_index = distance(states, 0, k=3)
    assert by_index.escape_rate == pytest.approx(math.log(q), rel=1e-10) and by_index.escape_by == "index"
    # per-tensor distances add up in quadrature; relative = d / ||w_ref||
    for i in range(9):
        assert sum(res.per_tensor[n][i] ** 2 for n in ref) == pytest.approx(res.distance[i] ** 2, rel=1e-12)
    ref_norm = math.sqrt(sum(float(t.pow(2).sum()) for t in ref.values()))
    assert np.allclose(res.relative, np.array(res.distance) / ref_norm, rtol=1e-12)
    d = res.to_dict()
    assert {"distance", "relative", "per_tensor", "escape_rate"} <= set(d)
    # an external reference placed at step 400: the fit uses the checkpoints after it
    ext = distance(states, states[4], steps=steps, ref_step=400, k=2)
    assert ext.escape_steps == [500.0, 600.0]
    assert escape_rate([0, 1], [1.0, 0.0]) is None


class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)
        self.fc2 = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.bn(self.fc1(x))))


def bn_states():
    torch.manual_seed(0)
    m = BNNet().double()
    m.train()
    m(torch.randn(16, 3, dtype=torch.float64))
    a = {k: v.detach().clone() for k, v in m.state_dict().items()}
    b = {k: (v + 0.3 * seeded(v.shape, 7) if v.is_floating_point() else v + 5) for k, v in a.items()}
    b["bn.running_var"] = a["bn.running_var"] * 2.0
    return m.eval(), a, b


def test_interpolation_endpoints_equal_endpoint_losses():
    m, a, b = bn_states()
    X, y = seeded((20, 3), 1), torch.randint(0, 3, (20,), generator=torch.Generator().manual_seed(2))
    pnames = [n for n, _ in m.named_parameters()]
    base = Objective(m, X, y, "ce", dtype=torch.float64)

    def direct(s):
        return Objective(m, X, y, "ce", params={n: s[n] for n in pnames},
                         buffers={n: v for n, v in s.items() if n not in pnames}, dtype=torch.float64).evaluate()

    res = interpolate(base, a, b, alphas=[0.0, 0.25, 1.0])
    assert res.loss[0] == pytest.approx(direct(a)[0], rel=1e-12) and res.accuracy[0] == direct(a)[1]
    assert res.loss[2] == pytest.approx(direct(b)[0], rel=1e-12) and res.accuracy[2] == direct(b)[1]
    mid = interpolate_state(a, b, 0.25)
    assert torch.equal(mid["bn.num_batches_tracked"], a["bn.num_batches_tracked"])
    assert torch.allclose(mid["bn.running_mean"], 0.75 * a["bn.running_mean"] + 0.25 * b["bn.running_mean"])
    assert res.loss[1] == pytest.approx(direct(mid)[0], rel=1e-12)
    # the default grid (0.05 steps on [-0.2, 1.2]) holds 0 and 1 exactly: the curve shows both endpoints
    full = interpolate(base, a, b)
    assert len(full.alphas) == 29 and full.alphas[0] == pytest.approx(-0.2) and full.alphas[-1] == pytest.approx(1.2)
    assert full.alphas[full.alphas.index(0.0)] == 0.0 and 1.0 in full.alphas
    assert full.loss[full.alphas.index(0.0)] == full.loss_a == pytest.approx(direct(a)[0], rel=1e-12)
    assert full.loss[full.alphas.index(1.0)] == full.loss_b == pytest.approx(direct(b)[0], rel=1e-12)
    # any grid gets 0 and 1 inserted
    odd = interpolate(base, a, b, points=41)
    assert len(odd.alphas) == 43 and 0.0 in odd.alphas and 1.0 in odd.alphas
    assert all(math.isfinite(x) for x in full.loss)
    assert {"alphas", "loss", "accuracy", "barrier"} <= set(full.to_dict())


def test_barrier_zero_on_convex_linear_regression():
    torch.manual_seed(3)
    m = nn.Linear(4, 1).double()
    X, y = seeded((30, 4), 4), seeded((30,), 5)
    obj = Objective(m, X, y, "mse", dtype=torch.float64)
    a = {k: v.detach().clone() for k, v in m.state_dict().items()}
    b = {k: v + seeded(v.shape, 6) for k, v in a.items()}
    res = interpolate(obj, a, b)
    assert res.barrier == 0.0
    assert all(acc is None for acc in res.accuracy)


class Product(nn.Module):
    """f(x) = u v x: L(u, v) = (uv - 1)² on x = y = 1 is non-convex."""

    def __init__(self):
        super().__init__()
        self.u = nn.Parameter(torch.ones(1, dtype=torch.float64))
        self.v = nn.Parameter(torch.ones(1, dtype=torch.float64))

    def forward(self, x):
        return x * self.u * self.v


def test_barrier_positive_between_symmetric_minima():
    m = Product()
    X = torch.ones(4, 1, dtype=torch.float64)
    obj = Objective(m, X, X.clone(), "mse", dtype=torch.float64)
    a = {"u": torch.ones(1, dtype=torch.float64), "v": torch.ones(1, dtype=torch.float64)}
    b = {"u": -a["u"], "v": -a["v"]}
    res = interpolate(obj, a, b)  # L(w(α)) = ((1-2α)² - 1)², 1 at α = 1/2, both ends 0
    assert res.loss_a == 0 and res.loss_b == 0
    assert res.barrier == pytest.approx(1.0, rel=1e-12) and res.barrier_alpha == pytest.approx(0.5)


def test_float64_curve_casts_before_interpolating():
    """A float64 curve from float32 checkpoints equals lerp in float64 of the float32 values."""
    torch.manual_seed(4)
    m = nn.Linear(3, 2)
    X, y = seeded((20, 3), 7), torch.arange(20) % 2
    a = {k: v.detach().float().clone() for k, v in m.state_dict().items()}
    b = {k: (v + 0.3 * seeded(v.shape, 8).float()).float() for k, v in a.items()}
    base = Objective(m, X, y, "ce", dtype=torch.float64)
    res = interpolate(base, a, b, alphas=[0.3])
    mid = {k: torch.lerp(a[k].double(), b[k].double(), 0.3) for k in a}
    want = Objective(m, X, y, "ce", params=mid, dtype=torch.float64).loss()
    assert res.loss[0] == pytest.approx(want, rel=1e-14)


# ------------------------------------------------------------------ escape diagnostics
def test_escape_fits_tell_exponential_from_power_law():
    from sam_probe.core.paths import escape_fits

    tau = np.arange(1, 21, dtype=float)
    exp = escape_fits(200 + tau, 0.01 * np.exp(0.13 * tau), ref_x=200)
    assert exp["n"] == 20 and exp["better"] == "exponential"
    assert exp["exponential"]["rate"] == pytest.approx(0.13, rel=1e-12) and exp["exponential"]["r2"] == pytest.approx(1)
    assert exp["power"]["r2"] < 0.99
    pw = escape_fits(200 + tau, 0.3 * tau ** 0.6, ref_x=200)
    assert pw["better"] == "power" and pw["power"]["exponent"] == pytest.approx(0.6, rel=1e-12)
    assert pw["power"]["rms"] == pytest.approx(0, abs=1e-12) and pw["exponential"]["r2"] < 0.95
    assert escape_fits([1, 2], [1.0, 2.0], 0)["better"] is None  # too few points


def test_subspace_share_and_same_step_distance():
    from sam_probe.core.paths import same_step_distance, subspace_share

    V = torch.eye(4, dtype=torch.float64)[:, :2]
    shares = subspace_share(V, [torch.tensor([3.0, 4.0, 0, 0]), torch.tensor([1.0, 0, 1.0, 0]), torch.zeros(4)])
    assert shares == [pytest.approx(1.0), pytest.approx(0.5), None]
    a = [{"w": torch.tensor([0.0, 0.0])}, {"w": torch.tensor([1.0, 1.0])}, {"w": torch.tensor([2.0, 0.0])}]
    b = [{"w": torch.tensor([0.0, 3.0])}, {"w": torch.tensor([5.0, 1.0])}]
    d = same_step_distance(a, [0, 10, 20], b, [10, 20])
    assert d == {"steps": [10.0, 20.0], "distance": [pytest.approx(np.sqrt(5)), pytest.approx(np.sqrt(10))]}
