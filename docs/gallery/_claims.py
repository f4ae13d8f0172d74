"""Each phenomenon as a predicate with its null, shared by the gallery scripts and tests/test_phenomena.py.

A claim is only a result when it beats the null it is stated against; every predicate here is
False when only the null holds (tests/test_phenomena.py shows each one failing on a null-only case).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


# ------------------------------------------------------------------ loss falls in the bulk (Song et al.)
def first_order_ratio(chi_sq: float) -> float:
    """The null of the one-step split: to first order ``dL_P ≈ -η gᵀ P g``, so
    ``dL_bulk / dL_dom ≈ (1 - χ²) / χ²`` whatever the landscape (χ = χ_k of the full gradient)."""
    return (1.0 - chi_sq) / chi_sq if chi_sq > 0 else math.inf


def naive_bulk_claim(dL: Mapping[str, float]) -> bool:
    """The old test: the bulk step lowers the loss more than the dominant one. Holds for every
    checkpoint with χ² < 1/2 by the first-order null alone (so it is not a result)."""
    return dL["bulk"] < 0 and abs(dL["bulk"]) > abs(dL["dom"])


def bulk_beyond_first_order(dL: Mapping[str, float], chi_sq: float, factor: float = 2.0) -> bool:
    """The bulk lowers the loss at least ``factor`` times more, relative to the dominant part, than
    the first-order null predicts (or the dominant step does not lower the loss at all)."""
    if dL["bulk"] >= 0:
        return False
    if dL["dom"] >= 0:
        return True
    return dL["bulk"] / dL["dom"] > factor * first_order_ratio(chi_sq)


def multi_step_bulk(decrease: Mapping[str, float], chi_sq: float, factor: float = 2.0,
                    keep: float = 0.5) -> bool:
    """Over many projected steps (Dom-SGD / Bulk-SGD from the same weights): the bulk run keeps at
    least ``keep`` of the full run's loss decrease, and beats the dominant run by ``factor`` times
    the first-order split ``(1 - χ²)/χ²`` (the null: each subspace keeps its one-step share).
    ``decrease``: positive loss decreases of the ``full``, ``dom`` and ``bulk`` runs."""
    full, dom, bulk = decrease["full"], decrease["dom"], decrease["bulk"]
    if full <= 0 or bulk < keep * full:
        return False
    if dom <= 0:
        return True
    return bulk / dom > factor * first_order_ratio(chi_sq)


# ------------------------------------------------------------------ late SAM (Zhou et al.)
def escapes_beyond_sgd(late: Sequence[float], sgd: Sequence[float], factor: float = 1.2) -> bool:
    """Late SAM's distance from the switch weights exceeds the SGD continuation's (the null: SGD
    drifts too) by ``factor`` at every compared step."""
    return bool(late) and len(late) == len(sgd) and all(a > factor * b for a, b in zip(late, sgd))


def exponential_escape(fit: Mapping[str, Any], r2: float = 0.95) -> bool:
    """The distance grows exponentially: the exponential fit describes it better than a power law,
    and well (``R² >= r2``)."""
    e, p = fit.get("exponential"), fit.get("power")
    return bool(e and p) and e["r2"] >= r2 and e["r2"] > p["r2"]


def same_valley(barrier: float, positive_control: float, frac: float = 0.1, floor: float = 0.05) -> bool:
    """No ridge between the two solutions, measured against a pair known to lie in different valleys
    (``positive_control``, e.g. two SGD seeds): that barrier must be clearly positive, and this one
    below ``frac`` of it."""
    return positive_control > floor and barrier < frac * positive_control


def flatter_at_matched_loss(changes: Sequence[float | None], threshold: float = -0.1) -> bool:
    """λ_max lower than SGD's at matched training loss for every seed, and by more than ``threshold``
    on average (the null: the difference at the end comes from comparing different losses)."""
    v = [c for c in changes if c is not None]
    return len(v) == len(changes) and len(v) >= 1 and all(c < 0 for c in v) and sum(v) / len(v) < threshold


# ------------------------------------------------------------------ minor first (Moon, Si & Yun)
def minor_first_major_last(ranks: Sequence[int], n_features: int) -> bool:
    """The weakest feature leads first, the lead only moves to stronger features, through at least
    half of them, and the strongest leads last (the null: GD leads with the strongest throughout)."""
    if not ranks:
        return False
    return (ranks[0] == n_features - 1 and ranks[-1] == 0 and all(b <= a for a, b in zip(ranks, ranks[1:]))
            and len(set(ranks)) >= n_features // 2)


# ------------------------------------------------------------------ persistence (the notebook)
def persists_beyond(lifts: Sequence[float | None], threshold: float = 1.5) -> bool:
    """The persistent core stays ``threshold`` times above an informative null (shuffled or Markov)
    at every compared step."""
    v = [x for x in lifts if x is not None]
    return bool(v) and all(x > threshold for x in v)
