"""Per-parameter categories of the SAM gradient ratio ``r_i = g~_i / g_i``.

REFERENCE.md, "Ratio categories": ``r`` is defined only where ``|g_i| > eps``.

- ``C1``: r > 1 (same sign, perturbed larger)      code 0
- ``C2``: 0 < r < 1 (same sign, perturbed smaller) code 1
- ``C3``: r < -1 (sign flip, perturbed larger)     code 2
- ``C4``: -1 < r < 0 (sign flip, perturbed smaller) code 3
- ``boundary``: r ∈ {-1, 0, 1}                       code 4
- ``undefined``: |g_i| <= eps                        code 5

``faithful=True`` reproduces the original notebook: ``r = g~ / (g + 1e-8)``
everywhere (no undefined bucket) with the same strict inequalities.
"""
from __future__ import annotations

import torch
from torch import Tensor

CATEGORIES = ("C1", "C2", "C3", "C4", "boundary", "undefined")
CODE = {name: i for i, name in enumerate(CATEGORIES)}
FAITHFUL_OFFSET = 1e-8


def ratio(g: Tensor, g_tilde: Tensor, eps: float = 1e-12, faithful: bool = False) -> Tensor:
    """``r = g~ / g`` (NaN where undefined), or the notebook's ``g~ / (g + 1e-8)``."""
    if faithful:
        return g_tilde / (g + FAITHFUL_OFFSET)
    r = torch.full_like(g, float("nan"))
    ok = g.abs() > eps
    r[ok] = g_tilde[ok] / g[ok]
    return r


def categorize(g: Tensor, g_tilde: Tensor, eps: float = 1e-12, faithful: bool = False) -> Tensor:
    """Category code (``uint8``, see module docstring) of every entry of flat ``g``."""
    r = ratio(g, g_tilde, eps, faithful)
    codes = torch.full(g.shape, CODE["boundary"], dtype=torch.uint8, device=g.device)
    codes[r > 1] = CODE["C1"]
    codes[(r > 0) & (r < 1)] = CODE["C2"]
    codes[r < -1] = CODE["C3"]
    codes[(r > -1) & (r < 0)] = CODE["C4"]
    codes[torch.isnan(r)] = CODE["undefined"]
    return codes


def counts(codes: Tensor) -> dict[str, int]:
    """``{category: count}``; the counts sum to ``P``."""
    bc = torch.bincount(codes.reshape(-1).long(), minlength=len(CATEGORIES))
    return {name: int(bc[i]) for i, name in enumerate(CATEGORIES)}
