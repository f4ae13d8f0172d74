"""``op.to_scipy()``: every curvature operator as a scipy ``LinearOperator``, checked against dense float64 references
built independently (tests/cases.py: the Hessian column by column from double backward)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cases import BY_NAME, Reference, objective  # noqa: E402

from sam_probe.core.dense import dense_matrix  # noqa: E402
from sam_probe.core.operators import CURVATURES, MatrixOperator, curvature_operator  # noqa: E402

scipy_linalg = pytest.importorskip("scipy.sparse.linalg")

CASE = BY_NAME["mlp-ce"]  # 51 parameters


@pytest.fixture(scope="module")
def hessian_ref() -> np.ndarray:
    return Reference(CASE).hessian().numpy()


def test_eigsh_on_the_hessian_equals_the_dense_top_eigenvalues(hessian_ref):
    obj = objective(CASE)
    op = curvature_operator(obj, "hessian")
    A = op.to_scipy()
    assert A.shape == (op.P, op.P) == hessian_ref.shape and A.dtype == np.float64
    with op.context():  # the gradient graph is kept across scipy's products
        vals = scipy_linalg.eigsh(A, k=2, which="LA", tol=1e-12, v0=np.ones(op.P), return_eigenvectors=False)
    ref = np.linalg.eigvalsh((hessian_ref + hessian_ref.T) / 2)[::-1][:2]
    np.testing.assert_allclose(np.sort(vals)[::-1], ref, rtol=1e-9, atol=1e-12)
    assert op.n_matvec > 0
    # outside a context too (each product builds its own graph), and smallest-algebraic
    low = scipy_linalg.eigsh(A, k=1, which="SA", tol=1e-12, v0=np.ones(op.P), return_eigenvectors=False)
    np.testing.assert_allclose(low, np.linalg.eigvalsh(hessian_ref)[:1], rtol=1e-8, atol=1e-10)


def test_products_vectors_blocks_and_symmetry(hessian_ref):
    op = curvature_operator(objective(CASE), "hessian")
    A = op.to_scipy()
    rng = np.random.default_rng(0)
    x, X = rng.standard_normal(op.P), rng.standard_normal((op.P, 3))
    np.testing.assert_allclose(A @ x, hessian_ref @ x, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(A.matvec(x[:, None]), (hessian_ref @ x)[:, None], rtol=1e-10, atol=1e-12)
    n = op.n_matvec
    np.testing.assert_allclose(A.matmat(X), hessian_ref @ X, rtol=1e-10, atol=1e-12)
    assert op.n_matvec == n + 3  # one block product
    np.testing.assert_allclose(A.rmatvec(x), A.matvec(x))
    np.testing.assert_allclose(A.H @ X, A @ X)
    np.testing.assert_allclose(A.T @ x, A @ x)
    z = x + 1j * rng.standard_normal(op.P)  # scipy may pass complex vectors to real operators
    np.testing.assert_allclose(A @ z, hessian_ref @ z, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(A.matvec(x.astype(np.float32)), hessian_ref @ x.astype(np.float32), rtol=1e-6)
    assert "hessian" in repr(A)


@pytest.mark.parametrize("name", sorted(set(CURVATURES) - {"fisher"}))
def test_every_curvature_operator_converts(name):
    op = curvature_operator(objective(CASE), name)
    ref = dense_matrix(op).numpy()
    A = op.to_scipy()
    X = np.random.default_rng(1).standard_normal((op.P, 2))
    np.testing.assert_allclose(A @ X, ref @ X, rtol=1e-9, atol=1e-12)
    top = scipy_linalg.eigsh(A, k=1, which="LA", tol=1e-12, v0=np.ones(op.P), return_eigenvectors=False)
    np.testing.assert_allclose(top, np.linalg.eigvalsh((ref + ref.T) / 2)[-1:], rtol=1e-8)


def test_mc_fisher_block_and_float32():
    op = curvature_operator(objective(CASE), "fisher", mc_samples=1, seed=0)
    A = op.to_scipy()
    x = np.ones(op.P)
    np.testing.assert_allclose(A @ x, op.matmat(torch.ones(op.P, dtype=torch.float64)).numpy(), rtol=1e-12)
    H = torch.tensor([[2.0, 1.0, 0.0], [1.0, 3.0, 0.0], [0.0, 0.0, -1.0]])
    A32 = MatrixOperator(H).to_scipy()  # a float32 operator stays float32 unless asked
    assert A32.dtype == np.float32 and MatrixOperator(H).to_scipy(np.float64).dtype == np.float64
    np.testing.assert_allclose(A32 @ np.ones(3), H.numpy() @ np.ones(3), rtol=1e-6)
    block = curvature_operator(objective(CASE), "hessian").restrict("0.weight")
    Ab = block.to_scipy()
    assert Ab.shape == (24, 24)
    with pytest.raises(ValueError, match="float32 or float64"):
        MatrixOperator(H).to_scipy(np.int64)


def test_scipy_is_imported_only_when_converting():
    import subprocess

    code = ("import sys, torch; from sam_probe.core.operators import MatrixOperator; "
            "op = MatrixOperator(torch.eye(2)); print('scipy.sparse.linalg' in sys.modules, end=' '); "
            "op.to_scipy(); print('scipy.sparse.linalg' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "True"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_an_operator_on_the_gpu_takes_and_returns_host_arrays():
    H = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    A = MatrixOperator(H.cuda()).to_scipy()
    np.testing.assert_allclose(A @ np.ones(2), [3.0, 4.0])
    np.testing.assert_allclose(scipy_linalg.eigsh(A, k=1, return_eigenvectors=False), [np.linalg.eigvalsh(H)[-1]])
