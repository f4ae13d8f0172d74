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
    assert math.isclose(got[1], float(b.double().norm()), rel_tol=1e-7)  # float32: summed to float32 rounding
    assert got[2] == 0.0 and inner.norm(a) == float(a.norm())


P_BIG = 10_000_000  # where one float32 BLAS sum of same-signed terms is off by ~1e-4 on the CPU


def test_float32_sums_at_ten_million_entries_are_float64_accurate():
    """Norms, dots and Gram entries of float32 vectors of 10⁷ entries within 1e-7 of float64 (a plain
    ``v.norm()`` / ``a @ b`` there loses about 4e-4 on this CPU build)."""
    from sam_probe.core.vectors import VectorStore

    g = torch.Generator().manual_seed(0)
    a = torch.randn(P_BIG, generator=g)
    b = a + 0.1 * torch.randn(P_BIG, generator=g)
    a64, b64 = a.double(), b.double()
    rel = lambda x, y: abs(float(x) / float(y) - 1)  # noqa: E731
    assert rel(inner.norm(a), a64.norm()) <= 1e-7
    assert rel(inner.dot(a, b), a64 @ b64) <= 1e-7
    assert rel(inner.norms(a, b)[1], b64.norm()) <= 1e-7
    assert rel(inner.colnorms(torch.stack([a, b], 1))[0], a64.norm()) <= 1e-7
    G = inner.gram(torch.stack([a, b], 1), b)
    assert G.dtype == torch.float32 and rel(G[0], a64 @ b64) <= 1e-7 and rel(G[1], b64 @ b64) <= 1e-7
    assert rel(inner.coldots(a[:, None], b[:, None])[0], a64 @ b64) <= 1e-7
    Q = VectorStore(P_BIG, torch.float32, "cpu")
    Q.append(a[:, None].clone())
    assert rel(Q.dots(b[:, None])[0, 0], a64 @ b64) <= 1e-7
    Q.close()


def test_lanczos_in_float32_on_ten_million_parameters_keeps_an_orthonormal_basis():
    """A diagonal operator of 10⁷ entries with a few large eigenvalues over a bulk near 1e-3 (the
    Hessian of a random-init GPT-2 of 10M parameters has this shape), solved in float32: the Lanczos
    vectors it multiplies are orthonormal to 1e-6 (recomputed here in float64) and the top pair is
    certified.  With float32 BLAS norms they were about 7e-4 off unit length, and on that GPT-2 the
    solve stalled at residuals of 5e-3 with its eigenvalue 0.5% low."""
    from sam_probe.core.lanczos import lanczos

    g = torch.Generator().manual_seed(1)
    d = (torch.rand(P_BIG, generator=g, dtype=torch.float64) * 2e-3).float()
    d[:5] = torch.tensor([276.76, 269.5, 250.6, 246.3, 242.6])
    seen: list[torch.Tensor] = []

    def matmat(V):
        if len(seen) < 6:
            seen.append(V[:, 0].clone())
        return d[:, None] * V

    got = lanczos(matmat, P_BIG, 1, tol=1e-3, max_hvp=60, seed=0, dtype=torch.float32, device="cpu", max_basis=8)
    G = torch.tensor([[float(a.double() @ b.double()) for b in seen] for a in seen], dtype=torch.float64)
    assert float((G - torch.eye(len(seen), dtype=torch.float64)).abs().max()) <= 1e-6, G.diagonal()
    assert got.certified and abs(got.eigenvalues[0] - float(d[0])) <= got.residuals[0] * float(d[0])


def test_sums_hold_no_float64_copy_of_a_vector():
    """Norms and dots of float32 vectors allocate one chunk, not a float64 copy (2 vectors' bytes):
    torch's allocations tracked, not RSS."""
    from sam_probe.core.memory import peak_bytes

    g = torch.Generator().manual_seed(2)
    v, w = torch.randn(4 * inner.CHUNK, generator=g), torch.randn(4 * inner.CHUNK, generator=g)
    vec = 4 * v.numel()
    for fn in (lambda: inner.norm(v), lambda: inner.dot(v, w), lambda: inner.norms(v, w),
               lambda: inner.gram(v, w)):
        assert peak_bytes(fn, "cpu") <= 0.5 * vec
