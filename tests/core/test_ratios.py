"""Ratio analysis: analytic diagonal quadratic, independent autograd recomputation,
faithful notebook formula, buckets / magnitude split / per-layer totals."""
import copy
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from sam_probe.core import bitpack
from sam_probe.core.categories import CATEGORIES, CODE, categorize
from sam_probe.core.objective import Objective
from sam_probe.core.params import ParamSpace
from sam_probe.core.perturb import perturbed_gradient
from sam_probe.core.ratios import (
    DEFAULT_EDGES, bucket_counts, magnitude_split, per_layer_counts, ratio_analysis, ratio_from_gradients,
)

ISSUE_KEYS = {"rho", "variant", "n_params", "grad_norm", "perturbed_grad_norm", "counts", "fractions",
              "buckets", "magnitude_split", "per_layer"}


# ---------------------------------------------------------------- quadratic
class Vector(nn.Module):
    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(w.clone())

    def forward(self, x):
        return x * 0 + self.w.sum()


class Quadratic(Objective):
    """L(w) = ½ Σ h_i w_i² exactly (indefinite h: no built-in loss can do this)."""

    def __init__(self, h: torch.Tensor, w: torch.Tensor):
        super().__init__(Vector(w), torch.zeros(3, 1, dtype=w.dtype), torch.zeros(3, dtype=w.dtype), "mse")
        self.h = h

    def chunk_loss(self, params, x, y):
        return len(x) * 0.5 * (self.h * params["w"] ** 2).sum()

    def evaluate(self, params=None):
        w = self._as_dict(params)["w"]
        return float(0.5 * (self.h * w ** 2).sum()), None


H = torch.tensor([2.0, 0.6, -0.5, -3.0], dtype=torch.float64)


def quad(rho: float) -> Quadratic:
    w = torch.full((4,), rho / float(H.norm()), dtype=torch.float64)  # g = h w, ||g|| = rho
    return Quadratic(H, w)


def test_quadratic_l2_issue_example():
    rho = 0.05
    obj = quad(rho)
    g = obj.grad_flat()
    assert math.isclose(float(g.norm()), rho, rel_tol=1e-12)
    res = ratio_analysis(obj, rho=rho, variant="l2")
    pg = perturbed_gradient(obj, rho=rho, variant="l2")
    np.testing.assert_allclose((pg.perturbed_grad / pg.grad).numpy(), [3.0, 1.6, 0.5, -2.0], rtol=1e-12)
    assert res.codes.tolist() == [CODE["C1"], CODE["C1"], CODE["C2"], CODE["C3"]]
    assert res.counts == {"C1": 2, "C2": 1, "C3": 1, "C4": 0, "boundary": 0, "undefined": 0}
    assert res.fractions["C1"] == 0.5
    # ratios 3 -> [2,4), 1.6 -> [1.5,2)
    assert [b["count"] for b in res.buckets] == [0, 0, 1, 1, 0, 0, 0]
    assert math.isclose(res.grad_norm, rho, rel_tol=1e-12)


@pytest.mark.parametrize("variant", ["l2", "linf", "usam", "asam"])
def test_quadratic_every_variant_analytic(variant):
    rho, eta = 0.05, 0.01
    obj = quad(rho)
    w = obj.flat_params()
    g = H * w
    if variant == "l2":
        r = 1 + rho * H / g.norm()
    elif variant == "linf":
        r = 1 + rho * H / g.abs()
    elif variant == "usam":
        r = 1 + rho * H
    else:
        T = w.abs() + eta
        r = 1 + rho * H * T ** 2 / (T * g).norm()
    pg = perturbed_gradient(obj, rho=rho, variant=variant, eta=eta)
    torch.testing.assert_close(pg.perturbed_grad, g * r, rtol=1e-12, atol=0)
    res = ratio_analysis(obj, rho=rho, variant=variant, eta=eta)
    want = [0 if x > 1 else 1 if 0 < x < 1 else 2 if x < -1 else 3 for x in r.tolist()]
    assert res.codes.tolist() == want


# ------------------------------------------------------------ autograd MLP
def mlp_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    x = torch.randn(24, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (24,))
    return model, x, y


def hand_gradients(model, x, y, rho, variant, m, eta):
    """g and g~ by plain autograd on deep copies (independent of sam_probe)."""
    n = len(x)
    m = m or n
    g_tot = None
    gt_tot = None
    for s in range(0, n, m):
        xb, yb = x[s:s + m], y[s:s + m]
        wgt = len(xb) / n
        net = copy.deepcopy(model)
        names = [k for k, _ in net.named_parameters()]
        ps = list(net.parameters())
        gs = torch.autograd.grad(nn.functional.cross_entropy(net(xb), yb), ps)
        if variant == "l2":
            norm = torch.sqrt(sum((gi ** 2).sum() for gi in gs))
            es = [rho * gi / norm for gi in gs]
        elif variant == "linf":
            es = [rho * torch.sign(gi) for gi in gs]
        elif variant == "usam":
            es = [rho * gi for gi in gs]
        else:
            Ts = [torch.ones_like(p) if "bias" in k else p.detach().abs() + eta for k, p in zip(names, ps)]
            norm = torch.sqrt(sum(((t * gi) ** 2).sum() for t, gi in zip(Ts, gs)))
            es = [rho * t * t * gi / norm for t, gi in zip(Ts, gs)]
        pert = copy.deepcopy(model)
        with torch.no_grad():
            for p, e in zip(pert.parameters(), es):
                p.add_(e)
        gts = torch.autograd.grad(nn.functional.cross_entropy(pert(xb), yb), list(pert.parameters()))
        g = torch.cat([gi.reshape(-1) for gi in gs]) * wgt
        gt = torch.cat([gi.reshape(-1) for gi in gts]) * wgt
        g_tot = g if g_tot is None else g_tot + g
        gt_tot = gt if gt_tot is None else gt_tot + gt
    return g_tot, gt_tot


@pytest.mark.parametrize("variant", ["l2", "linf", "usam", "asam"])
@pytest.mark.parametrize("m", [None, 8, 10])
def test_mlp_against_autograd(variant, m):
    model, x, y = mlp_problem()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rho, eta = 0.3, 0.05
    obj = Objective(model, x, y)
    g, gt = hand_gradients(model, x, y, rho, variant, m, eta)
    pg = perturbed_gradient(obj, rho=rho, variant=variant, m=m, eta=eta)
    torch.testing.assert_close(pg.grad, g, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(pg.perturbed_grad, gt, rtol=1e-10, atol=1e-13)
    obj.n_grad = 0
    res = ratio_analysis(obj, rho=rho, variant=variant, m=m, eta=eta)
    n_sub = 1 if m is None else math.ceil(len(x) / m)
    assert obj.n_grad == 2 * n_sub
    assert torch.equal(res.codes, categorize(g, gt))
    assert res.n_params == obj.n_params == sum(res.counts.values())
    assert math.isclose(res.perturbed_grad_norm, float(gt.norm()), rel_tol=1e-10)
    assert len({c for c in CATEGORIES if res.counts[c]}) >= 2  # a non-trivial mix
    for k, v in before.items():  # the caller's model is untouched
        assert torch.equal(model.state_dict()[k], v)


# --------------------------------------------------------------- faithful
def notebook_codes(g: np.ndarray, gt: np.ndarray) -> list[str]:
    out = []
    for a, b in zip(g.tolist(), gt.tolist()):
        r = b / (a + 1e-8)
        out.append("C1" if r > 1 else "C2" if 0 < r < 1 else "C3" if r < -1 else "C4" if -1 < r < 0
                   else "boundary")
    return out


def test_faithful_equals_notebook_formula():
    rng = np.random.default_rng(0)
    g = rng.normal(size=400)
    gt = g * rng.normal(1.0, 1.5, size=400)
    g[:20] = 0.0  # undefined normally, categorised by the notebook formula
    gt[20:25] = 0.0
    tg, tgt = torch.from_numpy(g), torch.from_numpy(gt)
    res = ratio_from_gradients(tg, tgt, faithful=True)
    want = notebook_codes(g, gt)
    assert [CATEGORIES[c] for c in res.codes.tolist()] == want
    assert res.counts["undefined"] == 0
    plain = ratio_from_gradients(tg, tgt)
    assert plain.counts["undefined"] == 20 and plain.counts["boundary"] == 5


# ----------------------------------------------------------------- pieces
def test_bucket_edges_and_totals():
    r = torch.tensor([1.0001, 1.2, 1.4999, 1.5, 2.0, 3.9, 4.0, 8.0, 15.9, 16.0, 1e6])
    b = bucket_counts(r)
    assert [x["count"] for x in b] == [1, 2, 1, 2, 1, 2, 2]
    assert [x["lo"] for x in b] == [1.0, *DEFAULT_EDGES]
    assert [x["hi"] for x in b][:-1] == list(DEFAULT_EDGES) and b[-1]["hi"] == math.inf
    assert [x["count"] for x in bucket_counts(r, edges=(2,))] == [4, 7]
    assert sum(x["count"] for x in bucket_counts(torch.empty(0))) == 0
    for bad in [(1.0, 2.0), (2.0, 1.5), (1.5, 1.5), (float("inf"),)]:
        with pytest.raises(ValueError):
            bucket_counts(r, bad)


def test_magnitude_split_example():
    g = torch.tensor([5.0, -4.0, 3.0, 2.0, -1.0])
    c1 = torch.tensor([True, False, False, True, False])
    ms = magnitude_split(g, c1)  # tau = 2nd largest |g| = 4; C1 above: {5}
    assert ms == {"tau": 4.0, "share": 0.5, "chance": 0.4, "lift": 1.25}
    assert magnitude_split(g, torch.zeros(5, dtype=torch.bool)) == {
        "tau": None, "share": None, "chance": 0.0, "lift": None}
    top = magnitude_split(g, torch.tensor([True, True, False, False, False]))
    assert top["share"] == 0.5  # strict '>' tau: the k-th largest itself is not above tau


def test_per_layer_sums_and_json():
    model, x, y = mlp_problem()
    obj = Objective(model, x, y)
    res = ratio_analysis(obj, rho=0.5, variant="l2", edges=(1.1, 1.3, 3.0))
    assert sum(res.counts.values()) == res.n_params
    assert math.isclose(sum(res.fractions.values()), 1.0)
    assert sum(b["count"] for b in res.buckets) == res.counts["C1"]
    assert [l["name"] for l in res.per_layer] == obj.space.names
    assert sum(l["n"] for l in res.per_layer) == res.n_params
    for c in CATEGORIES:
        assert sum(l["counts"][c] for l in res.per_layer) == res.counts[c]
    for i in range(len(res.buckets)):
        assert sum(l["buckets"][i]["count"] for l in res.per_layer) == res.buckets[i]["count"]
    for l in res.per_layer:
        assert sum(b["count"] for b in l["buckets"]) == l["counts"]["C1"]
        assert sum(l["counts"].values()) == l["n"]
    assert per_layer_counts(res.codes, obj.space) == [
        {"name": l["name"], "n": l["n"], "counts": l["counts"]} for l in res.per_layer]
    # the same statistics without the per-layer part
    flat = ratio_from_gradients(*(lambda p: (p.grad, p.perturbed_grad))(perturbed_gradient(obj, rho=0.5)),
                                rho=0.5, edges=(1.1, 1.3, 3.0), per_layer=False)
    assert flat.counts == res.counts and flat.buckets == res.buckets
    assert flat.magnitude_split == res.magnitude_split and flat.per_layer == []
    d = res.to_dict()
    assert set(d) == ISSUE_KEYS
    assert set(d["counts"]) == set(CATEGORIES) == set(d["fractions"])
    assert set(d["magnitude_split"]) == {"tau", "share", "chance", "lift"}
    assert d["buckets"][-1]["hi"] is None and d["buckets"][0]["lo"] == 1.0
    assert all({"name", "n", "counts"} <= set(l) for l in d["per_layer"])
    json.dumps(d, allow_nan=False)
    packed = res.packed_codes()
    np.testing.assert_array_equal(bitpack.unpack_codes(packed), res.codes.numpy())


def test_pieces_on_given_gradients_with_space():
    g = torch.tensor([1.0, 0.0, -2.0, 0.5, 1.0, 3.0])
    gt = torch.tensor([2.0, 1.0, 2.0, 0.25, 1.0, -1.0])
    space = ParamSpace({"a": torch.zeros(2), "b": torch.zeros(2, 2)})
    res = ratio_from_gradients(g, gt, space)
    # r = 2, undef, -1, 0.5, 1, -1/3
    assert [CATEGORIES[c] for c in res.codes.tolist()] == ["C1", "undefined", "boundary", "C2", "boundary", "C4"]
    assert res.per_layer[0]["counts"]["C1"] == 1 and res.per_layer[1]["counts"]["boundary"] == 2
    with pytest.raises(ValueError):
        ratio_from_gradients(g, gt[:3])
    with pytest.raises(ValueError):
        ratio_from_gradients(g, gt, ParamSpace({"a": torch.zeros(5)}))


def test_codes_numpy_and_torch_paths_agree():
    from sam_probe.core.categories import codes_from_ratio
    vals = [2.0, 1.0, 0.5, 0.0, -0.0, -0.5, -1.0, -3.0, float("nan"), float("inf"), -float("inf"), 1.0009765625]
    want = [0, 4, 1, 4, 4, 3, 4, 2, 5, 0, 2, 0]
    fast = codes_from_ratio(torch.tensor(vals, dtype=torch.float32))  # numpy path
    slow = codes_from_ratio(torch.tensor(vals, dtype=torch.float16))  # torch path
    assert fast.dtype == slow.dtype == torch.uint8
    assert fast.tolist() == slow.tolist() == want
