"""Streamed ratios (issue 20, item 6) are bit-identical to the whole-vector computation.

The reference below is the implementation before streaming, kept here verbatim in
substance: ``e`` as a whole vector (``perturbation``), ``g~ = ∇L(w + e)``, ``r`` and the
codes over all of ``P`` at once, ``pack_codes`` of the whole code vector, the per-layer
breakdown and magnitude split of :mod:`sam_probe.core.ratios` on whole vectors, and
``flat_mask(g²)`` of :mod:`sam_probe.core.overlap`.  The streamed code runs with tiny
chunks (many of them, crossing tensor boundaries) and must give the same bits.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from sam_probe.core import bitpack
from sam_probe.core.categories import CATEGORIES, CODE, codes_from_ratio, ratio
from sam_probe.core.objective import Objective
from sam_probe.core.overlap import flat_mask
from sam_probe.core.perturb import perturbation, perturbed_gradient, sub_batches
from sam_probe.core.ratios import (
    DEFAULT_EDGES, category_bin_key, magnitude_split, per_layer_breakdown, ratio_from_gradients, tally,
)


def reference_gradients(obj, rho, variant, m, eta):
    w = obj.flat_params()
    subs = sub_batches(obj, m)
    g = gt = None
    if len(subs) > 1:
        g, gt = torch.zeros_like(w), torch.zeros_like(w)
    for sub, weight in subs:
        gb = sub.grad_flat()
        e = perturbation(sub, gb, variant, rho, eta, w)
        gtb = sub.grad_flat(w + e)
        if g is None:
            g, gt = gb, gtb
        else:
            g.add_(gb, alpha=weight)
            gt.add_(gtb, alpha=weight)
    return g, gt


def reference_ratios(g, gt, space, eps, faithful, edges, per_layer, ire_rank):
    r = ratio(g, gt, eps, faithful)
    codes = codes_from_ratio(r)
    if per_layer:
        layers = per_layer_breakdown(codes, g, r, space, edges)
        cnt = {c: sum(layer["counts"][c] for layer in layers) for c in CATEGORIES}
        c1_bins = [sum(layer["buckets"][i]["count"] for layer in layers) for i in range(len(edges) + 1)]
    else:
        layers = []
        cnt, c1_bins = tally(category_bin_key(codes, r, edges), edges)
    return {"codes": bitpack.pack_codes(codes), "counts": cnt, "c1_bins": c1_bins, "layers": layers,
            "split": magnitude_split(g, codes.numpy() == CODE["C1"]),
            "flat": flat_mask(g.square(), ire_rank)}


class Net(nn.Module):
    """An MLP with a parameter the loss never reaches (zero gradient: undefined ratios) and one
    whose gradient is exactly zero on half its entries."""

    def __init__(self, width=7):
        super().__init__()
        self.a = nn.Linear(5, width)
        self.b = nn.Linear(width, 3)
        self.unused = nn.Parameter(torch.randn(13))
        self.gate = nn.Parameter(torch.randn(6))

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(h) + (self.gate[:3] * x[:, :1]).sum(-1, keepdim=True)


def problem(dtype, width=7):
    torch.manual_seed(0)
    model = Net(width).to(dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(24, 5, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (24,), generator=g)
    return Objective(model, x, y)


def same_packed(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(np.asarray(a[k]), np.asarray(b[k])), k


@pytest.mark.parametrize("variant,m,faithful,dtype", [
    ("l2", None, False, torch.float32), ("linf", 10, False, torch.float32), ("usam", None, True, torch.float64),
    ("asam", 8, False, torch.float64), ("asam", None, False, torch.float32), ("l2", 7, False, torch.float64),
])
@pytest.mark.parametrize("chunk", [8, 24, 1 << 20])
def test_streamed_ratios_are_bit_identical_to_the_whole_vector_computation(variant, m, faithful, dtype, chunk):
    obj = problem(dtype)
    rho, eta, eps, rank = 0.3, 0.05, 1e-12, 0.6
    g_ref, gt_ref = reference_gradients(obj, rho, variant, m, eta)
    pg = perturbed_gradient(obj, rho=rho, variant=variant, m=m, eta=eta, with_loss=False)
    assert torch.equal(pg.grad, g_ref) and torch.equal(pg.perturbed_grad, gt_ref)  # bit for bit
    ref = reference_ratios(g_ref, gt_ref, obj.space, eps, faithful, DEFAULT_EDGES, True, rank)
    for per_layer in (True, False):
        res = ratio_from_gradients(pg.grad, pg.perturbed_grad, obj.space, rho=rho, variant=variant, m=m, eta=eta,
                                   eps=eps, faithful=faithful, per_layer=per_layer, ire_rank=rank, chunk=chunk)
        same_packed(res.packed_codes(), ref["codes"])
        assert np.array_equal(res.ire_flat, ref["flat"])
        assert res.counts == ref["counts"] and [b["count"] for b in res.buckets] == ref["c1_bins"]
        assert res.magnitude_split == ref["split"]
        assert res.per_layer == (ref["layers"] if per_layer else [])
    assert res.counts["boundary" if faithful else "undefined"] >= 13  # the unused parameter, the gate's unused half
    assert len({c for c in CATEGORIES if res.counts[c]}) >= 3


def test_dense_and_sparse_exceptions_and_ties_match():
    """Many undefined entries (dense exception plane), none, and exact ties of g² at the IRE threshold."""
    from sam_probe.core.params import ParamSpace

    rng = np.random.default_rng(0)
    n = 1001
    for frac_zero, space in ((0.0, None), (0.01, ParamSpace({"w": torch.zeros(600), "bias": torch.zeros(401)})),
                             (0.5, ParamSpace({"w": torch.zeros(3, 5), "v": torch.zeros(986)}))):
        g = torch.from_numpy(np.round(rng.standard_normal(n), 1))  # many equal |g|: ties
        g[torch.from_numpy(rng.random(n) < frac_zero)] = 0.0
        gt = torch.from_numpy(rng.standard_normal(n))
        gt[::17] = g[::17]  # r = 1 exactly: boundary
        for rank in (0.3, 0.9):
            ref = reference_ratios(g, gt, space, 1e-12, False, DEFAULT_EDGES, space is not None, rank)
            res = ratio_from_gradients(g, gt, space, per_layer=space is not None, ire_rank=rank, chunk=64)
            same_packed(res.packed_codes(), ref["codes"])
            assert np.array_equal(res.ire_flat, ref["flat"])
            assert res.counts == ref["counts"] and res.magnitude_split == ref["split"]
            assert torch.equal(res.codes, codes_from_ratio(ratio(g, gt)))


def test_half_precision_norms_are_taken_chunk_by_chunk(monkeypatch):
    """A bfloat16 gradient's float64 norm is summed chunk by chunk (no float64 copy of four times its size)."""
    from sam_probe.core import perturb
    from sam_probe.core.ratios import _norm

    monkeypatch.setattr(perturb, "CHUNK", 64)
    g = torch.randn(1000, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    assert _norm(g) == pytest.approx(float(g.double().norm()), rel=1e-12)
    assert _norm(g.float()) == float(torch.linalg.vector_norm(g.float(), dtype=torch.float64))
