"""Bit-packed category codes: exact round trips, membership masks, popcount, size."""
import numpy as np
import pytest
import torch

from sam_probe.core import bitpack
from sam_probe.core.categories import CATEGORIES, CODE

LENGTHS = [0, 1, 5, 7, 8, 9, 63, 64, 65, 127, 1000, 4099]


def random_codes(n: int, p_exc: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.integers(0, 4, n).astype(np.uint8)
    exc = rng.random(n) < p_exc
    c[exc] = rng.integers(4, 6, int(exc.sum()))
    return c


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("p_exc", [0.0, 0.01, 0.5])
def test_round_trip(n, p_exc):
    codes = random_codes(n, p_exc, seed=n)
    packed = bitpack.pack_codes(codes)
    assert packed["n"] == n and packed["version"] == bitpack.VERSION
    assert packed["lo"].dtype == np.uint8 and packed["lo"].size == (n + 7) // 8
    out = bitpack.unpack_codes(packed)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, codes)


def test_all_categories_and_torch_input():
    codes = torch.tensor([0, 1, 2, 3, 4, 5, 5, 4, 3, 2, 1], dtype=torch.uint8)
    packed = bitpack.pack_codes(codes)
    np.testing.assert_array_equal(bitpack.unpack_codes(packed), codes.numpy())


def test_sparse_vs_dense_exceptions():
    n = 10_000
    sparse = bitpack.pack_codes(random_codes(n, 0.001, 0))
    dense = bitpack.pack_codes(random_codes(n, 0.2, 0))
    assert sparse["exc_dense"] == 0 and sparse["exc"].dtype == np.uint32
    assert np.all(np.diff(sparse["exc"].astype(np.int64)) > 0)
    assert dense["exc_dense"] == 1 and dense["exc"].size == (n + 7) // 8
    # whichever is smaller: 2 bits + min(1 bit, 32 bits per exception)
    assert bitpack.bits_per_param(sparse) <= 2 + 32 * 0.002
    assert bitpack.bits_per_param(dense) <= 3 + 1e-9
    assert bitpack.bits_per_param(bitpack.pack_codes(np.zeros(n, np.uint8))) == 2.0


@pytest.mark.parametrize("n", LENGTHS)
def test_membership_masks(n):
    codes = random_codes(n, 0.05, seed=n + 1)
    for dense in (False, True):
        packed = bitpack.pack_codes(codes)
        if dense and packed["exc_dense"] == 0:  # force the other exception representation
            packed = dict(packed, exc_dense=1, exc=np.packbits(codes >= 4))
        for name in CATEGORIES:
            m = bitpack.membership_mask(packed, name)
            assert m.dtype == np.uint8 and m.size == (n + 7) // 8
            want = codes == CODE[name]
            np.testing.assert_array_equal(bitpack.unpack_mask(m, n), want)
            np.testing.assert_array_equal(m, np.packbits(want))  # pad bits are zero
            assert bitpack.popcount(m) == int(want.sum())
            assert np.array_equal(bitpack.membership_mask(packed, CODE[name]), m)
        union = bitpack.membership_mask(packed, ["C1", "C3"])
        np.testing.assert_array_equal(union, np.packbits((codes == 0) | (codes == 2)))


def test_popcount_and_masks():
    rng = np.random.default_rng(3)
    for n in (0, 3, 64, 1001):
        a = rng.random(n) < 0.3
        b = rng.random(n) < 0.6
        pa, pb = bitpack.pack_mask(a), bitpack.pack_mask(torch.from_numpy(b))
        assert bitpack.popcount(pa) == int(a.sum())
        assert bitpack.and_count(pa, pb) == int((a & b).sum())
        np.testing.assert_array_equal(bitpack.unpack_mask(pa, n), a)
    dirty = np.array([0xFF], dtype=np.uint8)
    assert bitpack.popcount(bitpack.clear_tail(dirty, 3)) == 3


def test_popcount_lookup_table_fallback(monkeypatch):
    monkeypatch.setattr(bitpack, "_HAS_BITWISE_COUNT", False)
    a = np.random.default_rng(4).integers(0, 256, 1003).astype(np.uint8)
    assert bitpack.popcount(a) == int(np.unpackbits(a).sum())


def test_errors():
    with pytest.raises(ValueError):
        bitpack.pack_codes(np.array([0, 6], dtype=np.uint8))
    packed = bitpack.pack_codes(np.zeros(10, np.uint8))
    with pytest.raises(ValueError):
        bitpack.unpack_codes(dict(packed, version=2))
    with pytest.raises(ValueError):
        bitpack.unpack_codes(dict(packed, n=100))
    with pytest.raises(ValueError):
        bitpack.membership_mask(packed, "C7")
    with pytest.raises(ValueError):
        bitpack.unpack_codes(dict(packed, exc=np.array([10], dtype=np.uint32)))
