"""Overlap across steps against brute-force Python set arithmetic."""
import json
import math

import numpy as np
import pytest
import torch

from sam_probe.core import bitpack, overlap


def random_sets(n: int, T: int, seed: int) -> list[set[int]]:
    """Correlated random sets: each step keeps most of the previous set."""
    rng = np.random.default_rng(seed)
    cur = rng.random(n) < 0.4
    out = []
    for _ in range(T):
        flip = rng.random(n) < 0.2
        cur = np.where(flip, rng.random(n) < 0.4, cur)
        out.append(set(np.flatnonzero(cur).tolist()))
    return out


def pack(s: set[int], n: int) -> np.ndarray:
    m = np.zeros(n, dtype=bool)
    m[list(s)] = True
    return np.packbits(m)


def close(a, b) -> bool:
    a, b = float(a), float(b)
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12)


@pytest.mark.parametrize("n", [1, 13, 64, 200, 1027])
@pytest.mark.parametrize("anchor_index", [0, 2])
def test_against_sets(n, anchor_index):
    T = 5
    sets = random_sets(n, T, seed=n)
    steps = [10 * t + 3 for t in range(T)]
    res = overlap.overlap_analysis([pack(s, n) for s in sets], n, steps=steps, anchor=steps[anchor_index])
    sz = [len(s) for s in sets]
    assert res.sizes.tolist() == sz
    a = anchor_index
    for t in range(T):
        obs = len(sets[a] & sets[t])
        exp = n * (sz[a] / n) * (sz[t] / n)
        assert res.anchor["overlap"][t] == obs
        assert close(res.anchor["expected"][t], exp)
        assert close(res.anchor["lift"][t], obs / exp if exp > 0 else float("nan"))
        lo, hi = min(a, t), max(a, t)
        core = set.intersection(*sets[lo:hi + 1])
        exp_k = n * math.prod(sz[s] / n for s in range(lo, hi + 1))
        assert res.persistent["size"][t] == len(core)
        assert close(res.persistent["expected"][t], exp_k)
        for u in range(T):
            inter = len(sets[t] & sets[u])
            union = len(sets[t] | sets[u])
            assert res.intersections[t, u] == inter
            assert close(res.jaccard[t, u], inter / union if union else float("nan"))
    d = res.to_dict()
    json.dumps(d, allow_nan=False)
    assert d["anchor"]["step"] == steps[a]
    assert set(d) >= {"category", "steps", "sizes", "anchor", "jaccard", "persistent", "ire"}
    assert set(d["anchor"]) >= {"step", "overlap", "expected", "lift"}
    assert set(d["persistent"]) >= {"size", "expected"}


def test_empty_and_full_sets():
    n = 70
    masks = [pack(set(), n), pack(set(range(n)), n), pack(set(), n)]
    res = overlap.overlap_analysis(masks, n)
    assert res.sizes.tolist() == [0, n, 0]
    assert math.isnan(res.jaccard[0, 2]) and res.jaccard[1, 1] == 1.0 and res.jaccard[0, 1] == 0.0
    assert math.isnan(res.anchor["lift"][0])
    d = res.to_dict()
    json.dumps(d, allow_nan=False)
    assert d["jaccard"][0][2] is None


def test_dirty_pad_bits_are_ignored():
    n = 10
    m = pack({0, 9}, n)
    m[-1] |= 0x3F  # garbage beyond bit 10
    res = overlap.overlap_analysis([m, m], n)
    assert res.sizes.tolist() == [2, 2] and res.intersections[0, 1] == 2


def test_without_pairwise_matches():
    n = 300
    masks = [pack(s, n) for s in random_sets(n, 4, 7)]
    full = overlap.overlap_analysis(masks, n, anchor=1)
    lite = overlap.overlap_analysis(masks, n, anchor=1, pairwise=False)
    np.testing.assert_array_equal(full.anchor["overlap"], lite.anchor["overlap"])
    assert lite.jaccard is None and lite.to_dict()["jaccard"] is None


def test_flat_mask_brute_force():
    rng = np.random.default_rng(0)
    n = 101
    score = rng.random(n)
    score[10:20] = 0.5  # ties
    for rank in (0.0, 0.1, 0.5, 0.9, 1.0):
        k = round(rank * n)
        order = sorted(range(n), key=lambda i: (-score[i], i))  # largest first, ties by index
        sharp = set(order[:k])
        want = set(range(n)) - sharp
        got = set(np.flatnonzero(bitpack.unpack_mask(overlap.flat_mask(score, rank), n)).tolist())
        assert got == want
    # torch input, exact count with heavy ties
    m = overlap.flat_mask(torch.zeros(50), 0.3)
    assert bitpack.popcount(m) == 35
    with pytest.raises(ValueError):
        overlap.flat_mask(score, 1.5)


def test_running_square():
    gs = [np.array([1.0, 2.0]), np.array([3.0, 0.0]), np.array([0.0, 1.0])]
    r = overlap.RunningSquare()
    for g in gs:
        v = r.update(g)
    np.testing.assert_allclose(v, np.mean([g ** 2 for g in gs], axis=0))
    e = overlap.RunningSquare(beta=0.5)
    for g in gs:
        v = e.update(torch.tensor(g))
    want = gs[0] ** 2
    for g in gs[1:]:
        want = 0.5 * want + 0.5 * g ** 2
    np.testing.assert_allclose(v, want)


def test_ire_overlap():
    rng = np.random.default_rng(1)
    n, T, rank = 500, 3, 0.8
    sets = random_sets(n, T, 2)
    grads = [rng.normal(size=n) for _ in range(T)]
    for average in ("none", "running"):
        flats = overlap.ire_flat_masks(grads, rank, average=average)
        res = overlap.overlap_analysis([pack(s, n) for s in sets], n, flat_masks=flats, ire_rank=rank)
        acc = np.zeros(n)
        for t in range(T):
            acc += grads[t] ** 2
            score = acc / (t + 1) if average == "running" else grads[t] ** 2
            top = set(np.argsort(-score, kind="stable")[:round(rank * n)].tolist())
            flat = set(range(n)) - top
            obs = len(sets[t] & flat)
            assert res.ire["overlap"][t] == obs
            assert close(res.ire["expected"][t], len(sets[t]) * len(flat) / n)
            assert res.ire["flat_size"][t] == n - round(rank * n)
        json.dumps(res.to_dict(), allow_nan=False)
    single = overlap.overlap_analysis([pack(s, n) for s in sets], n, flat_masks=flats[:1])
    assert single.ire["overlap"][0] == res.ire["overlap"][0]


def test_category_masks_from_codes():
    rng = np.random.default_rng(5)
    codes = [rng.integers(0, 6, 77).astype(np.uint8) for _ in range(3)]
    masks = overlap.category_masks((bitpack.pack_codes(c) for c in codes), "C1")
    res = overlap.overlap_analysis(masks, 77)
    assert res.sizes.tolist() == [int((c == 0).sum()) for c in codes]


def test_bad_inputs():
    m = pack({1}, 16)
    with pytest.raises(ValueError):
        overlap.overlap_analysis([m], 17)
    with pytest.raises(ValueError):
        overlap.overlap_analysis([m, m], 16, steps=[2, 1])
    with pytest.raises(ValueError):
        overlap.overlap_analysis([m], 16, anchor=5)
    with pytest.raises(ValueError):
        overlap.overlap_analysis([], 16)


def test_streamed_flat_masks_and_counts():
    n, T = 90, 3
    sets = random_sets(n, T, 9)
    masks = [pack(s, n) for s in sets]
    flats = [pack(set(range(0, n, k + 2)), n) for k in range(T)]
    res = overlap.overlap_analysis(masks, n, flat_masks=(f for f in flats))
    assert res.ire["overlap"].tolist() == [len(sets[t] & set(range(0, n, t + 2))) for t in range(T)]
    with pytest.raises(ValueError):
        overlap.overlap_analysis(masks, n, flat_masks=flats[:2])
    with pytest.raises(ValueError):
        overlap.overlap_analysis(masks, n, flat_masks=flats + flats)


def test_lookup_table_fallback_matches(monkeypatch):
    n = 1000
    masks = [pack(s, n) for s in random_sets(n, 4, 11)]
    fast = overlap.overlap_analysis(masks, n, anchor=2)
    monkeypatch.setattr(overlap, "_HAS_BITWISE_COUNT", False)
    monkeypatch.setattr(bitpack, "_HAS_BITWISE_COUNT", False)
    slow = overlap.overlap_analysis(masks, n, anchor=2)
    np.testing.assert_array_equal(fast.intersections, slow.intersections)
    np.testing.assert_array_equal(fast.persistent["size"], slow.persistent["size"])


# ------------------------------------------------------------------ informative nulls, exact on constructed sequences
def _core(sets, window):
    out = set(sets[window[0]])
    for t in window[1:]:
        out &= sets[t]
    return len(out)


@pytest.mark.parametrize("n", [7, 130, 1100])
@pytest.mark.parametrize("i0", [0, 2, 4])
def test_shuffled_null_is_the_mean_over_every_order_of_the_other_steps(n, i0):
    import itertools

    T = 5
    sets = random_sets(n, T, seed=n + i0)
    res = overlap.overlap_analysis([pack(s, n) for s in sets], n, anchor=i0, pairwise=False)
    shuf = res.nulls["shuffled"]
    others = [t for t in range(T) if t != i0]
    core_sum, ov_sum, count = np.zeros(T), np.zeros(T), 0
    for perm in itertools.permutations(others):
        order = list(perm[:i0]) + [i0] + list(perm[i0:])  # the anchor keeps its place, the others are shuffled
        shuffled = [sets[t] for t in order]
        for t in range(T):
            lo, hi = min(i0, t), max(i0, t)
            core_sum[t] += _core(shuffled, list(range(lo, hi + 1)))
            ov_sum[t] += len(shuffled[i0] & shuffled[t])
        count += 1
    for t in range(T):
        assert math.isclose(shuf["persistent"]["expected"][t], core_sum[t] / count, rel_tol=1e-12)
        assert math.isclose(shuf["anchor"]["expected"][t], ov_sum[t] / count, rel_tol=1e-12)
    assert shuf["persistent"]["lift"][i0] == 1.0


def _markov_exact(sets, n, i0):
    """E[core], E[overlap] of a 2-state chain with the pooled transition probabilities, by enumerating paths."""
    import itertools

    T = len(sets)
    size = [len(s) for s in sets]
    inter = [len(sets[s] & sets[s + 1]) for s in range(T - 1)]

    def step_prob(frm_in, to_in, s, forward):
        a_from, a_to = (s, s + 1) if forward else (s + 1, s)
        stay = inter[s] / size[a_from] if size[a_from] else 0.0
        enter = (size[a_to] - inter[s]) / (n - size[a_from]) if n - size[a_from] else 0.0
        p_in = stay if frm_in else enter
        return p_in if to_in else 1 - p_in

    core, ov = [0.0] * T, [0.0] * T
    for t in range(T):
        lo, hi = min(i0, t), max(i0, t)
        forward = t >= i0
        for path in itertools.product([True, False], repeat=hi - lo):
            p, state = 1.0, True
            for j, nxt in enumerate(path):
                s = (i0 + j) if forward else (i0 - j - 1)
                p *= step_prob(state, nxt, s, forward)
                state = nxt
            if all(path):
                core[t] += p
            if state:
                ov[t] += p
        core[t] *= size[i0]
        ov[t] *= size[i0]
    return core, ov


@pytest.mark.parametrize("i0", [0, 3, 5])
def test_markov_null_equals_the_two_state_chain_by_enumeration(i0):
    n, T = 300, 6
    sets = random_sets(n, T, seed=11 + i0)
    res = overlap.overlap_analysis([pack(s, n) for s in sets], n, anchor=i0, pairwise=False)
    mk = res.nulls["markov"]
    core, ov = _markov_exact(sets, n, i0)
    for t in range(T):
        assert math.isclose(mk["persistent"]["expected"][t], core[t], rel_tol=1e-12, abs_tol=1e-9)
        assert math.isclose(mk["anchor"]["expected"][t], ov[t], rel_tol=1e-12, abs_tol=1e-9)
    for t in (i0 - 1, i0 + 1):  # the fitted first transition: lift exactly 1
        if 0 <= t < T:
            assert math.isclose(mk["persistent"]["lift"][t], 1.0, rel_tol=1e-12)
            assert math.isclose(mk["anchor"]["lift"][t], 1.0, rel_tol=1e-12)


def test_nulls_tell_a_persistent_subset_from_churn():
    """Half the parameters are always in S, the others enter at random: independence calls both
    'persistent'; the Markov null sees the sticky subset; the shuffled null sees no time order."""
    rng = np.random.default_rng(0)
    n, T = 4000, 12
    sticky = rng.random(n) < 0.5
    sets = [set(np.flatnonzero(sticky | (rng.random(n) < 0.3)).tolist()) for _ in range(T)]
    res = overlap.overlap_analysis([pack(s, n) for s in sets], n, pairwise=False, null="markov").to_dict()
    ind, shuf, mk = (res["nulls"][k]["persistent"]["lift"] for k in ("independence", "shuffled", "markov"))
    assert ind[-1] > 50  # the uninformative baseline
    assert abs(shuf[-1] - 1) < 0.05  # no temporal structure: any order gives the same core
    assert mk[-1] > 3  # much stickier than one-step memory predicts
    assert res["null"] == "markov" and res["persistent"]["lift"] == mk
    # temporal blocks (membership runs in time) are what the shuffled null detects
    blocks = [set(range(0, n // 2)) if t < T // 2 else set(range(n // 2, n)) for t in range(T)]
    blocks = [b | set(np.flatnonzero(rng.random(n) < 0.1).tolist()) for b in blocks]
    r2 = overlap.overlap_analysis([pack(s, n) for s in blocks], n, pairwise=False).to_dict()
    assert r2["nulls"]["shuffled"]["persistent"]["lift"][4] > 2


def test_control_null_is_the_control_runs_retention():
    n, T = 500, 5
    sets = random_sets(n, T, seed=3)
    masks = [pack(s, n) for s in sets]
    ctl = overlap.overlap_analysis(masks, n, steps=[0, 1, 2, 3, 4], pairwise=False)
    same = overlap.overlap_analysis(masks, n, steps=[0, 1, 2, 3, 4], pairwise=False, control=ctl, null="control")
    assert all(math.isclose(x, 1.0) for x in same.nulls["control"]["persistent"]["lift"])
    half = [pack(set(list(s)[: len(s) // 2]), n) for s in sets]  # a control that keeps a different share
    c2 = overlap.overlap_analysis(half, n, steps=[0, 1, 2, 3, 4], pairwise=False)
    r = overlap.overlap_analysis(masks, n, steps=[0, 1, 2, 3, 4], pairwise=False, control=c2)
    a0, a0c = len(sets[0]), len(sets[0]) // 2
    for t in range(T):
        exp = a0 * c2.persistent["size"][t] / a0c
        assert math.isclose(r.nulls["control"]["persistent"]["expected"][t], exp, rel_tol=1e-12)
    short = overlap.overlap_analysis(masks[:3], n, steps=[0, 1, 2], pairwise=False)
    r3 = overlap.overlap_analysis(masks, n, steps=[0, 1, 2, 3, 4], pairwise=False, control=short).to_dict()
    assert r3["nulls"]["control"]["persistent"]["expected"][3] is None  # the control lacks step 3
    with pytest.raises(ValueError, match="control"):
        overlap.overlap_analysis(masks, n, null="control")


def test_shuffled_counts_are_the_same_in_any_block_size():
    n, T = 1100, 6
    sets = random_sets(n, T, seed=5)
    ms = overlap.MaskSet([pack(s, n) for s in sets], n)
    whole = overlap.other_step_counts(ms, 2)
    assert np.array_equal(whole, overlap.other_step_counts(ms, 2, block_words=1))
    assert np.array_equal(whole, overlap.other_step_counts(ms, 2, block_words=3))
    brute = np.bincount([sum(i in sets[t] for t in range(T) if t != 2) for i in sets[2]], minlength=T)
    assert np.array_equal(whole, brute)
