"""Features: strength, importance (coef / column-norm / saliency), minor mass, dominance, growth Spearman."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from sam_probe.core.features import (analyse_features, background_mask, feature_strength, features,
                                     growth_spearman, importance, minor_mask, strength_ranks)
from sam_probe.core.objective import Objective

D = 8


class DiagLinear(nn.Module):
    """f(x) = <u ⊙ v, x>."""

    def __init__(self, u, v):
        super().__init__()
        self.u = nn.Parameter(torch.as_tensor(u, dtype=torch.float64))
        self.v = nn.Parameter(torch.as_tensor(v, dtype=torch.float64))

    def forward(self, x):
        return (x * (self.u * self.v)).sum(-1, keepdim=True)


class DiagLinearWithMethod(DiagLinear):
    def end_to_end_coefficients(self, params):
        return 2 * params["u"] * params["v"]  # deliberately not u*v: the method must win


def scaled_data(n=32, seed=0):
    """x_ij = ±2^-j: strength mean|x_j| = 2^-j, feature 0 strongest."""
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n, D), generator=g).double() * 2 - 1
    X = signs * 2.0 ** -torch.arange(D, dtype=torch.float64)
    return X, X.sum(1, keepdim=True)


def test_strength_minor_and_ranks():
    X, y = scaled_data()
    s = feature_strength(X)
    assert np.allclose(s, 2.0 ** -np.arange(D))
    assert minor_mask(s, 0.5).tolist() == [False] * 4 + [True] * 4
    assert minor_mask(s, 0.25).sum() == 2
    assert strength_ranks(s).tolist() == list(range(D))
    lab = (X[:, 0] > 0).long()
    corr = feature_strength(X, lab, "corr")
    assert np.allclose(corr, np.abs(((2 * lab.double() - 1)[:, None] * X).mean(0).numpy()))
    assert corr[0] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        feature_strength(X, torch.arange(len(X)) % 3, "corr")


def test_diag_linear_coefficients():
    X, y = scaled_data()
    u = torch.tensor([0.1, -0.2, 0.1, 0.1, 3.0, 0.1, -0.5, 0.1])
    v = torch.tensor([1.0, 1.0, -1.0, 0.5, 1.0, 1.0, 1.0, 0.0])
    beta = (u * v).abs().numpy()
    obj = Objective(DiagLinear(u, v), X, y, "mse", dtype=torch.float64)
    a, used = importance(obj)
    assert used == "coef" and np.allclose(a, beta)
    assert np.allclose(importance(Objective(DiagLinearWithMethod(u, v), X, y, "mse"), "coef")[0], 2 * beta)
    # two checkpoints: the second has the minor feature 4 dominant
    obj0 = obj.with_params({"u": torch.full((D,), 0.1), "v": 2.0 ** -torch.arange(D, dtype=torch.float64)})
    res = features([obj0, obj], steps=[0, 10])
    s = 2.0 ** -np.arange(D)
    assert res.method == "coef" and np.allclose(res.strength, s)
    minor = np.arange(D) >= 4
    assert res.minor_mass[1] == pytest.approx(beta[minor].sum() / beta.sum())
    assert res.dominant_index == [0, 4] and res.dominant_strength_rank == [0, 4]
    assert res.spearman_growth_strength[-1] is None
    d = res.to_dict()
    assert set(d["results"][0]) == {"step", "minor_mass", "dominant_index", "dominant_strength_rank",
                                    "spearman_growth_strength", "collapsed"}
    assert d["strength"] == pytest.approx(s.tolist()) and len(d["importance"]) == 2
    assert [r["collapsed"] for r in d["results"]] == [False, False]


def test_a_collapsed_model_has_no_dominant_feature():
    """Total importance below 1e-3 of its peak (or zero): flagged, and no dominant feature, rank or minor mass."""
    from sam_probe.core.features import analyse_features, collapsed

    s = np.array([1.0, 0.5, 0.25, 0.125])
    A = [np.array([0.3, 0.2, 0.1, 0.1]), np.array([1e-6, 1e-7, 0.0, 2e-7]), np.zeros(4), np.array([1e-3, 0, 0, 0])]
    assert collapsed(A).tolist() == [False, True, True, False]
    res = analyse_features(A, s, [0, 1, 2, 3]).to_dict()
    rows = res["results"]
    assert [r["collapsed"] for r in rows] == [False, True, True, False]
    for r in rows[1:3]:
        assert r["dominant_index"] is None and r["dominant_strength_rank"] is None and r["minor_mass"] is None
    assert rows[0]["spearman_growth_strength"] is None and rows[2]["spearman_growth_strength"] is None  # to/from noise
    assert rows[3]["dominant_index"] == 0 and rows[3]["minor_mass"] == 0.0
    assert collapsed([[np.nan, 1.0]]).tolist() == [True]


def test_growth_spearman_sign():
    s = 2.0 ** -np.arange(D)
    a0 = np.ones(D)
    minor_first = a0 * np.exp(np.arange(D))  # weaker features grow faster
    assert growth_spearman(a0, minor_first, s) == pytest.approx(-1.0)
    assert growth_spearman(a0, a0 * np.exp(-np.arange(D)), s) == pytest.approx(1.0)
    assert growth_spearman(a0, 2 * a0, s) is None  # equal growth: undefined
    zero = np.zeros(D)
    zero[0] = 1.0
    assert math.isfinite(growth_spearman(zero, minor_first, s))  # zeros are floored
    res = analyse_features([a0, minor_first, minor_first ** 2], s)
    assert res.spearman_growth_strength[:2] == pytest.approx([-1.0, -1.0])


def test_saliency_of_linear_model_is_weight_of_true_class():
    torch.manual_seed(0)
    m = nn.Linear(5, 3).double()
    X = torch.randn(40, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (40,), generator=torch.Generator().manual_seed(1))
    obj = Objective(m, X, y, "ce", dtype=torch.float64, chunk_size=7)
    a, used = importance(obj, "saliency")
    W = m.weight.detach()
    assert used == "saliency" and np.allclose(a, W[y].abs().mean(0).numpy(), rtol=1e-12)
    assert np.allclose(importance(obj, "auto")[0], W.norm(dim=0).numpy())  # linear model: coef = column norms


def test_column_norm_and_auto_choice():
    torch.manual_seed(1)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    X = torch.randn(10, 2, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (10,))
    a, used = importance(Objective(mlp, X, y, "ce"))
    assert used == "column-norm" and np.allclose(a, mlp[1].weight.detach().norm(dim=0).numpy())
    cnn = nn.Sequential(nn.Conv2d(1, 2, 2), nn.Flatten(), nn.Linear(2 * 2 * 2, 2)).double()
    Xi = torch.randn(10, 1, 3, 3, dtype=torch.float64)
    a, used = importance(Objective(cnn, Xi, y, "ce"))
    assert used == "saliency" and a.shape == (9,)
    with pytest.raises(ValueError):
        importance(Objective(cnn, Xi, y, "ce"), "coef")


def test_image_heatmap_and_background_mass():
    g = torch.Generator().manual_seed(0)
    imgs = torch.zeros(12, 4, 4, dtype=torch.float64)
    imgs[:, 1:3, 1:3] = torch.rand(12, 2, 2, generator=g, dtype=torch.float64) + 1  # bright centre
    bg = background_mask(imgs)
    assert bg.reshape(4, 4)[1:3, 1:3].sum() == 0 and bg.sum() == 12
    a = np.ones(16)
    a[bg] = 3.0
    res = analyse_features([a], feature_strength(imgs), image_shape=(4, 4), background=bg)
    assert res.heatmaps().shape == (1, 4, 4)
    assert res.background_mass[0] == pytest.approx(36 / 40)
    d = res.to_dict()
    assert d["results"][0]["background_mass"] == pytest.approx(0.9) and np.array(d["heatmaps"]).shape == (1, 4, 4)
