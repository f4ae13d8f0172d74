"""Per-parameter categories of the SAM gradient ratio ``r_i = g~_i / g_i``.

docs/metrics.md, "Ratio categories": ``r`` is defined only where ``|g_i| > eps``.

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

import numpy as np
import torch
from torch import Tensor

from .names import CATEGORIES

CODE = {name: i for i, name in enumerate(CATEGORIES)}
FAITHFUL_OFFSET = 1e-8


def ratio(g: Tensor, g_tilde: Tensor, eps: float = 1e-12, faithful: bool = False) -> Tensor:
    """``r = g~ / g`` (NaN where undefined), or the notebook's ``g~ / (g + 1e-8)``."""
    if faithful:
        return g_tilde / (g + FAITHFUL_OFFSET)
    return torch.where(g.abs() > eps, g_tilde / g, torch.full_like(g, float("nan")))


def categorize(g: Tensor, g_tilde: Tensor, eps: float = 1e-12, faithful: bool = False) -> Tensor:
    """Category code (``uint8``, see module docstring) of every entry of flat ``g``."""
    return codes_from_ratio(ratio(g, g_tilde, eps, faithful))


def codes_from_ratio(r: Tensor) -> Tensor:
    """Category codes of ratios ``r`` (NaN = undefined).

    Away from the boundary the code is ``2·[r < 0] + [|r| < 1]``
    (C1=0, C2=1, C3=2, C4=3); ``r ∈ {-1, 0, 1}`` is boundary, NaN undefined.
    CPU float tensors take the (faster) numpy path, :func:`codes_from_ratio_numpy`.
    """
    if r.device.type == "cpu" and r.dtype in (torch.float32, torch.float64):
        return torch.from_numpy(codes_from_ratio_numpy(r.detach().numpy()))
    a = r.abs()
    codes = (r < 0).to(torch.uint8) * 2 + (a < 1).to(torch.uint8)
    nan = torch.isnan(r)
    special = nan | (r == 0) | (a == 1)
    exc = torch.where(nan, CODE["undefined"], CODE["boundary"]).to(torch.uint8)
    return torch.where(special, exc, codes)


def codes_from_ratio_numpy(r: np.ndarray) -> np.ndarray:
    """:func:`codes_from_ratio` on a numpy array (uint8 codes, same shape)."""
    a = np.abs(r)
    codes = np.left_shift((r < 0).view(np.uint8), 1)
    codes |= (a < 1).view(np.uint8)
    special = np.flatnonzero(~((a != 1) & (r != 0) & (r == r)))  # ±1, 0 or NaN (rare)
    codes.reshape(-1)[special] = CODE["boundary"] + np.isnan(r.reshape(-1)[special])
    return codes


def counts(codes: Tensor) -> dict[str, int]:
    """``{category: count}``; the counts sum to ``P``."""
    bc = torch.bincount(codes.reshape(-1).long(), minlength=len(CATEGORIES))
    return {name: int(bc[i]) for i, name in enumerate(CATEGORIES)}
