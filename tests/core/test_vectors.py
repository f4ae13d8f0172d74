"""``VectorStore``'s basis algebra against dense float64, across its column blocks."""
from __future__ import annotations

import pytest
import torch

from sam_probe.core import vectors
from sam_probe.core.vectors import CACHE_CHUNK, VectorStore

P = 2 * CACHE_CHUNK + 12_345  # three column blocks on the CPU, the last one short


def _store(rows: torch.Tensor, dtype: torch.dtype) -> VectorStore:
    Q = VectorStore(rows.shape[1], dtype, "cpu", first_page=2)
    Q.append(rows.T.to(dtype).clone())
    return Q


@pytest.mark.parametrize("dtype,b", [(torch.float32, 1), (torch.float32, 3), (torch.float64, 1), (torch.float64, 2)])
def test_dots_subtract_and_the_fused_sweep_equal_dense_float64(dtype, b):
    g = torch.Generator().manual_seed(0)
    rows = torch.linalg.qr(torch.randn(P, 5, generator=g, dtype=torch.float64))[0].T  # orthonormal rows
    W = torch.randn(P, b, generator=g, dtype=torch.float64)
    Q = _store(rows, dtype)
    Qd = rows.to(dtype).double()  # the rows as stored
    Wd = W.to(dtype)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    scale = float(W.norm())

    assert (Q.dots(Wd).double() - Qd @ Wd.double()).abs().max() <= tol * scale
    H = torch.randn(5, b, generator=g, dtype=torch.float64)
    Ws = Wd.clone()
    Q.subtract(Ws, H)
    assert (Ws.double() - (Wd.double() - Qd.T @ H)).abs().max() <= tol * scale

    Wf = Wd.clone()
    got = Q.subtract_dots(Wf, H)
    ref = Wd.double() - Qd.T @ H
    assert (Wf.double() - ref).abs().max() <= tol * scale
    assert (got.double() - Qd @ ref).abs().max() <= tol * scale

    Wo = Wd.clone()
    Q.orthogonalise(Wo)  # two sweeps: orthogonal to the rows to rounding
    assert (Qd @ Wo.double()).abs().max() <= tol * scale
    proj = Wd.double() - Qd.T @ (Qd @ Wd.double())
    assert (Wo.double() - proj).abs().max() <= 10 * tol * scale
    Q.close()


def test_p_sweeps_read_the_basis_p_plus_one_times(monkeypatch):
    """Classical Gram–Schmidt with ``p`` sweeps reads ``Q`` ``p + 1`` times (``p`` given ``Qᵀ W``), not ``2p``."""
    g = torch.Generator().manual_seed(1)
    rows = torch.linalg.qr(torch.randn(P, 4, generator=g, dtype=torch.float64))[0].T
    Q = _store(rows, torch.float32)
    reads = []
    pieces = VectorStore._pieces

    def counted(self):
        reads.append(1)
        yield from pieces(self)

    monkeypatch.setattr(VectorStore, "_pieces", counted)
    W = torch.randn(P, 1, generator=g)
    for passes in (1, 2, 3):
        reads.clear()
        Q.orthogonalise(W, passes)
        assert len(reads) == passes + 1
        reads.clear()
        Q.orthogonalise(W, passes, first=Q.dots(W))
        assert len(reads) == passes + 1  # the caller's dots included
    Q.close()
    assert vectors.CACHE_CHUNK < P


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rotate_equals_dense_across_its_column_blocks(dtype):
    """``Q ← Q S`` in place (rows beyond ``S`` kept after the new ones), over several gathered blocks and a
    short last one."""
    g = torch.Generator().manual_seed(2)
    rows = torch.randn(6, P, generator=g, dtype=torch.float64)
    Q = _store(rows, dtype)
    S = torch.linalg.qr(torch.randn(5, 3, generator=g, dtype=torch.float64))[0]  # rows 0..4 -> 3; row 5 pending
    step = min(P // (4 * 8), vectors.ROTATE_CHUNK // 8)  # rotate's column block for 5 rows in, 3 out
    assert P // step >= 2 and P % step != 0  # several blocks, the last one short
    Q.rotate(S)
    Qd = rows.to(dtype).double()
    want = torch.cat([S.T.to(dtype).double() @ Qd[:5], Qd[5:]])
    got = torch.stack([r.double() for r in Q.rows])
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert got.shape == want.shape and (got - want).abs().max() <= tol * float(want.abs().max())
    Q.close()
