"""Edge of stability of GD and SAM: the thresholds are where one step along the top eigenvector stops shrinking."""
import math

import pytest
import torch

from sam_probe.core.eos import edge_of_stability, gd_edge, sam_edge, sam_effective


@pytest.mark.parametrize("variant", ["l2", "usam"])
def test_sam_edge_is_where_the_quadratic_step_multiplier_reaches_minus_one(variant):
    eta, rho, gnorm = 0.2, 0.05, 0.3
    lam = sam_edge(eta, rho, variant, gnorm)
    assert sam_effective(eta, lam, rho, variant, gnorm) == pytest.approx(2.0, rel=1e-12)
    assert lam < gd_edge(eta)  # SAM's edge lies below 2/eta
    # L(x, y) = lam/2 x^2 + gnorm * y near x = 0: ||g|| = gnorm; SAM's step on x is x - eta lam (x + e_x)
    x = 1e-9
    for lam_try, grows in ((0.99 * lam, False), (1.01 * lam, True)):
        g = torch.tensor([lam_try * x, gnorm], dtype=torch.float64)
        e = rho * g / g.norm() if variant == "l2" else rho * g
        new_x = x - eta * lam_try * (x + float(e[0]))
        assert (abs(new_x) > abs(x)) == grows


def test_small_rho_tends_to_gd_and_fields():
    assert sam_edge(0.1, 1e-9, "l2", 1.0) == pytest.approx(20.0, rel=1e-6)
    assert sam_edge(0.1, 1e-9, "usam") == pytest.approx(20.0, rel=1e-6)
    f = edge_of_stability(0.1, 15.0, sam_rho=0.05, sam_variant="l2", grad_norm=2.0)
    assert f["eta_lambda_max"] == pytest.approx(1.5) and f["lambda_edge"] == pytest.approx(20.0)
    s = f["sam_edge"]
    assert s["eta_lambda_eff"] == pytest.approx(0.1 * 15 * (1 + 0.05 * 15 / 2.0))
    assert s["lambda_edge"] == pytest.approx(2.0 / (2 * 0.05) * (math.sqrt(1 + 8 * 0.05 / (0.1 * 2.0)) - 1))
    assert edge_of_stability(None, 3.0) == {"eta_lambda_max": None, "lambda_edge": None, "sam_edge": None}
