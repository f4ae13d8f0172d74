"""Per-layer spectra against dense diagonal blocks of the dense float64 operators."""
import pytest
import torch

from sam_probe.core.dense import dense_matrix
from sam_probe.core.operators import curvature_operator
from sam_probe.core.per_layer import module_of, parameter_groups, per_layer_spectra
from test_operators import objective


def blocks(obj, by):
    sl = obj.space.slices()
    return {g: torch.cat([torch.arange(sl[n].start, sl[n].stop) for n in names])
            for g, names in parameter_groups(obj.space.names, by).items()}


def test_groups():
    names = ["w", "fc1.weight", "fc1.bias", "blocks.0.conv.weight"]
    assert parameter_groups(names, "tensor") == {n: [n] for n in names}
    assert parameter_groups(names, "module") == {"(root)": ["w"], "fc1": ["fc1.weight", "fc1.bias"],
                                                 "blocks.0.conv": ["blocks.0.conv.weight"]}
    assert module_of("a.b.c") == "a.b"
    with pytest.raises(ValueError, match="grouping"):
        parameter_groups(names, "layer")


@pytest.mark.parametrize("name", ["hessian", "ggn"])
@pytest.mark.parametrize("by", ["tensor", "module"])
@pytest.mark.parametrize("exact_max", [64, 0])  # dense exact blocks, and the Lanczos + Hutch++ path
def test_rows_match_dense_blocks(name, by, exact_max):
    obj = objective("ce")
    A = dense_matrix(curvature_operator(obj, name))
    op = curvature_operator(obj, name)
    rows = per_layer_spectra(op, by=by, tol=1e-8, exact_max=exact_max, trace_tol=1e-3, trace_max_hvp=200, seed=1)
    idx = blocks(obj, by)
    assert [r.name for r in rows] == list(idx)
    for r in rows:
        B = A[idx[r.name]][:, idx[r.name]]
        lam = torch.linalg.eigvalsh(B)[-1]
        assert r.n_params == len(idx[r.name])
        assert r.top_eigenvalue == pytest.approx(float(lam), rel=1e-7, abs=1e-12)
        assert r.converged and r.residual <= 1e-8
        exact = float(torch.trace(B))
        if exact_max:
            assert r.exact and r.trace_se == 0.0 and r.trace == pytest.approx(exact, rel=1e-12)
            assert r.n_hvp == r.n_params
        else:
            assert not r.exact and abs(r.trace - exact) <= 4 * r.trace_se + 1e-10 * abs(exact)
        d = r.to_dict()
        assert {"name", "top_eigenvalue", "residual", "trace", "trace_se", "n_params"} <= d.keys()
