"""Half precision: bf16/fp16 models with float32 solver arithmetic, against dense float64 references."""
import pytest
import torch
from torch import nn

from sam_probe.core import precision
from sam_probe.core.dense import dense_eigh, dense_hessian
from sam_probe.core.lanczos import top_eigen
from sam_probe.core.objective import Objective
from sam_probe.errors import CLI, SpecError, style


def _mlp_data():
    """A tanh MLP (P = 143) whose weights and inputs are exactly representable in bfloat16 *and* float16."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 7), nn.Tanh(), nn.Linear(7, 3))
    with torch.no_grad():
        for p in m.parameters():  # 8 significant bits, well inside float16's range
            p.copy_(p.to(torch.bfloat16).float())
    x = torch.randn(40, 6).to(torch.bfloat16).float()
    y = torch.randint(0, 3, (40,))
    return m, x, y


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_top_eigenvalue_within_stated_accuracy_of_float64_dense(dtype):
    m, x, y = _mlp_data()
    lam = float(dense_eigh(dense_hessian(Objective(m, x, y, "ce", dtype=torch.float64)), "LA", 1)[0][0])
    obj = Objective(m, x, y, "ce", dtype=dtype)
    assert next(iter(obj.params.values())).dtype == dtype  # the model runs in the half dtype
    tol = 2 * precision.min_tol(dtype)
    res = top_eigen(obj, 1, tol=tol, seed=0)
    assert res.eigenvectors.dtype == torch.float32  # the solver's arithmetic
    stated = res.plan["precision"]
    assert stated["model_dtype"] == str(dtype).split(".")[1] and stated["solver_dtype"] == "float32"
    assert stated["unit_roundoff"] == {torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11}[dtype]
    assert stated["product_accuracy"] == 4 * stated["unit_roundoff"]
    assert stated["certified_by"] == "float32 products" and len(stated["product_errors"]) == 1
    theta, r = res.eigenvalues[0], res.residuals[0]
    assert res.converged[0] and r <= tol
    assert stated["product_errors"][0] <= 2 * stated["product_accuracy"]  # measured: within the model here
    assert abs(theta - lam) <= r * abs(theta), (theta, lam, r)  # certified: within the stated residual
    # control: the half-precision eigenvalue is *not* float32-accurate, so the stated accuracy is needed
    f32 = top_eigen(Objective(m, x, y, "ce", dtype=torch.float32), 1, tol=1e-5, seed=0)
    assert abs(f32.eigenvalues[0] - lam) <= 1e-4 * lam < abs(theta - lam) or dtype == torch.float16


def test_half_products_far_worse_than_the_model_are_caught_by_float32_certificates():
    """A tiny GPT-2 (width 4, LayerNorm) amplifies rounding ~70x: bfloat16's λ1 is 21% off. The rounding
    model alone would certify it (the null this test fails on); the float32 products refuse it."""
    from hftiny import gpt2, perturb, token_batch

    m = perturb(gpt2())
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    x = {k: v for k, v in token_batch(20, labels="lm").items() if k != "labels"}
    lam = float(dense_eigh(dense_hessian(Objective(m, x, None, "lm", dtype=torch.float64)), "LA", 1)[0][0])
    res = top_eigen(Objective(m, x, None, "lm", dtype=torch.bfloat16), 1, tol=0.05, seed=0, max_hvp=40)
    theta, r = res.eigenvalues[0], res.residuals[0]
    assert abs(theta - lam) > 0.05 * abs(theta)  # the bf16 number is wrong beyond tol ...
    assert not res.converged[0] and abs(theta - lam) <= r * abs(theta)  # ... and not called certified
    assert res.plan["precision"]["product_errors"][0] > 0.05
    assert any("checked with float32 products" in w and "dtype='float32'" in w for w in res.warnings)


def test_too_tight_tolerance_is_refused_neutrally():
    m, x, y = _mlp_data()
    obj = Objective(m, x, y, "ce", dtype=torch.bfloat16)
    with pytest.raises(SpecError) as exc:
        top_eigen(obj, 1, tol=1e-6)
    e = exc.value
    assert e.option == "tol" and e.value == 1e-6 and obj.n_hvp == 0  # refused before any product
    assert "\n" not in str(e) and "dtype='float32'" in str(e) and "--" not in str(e)  # neutral in Python
    with style(CLI):
        assert str(e).startswith("--tol 1e-06: bfloat16 products are accurate to about")
        assert "pass --tol 0.032 or more, or --dtype float32" in str(e)
    precision.check_tol(precision.min_tol(torch.bfloat16), torch.bfloat16)  # the floor itself passes
    precision.check_tol(1e-12, torch.float32)  # float32 and float64 are not limited here
    assert precision.min_tol(torch.float16) == pytest.approx(2 ** -8)


def test_float32_and_float64_are_unchanged():
    m, x, y = _mlp_data()
    res = top_eigen(Objective(m, x, y, "ce", dtype=torch.float64), 1, tol=1e-8)
    assert "precision" not in res.plan and res.eigenvectors.dtype == torch.float64
    assert precision.solver_dtype(torch.float64) == torch.float64


def test_upcast_note_states_the_memory_before_it_is_spent():
    big = [torch.empty(124_000_000, dtype=torch.bfloat16, device="meta"),
           torch.empty(439_000, dtype=torch.bfloat16, device="meta")]
    note = precision.upcast_note(big, torch.float32)
    assert note is not None and note.startswith("upcasting 124M bfloat16 parameters to float32: +0.50 GB")
    with style(CLI):
        from sam_probe.errors import render

        assert render(note).endswith("(pass --dtype bfloat16 to run in it)")
    assert precision.upcast_note(big, torch.bfloat16) is None  # run as saved: nothing copied up
    assert precision.upcast_note([torch.zeros(3), torch.zeros(2, dtype=torch.long)], torch.float32) is None
    fp16 = precision.upcast_note([torch.zeros(1000, dtype=torch.float16)], torch.float64)
    assert fp16 == precision.upcast_note([torch.zeros(1000, dtype=torch.float16)], "float64")
    assert "1k float16 parameters to float64: +8.00 kB" in fp16


def test_settings_accept_half_dtypes():
    from sam_probe.settings import Settings

    assert Settings(dtype="bfloat16").torch_dtype() == torch.bfloat16
    assert Settings(dtype="float16").torch_dtype() == torch.float16
    with pytest.raises(SpecError, match="bfloat16 or float16"):
        Settings(dtype="int8").torch_dtype()


# ------------------------------------------- every curvature checked in float32 (issue 20, half precision)
def _dense(op):
    return op.matmat(torch.eye(op.P, dtype=op.dtype)).double()


def _small_mlp_data():
    """A tanh MLP with P = 51, bfloat16-representable weights and inputs (dense operators are cheap)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    x = torch.randn(24, 4).to(torch.bfloat16).float()
    return m, x, torch.randint(0, 3, (24,))


@pytest.mark.parametrize("name", ["ggn", "fisher", "ef", "hessian-ggn"])
def test_every_curvature_is_certified_with_float32_products(name):
    """GGN, MC Fisher, EF and H - G in bfloat16: each returned pair is checked with a product of a float32
    twin of the operator; the reported residual is that product's, recomputed here from a dense float32
    matrix of an independently built operator (for the Fisher: the same draws, rounded to bfloat16)."""
    from sam_probe.core.operators import curvature_operator

    m, x, y = _small_mlp_data()
    dtype = torch.bfloat16
    op = curvature_operator(Objective(m, x, y, "ce", dtype=dtype), name, mc_samples=4)
    tol = 2 * precision.min_tol(dtype)
    res = top_eigen(op, 1, tol=tol, seed=0, which="LA")
    stated = res.plan["precision"]
    assert stated["certified_by"] == "float32 products", name
    twin = curvature_operator(Objective(m, x, y, "ce", dtype=torch.float32), name, mc_samples=4)
    if name == "fisher":
        twin.noise_dtype = dtype
    A32 = _dense(twin)
    theta, v = res.eigenvalues[0], res.eigenvectors[:, 0].double()
    r = float((A32 @ v - theta * v).norm()) / abs(theta)
    assert res.residuals[0] == pytest.approx(r, rel=1e-3, abs=1e-6)
    if res.converged[0]:  # certified: within the residual of an eigenvalue of the float32 operator
        assert float((torch.linalg.eigvalsh(A32) - theta).abs().min()) <= r * abs(theta) * 1.001
    if name != "fisher":  # the float32 operator is the float64 one up to float32 rounding: λ1 close to it
        lam = float(torch.linalg.eigvalsh(_dense(curvature_operator(Objective(m, x, y, "ce", dtype=torch.float64),
                                                                    name)))[-1])
        assert abs(theta - lam) <= max(r, 1e-4) * abs(theta) + 1e-5 or not res.converged[0]


def test_per_layer_blocks_of_a_half_curvature_are_checked_in_float32():
    """Per-layer spectra in bfloat16: dense blocks (<= exact_max entries) and Lanczos blocks alike are
    checked against float32 products; the checked residuals bound the distance to float64's λ1 of the block."""
    from sam_probe.core.operators import curvature_operator
    from sam_probe.core.per_layer import per_layer_spectra

    m, x, y = _mlp_data()
    dtype = torch.bfloat16
    tol = 2 * precision.min_tol(dtype)
    rows = per_layer_spectra(curvature_operator(Objective(m, x, y, "ce", dtype=dtype), "ggn"), tol=tol,
                             exact_max=64, seed=0, trace_tol=0.5, trace_max_hvp=12)
    ref = curvature_operator(Objective(m, x, y, "ce", dtype=torch.float64), "ggn")
    names = ref.space.names
    assert {r.exact for r in rows} == {True, False}  # both paths
    for row, name in zip(rows, names):
        lam = float(torch.linalg.eigvalsh(_dense(ref.restrict([name], label=name)))[-1])
        assert row.residual > 1e-6  # a float32 check of half products, not the dense matrix's own ~1e-16
        if row.converged:
            assert abs(row.top_eigenvalue - lam) <= max(row.residual, 1e-4) * abs(lam) + 1e-5, (name, row, lam)
