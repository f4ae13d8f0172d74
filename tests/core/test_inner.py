"""core/inner.py on one process: the plain local operations (the sharded sums: tests/core/test_sharded*.py)."""
from __future__ import annotations

import math

import torch

from sam_probe.core import inner


def test_norms_are_each_vectors_norm_in_one_call():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(17, generator=g, dtype=torch.float64)
    b = torch.randn(5, generator=g, dtype=torch.float32)
    got = inner.norms(a, b, torch.zeros(3))
    assert math.isclose(got[0], float(a.norm()), rel_tol=1e-15)
    assert math.isclose(got[1], float(b.double().norm()), rel_tol=1e-15)
    assert got[2] == 0.0 and inner.norm(a) == float(a.norm())
