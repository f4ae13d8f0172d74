"""Objective: HVPs against the dense float64 Hessian, chunking, BN modes, no mutation."""
import pytest
import torch
from torch import nn
from torch.func import functional_call

from nets import DiagLinear
from sam_probe.core.losses import resolve
from sam_probe.core.objective import Objective, analysis_mode


def tanh_mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    return m, torch.randn(20, 4), torch.randint(0, 3, (20,))


def bn_cnn() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 3 * 3, 3))
    m.train()
    m(torch.randn(16, 1, 5, 5))  # non-trivial running stats
    m[1].weight.data.uniform_(0.5, 1.5)
    m[1].bias.data.normal_()
    return m, torch.randn(12, 1, 5, 5), torch.randint(0, 3, (12,))


def diag_linear() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(2)
    return DiagLinear(5), torch.randn(30, 5), torch.randn(30, 1)


def exact_hessian(model, x, y, loss, bn_mode="eval") -> torch.Tensor:
    """Dense float64 Hessian of the mean loss by torch.autograd.functional.hessian."""
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach().double() for n, p in model.named_parameters()}
    buffers = {n: b.double() if b.is_floating_point() else b for n, b in model.named_buffers()}
    shapes = [params[n].shape for n in names]
    w0 = torch.cat([params[n].reshape(-1) for n in names])

    def f(w):
        d, o = {}, 0
        for n, s in zip(names, shapes):
            d[n] = w[o:o + s.numel()].reshape(s)
            o += s.numel()
        out = functional_call(model, (d, buffers), (x.double(),))
        return resolve(loss).chunk_sum(out, y.double() if y.is_floating_point() else y) / len(x)

    with analysis_mode(model, bn_mode):
        return torch.autograd.functional.hessian(f, w0)


CASES = [("mlp", tanh_mlp, "ce", "eval"), ("cnn-eval", bn_cnn, "ce", "eval"),
         ("cnn-train", bn_cnn, "ce", "train"), ("diag", diag_linear, "mse", "eval")]


def snapshot(model):
    return ({n: p.detach().clone() for n, p in model.named_parameters()},
            {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
            {n: b.clone() for n, b in model.named_buffers()},
            [m.training for m in model.modules()])


def assert_same(a, b):
    for da, db in zip(a[:3], b[:3]):
        assert da.keys() == db.keys()
        for k in da:
            if da[k] is None:
                assert db[k] is None
            else:
                assert torch.equal(da[k], db[k]), k
    assert a[3] == b[3]


@pytest.mark.parametrize("method", ["rev-rev", "fwd-rev"])
@pytest.mark.parametrize("name,build,loss,bn", CASES, ids=[c[0] for c in CASES])
def test_hvp_block_matches_dense_hessian(name, build, loss, bn, method):
    model, x, y = build()
    H = exact_hessian(model, x, y, loss, bn)
    obj = Objective(model, x, y, loss, bn_mode=bn, dtype=torch.float64, hvp_method=method)
    V = torch.randn(obj.n_params, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(obj.hvp_block(V), H @ V, rtol=1e-9, atol=1e-10)
    with obj.reuse_graph():
        assert torch.allclose(obj.hvp_block(V), H @ V, rtol=1e-9, atol=1e-10)
        assert torch.allclose(obj.hvp_block(V[:, :1]), H @ V[:, :1], rtol=1e-9, atol=1e-10)
    assert obj.n_hvp == 7


def test_diag_linear_has_negative_curvature():
    model, x, y = diag_linear()
    ev = torch.linalg.eigvalsh(exact_hessian(model, x, y, "mse"))
    assert ev.min() < -1e-3 and ev.max() > 1e-3


@pytest.mark.parametrize("method", ["rev-rev", "fwd-rev"])
def test_chunked_equals_unchunked(method):
    model, x, y = bn_cnn()
    full = Objective(model, x, y, "ce", dtype=torch.float64, hvp_method=method)
    chunked = Objective(model, x, y, "ce", dtype=torch.float64, hvp_method=method, chunk_size=5)
    V = torch.randn(full.n_params, 2, dtype=torch.float64)
    assert torch.allclose(full.hvp_block(V), chunked.hvp_block(V), rtol=1e-11, atol=1e-13)
    assert torch.allclose(full.grad_flat(), chunked.grad_flat(), rtol=1e-11, atol=1e-13)
    with chunked.reuse_graph():  # several chunks: no cache, still exact
        assert torch.allclose(full.hvp_block(V), chunked.hvp_block(V), rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("bn", ["eval", "train"])
@pytest.mark.parametrize("method", ["rev-rev", "fwd-rev"])
def test_model_untouched(bn, method):
    model, x, y = bn_cnn()
    model.train()
    model(x).sum().backward()  # a .grad that must survive
    before = snapshot(model)
    obj = Objective(model, x, y, "ce", bn_mode=bn, hvp_method=method, chunk_size=5)
    V = torch.randn(obj.n_params, 2)
    obj.hvp_block(V)
    assert_same(before, snapshot(model))
    obj.grad_flat()
    obj.evaluate()
    assert_same(before, snapshot(model))
    with obj.reuse_graph():
        obj.hvp_block(V)
        obj.hvp(V[:, 0])
    assert_same(before, snapshot(model))
    assert obj.n_hvp == 5 and obj.n_grad == 1


def test_bn_modes_differ_and_train_mode_uses_batch_stats():
    model, x, y = bn_cnn()
    ev = Objective(model, x, y, "ce", bn_mode="eval", dtype=torch.float64)
    tr = Objective(model, x, y, "ce", bn_mode="train", dtype=torch.float64)
    assert not torch.allclose(ev.grad_flat(), tr.grad_flat())


def test_reuse_graph_is_scoped():
    model, x, y = tanh_mlp()
    obj = Objective(model, x, y, "ce", dtype=torch.float64)
    v = torch.randn(obj.n_params, 1, dtype=torch.float64)
    with obj.reuse_graph():
        a = obj.hvp_block(v)
        assert obj.hessian_products.graph_cache is not None
    assert obj.hessian_products.graph_cache is None
    assert torch.allclose(a, obj.hvp_block(v), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("bn", ["eval", "train"])
def test_kept_graphs_of_every_chunk_are_exact_and_skip_forwards(bn):
    """``keep_graphs``: inside reuse_graph each chunk's gradient graph is built once and reused,
    giving the same HVPs as rebuilding them (BN in train mode: each chunk stays its own batch)."""
    model, x, y = bn_cnn()
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        rebuilt = Objective(model, x, y, "ce", bn_mode=bn, dtype=torch.float64, chunk_size=5)
        kept = Objective(model, x, y, "ce", bn_mode=bn, dtype=torch.float64, chunk_size=5)
        kept.keep_graphs = True
        V = torch.randn(kept.n_params, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        ref = rebuilt.hvp_block(V)
        n_chunks = len(list(kept.chunks()))
        assert n_chunks == 3
        with kept.reuse_graph():
            calls.clear()
            first = kept.hvp_block(V)
            assert len(calls) == n_chunks  # one forward per chunk, once
            again = kept.hvp_block(V[:, :1])
            assert len(calls) == n_chunks  # no forward at all for later HVPs
        assert torch.allclose(first, ref, rtol=1e-12, atol=1e-14)
        assert torch.allclose(again, ref[:, :1], rtol=1e-12, atol=1e-14)
        assert kept.hessian_products.graph_cache is None  # released on exit
        with rebuilt.reuse_graph():  # without keep_graphs a chunked objective rebuilds every time
            calls.clear()
            rebuilt.hvp_block(V[:, :1])
            rebuilt.hvp_block(V[:, :1])
            assert len(calls) == 2 * n_chunks
    finally:
        handle.remove()


def test_objective_meets_the_protocol_operators_rely_on():
    from sam_probe.core.protocols import ObjectiveLike

    model, x, y = tanh_mlp()
    obj = Objective(model, x, y, "ce")
    assert isinstance(obj, ObjectiveLike)
    assert obj.loss_obj.name == obj.loss_name == "ce" and obj.hvp_method == "rev-rev"
