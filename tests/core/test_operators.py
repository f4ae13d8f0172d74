"""Curvature operators against dense float64 references built independently with torch.func.jacrev."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian, jacrev, vmap

from sam_probe.core.dense import dense_eigh, dense_hessian, dense_matrix
from sam_probe.core.density import curvature_density, hessian_density
from sam_probe.core.lanczos import top_eigen
from sam_probe.core.objective import Objective
from sam_probe.core.operators import (CURVATURES, EmpiricalFisherOperator, HessianOperator, MatrixOperator,
                                      as_operator, curvature_operator)
from sam_probe.core.trace import curvature_trace, hessian_trace

N = 20


def data(loss: str, n: int = N, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    if loss == "ce":
        y = torch.randint(0, 3, (n,), generator=g)
    elif loss == "mse":
        y = torch.randn(n, 3, generator=g, dtype=torch.float64)
    else:
        y = torch.randint(0, 2, (n, 3), generator=g).double()
    return x, y


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def bn_net():
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).double()
    m.train()
    m(torch.randn(16, 4, dtype=torch.float64))
    return m.eval()


def objective(kind="ce", model=None, bn_mode="eval", loss=None, **kw) -> Objective:
    x, y = data(kind)
    return Objective(model or mlp(), x, y, loss or kind, bn_mode=bn_mode, dtype=torch.float64, **kw)


def references(obj: Objective) -> dict[str, torch.Tensor]:
    """Dense GGN and EF from full Jacobians (jacrev) and output Hessians (torch.func.hessian), per chunk."""
    names = obj.space.names
    G = torch.zeros(obj.n_params, obj.n_params, dtype=torch.float64)
    EF = torch.zeros_like(G)
    with obj.mode():
        for x, y in obj.chunks():
            def f(p):
                return functional_call(obj.model, (p, obj.buffers), (x,))

            J = jacrev(f)(obj.params)
            B, C = x.shape[0], 3
            J = torch.cat([J[k].reshape(B * C, -1) for k in names], 1)  # rows (i, c)
            out = f(obj.params)
            # the loss of sample i alone as a function of its outputs (mean over outputs for mse/bce)
            Hl = vmap(hessian(lambda o, t: obj.loss_sum_from_outputs(o[None], t[None])))(out, y)  # [B, C, C]
            G += J.T @ torch.block_diag(*Hl) @ J

            def losses(p):
                o = f(p)
                if obj.loss_name == "ce":
                    return F.cross_entropy(o, y, reduction="none")
                if obj.loss_name == "mse":
                    return (o - y).pow(2).mean(1)
                return F.binary_cross_entropy_with_logits(o, y, reduction="none").mean(1)

            Jl = jacrev(losses)(obj.params)
            gi = torch.cat([Jl[k].reshape(B, -1) for k in names], 1)  # per-sample gradients within the chunk
            EF += gi.T @ gi
    return {"ggn": G / obj.n_samples, "ef": EF / obj.n_samples}


def eye(P):
    return torch.eye(P, dtype=torch.float64)


@pytest.mark.parametrize("loss", ["ce", "mse", "bce"])
def test_ggn_is_jt_hl_j(loss):
    obj = objective(loss)
    ref = references(obj)["ggn"]
    for closed in (True, False):  # closed-form output Hessian and the generic double-backward path
        op = curvature_operator(obj, "ggn", closed_form=closed)
        G = op.matmat(eye(obj.n_params))
        assert op.n_matvec == obj.n_params
        assert torch.allclose(G, ref, atol=1e-13, rtol=0), (closed, float((G - ref).abs().max()))
        with op.context():  # one chunk: the forward graph is kept between products
            assert torch.allclose(op.matmat(eye(obj.n_params)), ref, atol=1e-13, rtol=0)
            assert op._graph
        assert op._graph is None
    assert float(torch.linalg.eigvalsh(ref).min()) > -1e-12  # PSD for these convex losses


@pytest.mark.parametrize("loss", ["ce", "mse", "bce"])
def test_empirical_fisher_from_per_sample_gradients(loss):
    obj = objective(loss)
    ref = references(obj)["ef"]
    cached = curvature_operator(obj, "ef")
    assert cached.per_sample  # tiny: per-sample gradients are kept
    outer = curvature_operator(obj, "ef", per_sample=False)
    for op in (cached, outer):
        assert torch.allclose(op.matmat(eye(obj.n_params)), ref, atol=1e-13, rtol=0)
        with op.context():
            assert torch.allclose(op.matmat(eye(obj.n_params)), ref, atol=1e-13, rtol=0)


def test_ef_with_batchnorm_in_train_mode_keeps_the_chunk_coupling():
    obj = objective("ce", model=bn_net(), bn_mode="train", chunk_size=7)
    op = curvature_operator(obj, "ef")
    assert not op.per_sample  # single-sample gradients would change the batch statistics
    with pytest.raises(ValueError, match="BatchNorm"):
        EmpiricalFisherOperator(obj, per_sample=True)
    refs = references(obj)
    assert torch.allclose(op.matmat(eye(obj.n_params)), refs["ef"], atol=1e-13, rtol=0)
    assert torch.allclose(curvature_operator(obj, "ggn").matmat(eye(obj.n_params)), refs["ggn"], atol=1e-13, rtol=0)


def test_hessian_operator_is_the_objectives_hessian():
    obj = objective("ce")
    op = as_operator(obj)
    assert isinstance(op, HessianOperator) and op.name == "hessian"
    H = dense_matrix(op)
    assert torch.equal(H, dense_hessian(obj))


def test_mc_fisher_converges_to_ggn_for_ce_within_its_se():
    """E[F̂] = G for ce: a quadratic form of F̂ (S = 2000 draws) is within 4 SE of G's; the SE from
    independent single-draw operators (their sample variance / S)."""
    obj = objective("ce")
    P = obj.n_params
    G = references(obj)["ggn"]
    v = torch.randn(P, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    S = 2000
    big = curvature_operator(obj, "fisher", mc_samples=S, seed=0)
    est = (v * big.matmat(v)).sum(0)
    singles = torch.stack([(v * curvature_operator(obj, "fisher", mc_samples=1, seed=s).matmat(v)).sum(0)
                           for s in range(1, 41)])
    se = singles.std(0) / S ** 0.5
    exact = (v * (G @ v)).sum(0)
    assert ((est - exact).abs() <= 4 * se).all(), (est, exact, se)
    assert ((est - exact).abs() / exact).max() < 0.05
    # and it is a fixed symmetric matrix: the same draws at every product
    F1 = big.matmat(eye(P))
    assert torch.allclose(F1, F1.T, atol=1e-14) and torch.equal(F1, big.matmat(eye(P)))


def test_mc_fisher_for_mse_and_bce_has_the_stated_expectation():
    for loss, factor in (("mse", 1.0), ("bce", 1 / 3)):  # bce: the loss is the NLL / C (C = 3 outputs)
        obj = objective(loss)
        G = references(obj)["ggn"]
        Fh = curvature_operator(obj, "fisher", mc_samples=4000, seed=1).matmat(eye(obj.n_params))
        assert float((Fh - factor * G).norm() / (factor * G).norm()) < 0.05, loss


def test_fisher_needs_a_predictive_distribution():
    obj = objective("ce", loss=lambda out, y: F.cross_entropy(out, y, reduction="none"))
    with pytest.raises(ValueError, match="predictive distribution"):
        curvature_operator(obj, "fisher")
    with pytest.raises(ValueError, match="unknown curvature"):
        curvature_operator(objective("ce"), "kfac")


@pytest.mark.parametrize("name", CURVATURES)
def test_chunked_equals_unchunked(name):
    one = objective("ce")
    many = objective("ce", chunk_size=3, vector_block=2)
    I = eye(one.n_params)
    A = curvature_operator(one, name, mc_samples=2).matmat(I)
    B = curvature_operator(many, name, mc_samples=2).matmat(I)
    assert torch.allclose(A, B, atol=1e-14, rtol=1e-12), float((A - B).abs().max())


@pytest.mark.parametrize("name", CURVATURES)
def test_every_operator_through_eigen_trace_density(name):
    obj = objective("ce")
    op = curvature_operator(obj, name, mc_samples=2, seed=3)
    A = dense_matrix(curvature_operator(obj, name, mc_samples=2, seed=3))
    ref, vecs = dense_eigh(A, "LA", 3)
    eig = top_eigen(op, 3, tol=1e-9)
    assert eig.all_converged and eig.curvature == name
    assert torch.allclose(torch.tensor(eig.eigenvalues, dtype=torch.float64), ref, rtol=1e-7, atol=0)
    V, lam = eig.eigenvectors, torch.tensor(eig.eigenvalues, dtype=torch.float64)
    assert ((A @ V - V * lam).norm(dim=0) / lam.abs() <= 1e-9 + 1e-11).all()  # residuals honest
    exact = float(torch.trace(A))
    for method in ("hutchinson", "hutch++"):
        tr = curvature_trace(op, method, tol=1e-3, max_hvp=400, seed=1)
        assert tr.curvature == name
        assert abs(tr.estimate - exact) <= 4 * tr.se + 1e-12 * abs(exact)
    dens = curvature_density(op, steps=obj.n_params, n_probes=2, seed=2)
    assert dens.curvature == name
    assert abs(float(torch.cat(dens.nodes).max()) - float(ref[0])) <= 1e-8 * abs(float(ref[0]))
    assert abs(float(torch.trapezoid(dens.density, dens.grid)) - 1) < 1e-9


def test_old_objective_wrappers_still_work():
    obj = objective("mse")
    H = dense_hessian(obj)
    assert hessian_trace is curvature_trace and hessian_density is curvature_density
    assert abs(hessian_trace(obj, "hutch++", tol=1e-3).estimate - float(torch.trace(H))) < 0.1 * float(torch.trace(H))
    assert top_eigen(obj, 2, tol=1e-8).curvature == "hessian"


def test_restrict_is_the_dense_diagonal_block():
    obj = objective("ce")
    sl = obj.space.slices()
    for name in ("hessian", "ggn", "ef"):
        A = dense_matrix(curvature_operator(obj, name))
        op = curvature_operator(obj, name)
        for sel in (["0.weight"], ["2.weight", "2.bias"], slice(3, 17)):
            block = op.restrict(sel)
            idx = torch.arange(obj.n_params)[sel] if isinstance(sel, slice) else \
                torch.cat([torch.arange(sl[n].start, sl[n].stop) for n in sel])
            B = dense_matrix(block)
            assert torch.allclose(B, A[idx][:, idx], atol=1e-13, rtol=0), (name, sel)
            assert block.curvature == name and block.name.startswith(name + "[")
    with pytest.raises(ValueError, match="unknown parameter"):
        op.restrict("nope")


def test_matrix_operator_and_counter():
    A = torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64))
    op = MatrixOperator(A)
    assert top_eigen(op, 1, tol=1e-10).eigenvalues[0] == pytest.approx(5.0)
    assert op.n_matvec > 0
    with pytest.raises(ValueError, match="V must be"):
        op.matmat(torch.zeros(4, 1, dtype=torch.float64))


def test_hessian_minus_ggn_is_the_functional_hessian():
    """H − G from its own operator equals the dense Hessian minus the dense GGN; 0 for a model linear in w."""
    obj = objective("ce")
    op = curvature_operator(obj, "hessian-ggn")
    D = dense_matrix(op)
    ref = dense_hessian(obj) - references(obj)["ggn"]
    assert torch.allclose(D, ref, atol=1e-13, rtol=0) and float(ref.abs().max()) > 1e-3
    assert float(torch.linalg.eigvalsh(ref).min()) < -1e-4  # indefinite
    lin = objective("ce", model=nn.Linear(4, 3).double())
    assert float(dense_matrix(curvature_operator(lin, "hessian-ggn")).abs().max()) < 1e-14
