"""Stored lists read back as lists: values HDF5 cannot hold as arrays (ragged, mixed, huge integers) round-trip."""
from __future__ import annotations

import json

import h5py
import pytest

from sam_probe import store
from sam_probe.results import from_store

LISTS = {
    "ragged": [[1, 2], [3]],
    "mixed": ["x", 1, None],
    "none_and_text": [None, "a"],
    "huge_ints": [2**70, 1],
    "nested_dicts": [[{"a": 1}]],
    "in_list_of_dicts": [{"x": [[1], [2, 3]]}, {"x": ["a", 2]}],
    "text_that_looks_like_json": "[1, 2]",
    "grid": [[1.5, 2.0], [3.0, 4.0]],
}


def test_lists_round_trip_as_lists(tmp_path):
    p = store.write_unit(tmp_path / "u.h5", {"nested": dict(LISTS), **LISTS}, {"analysis": "x"})
    back = from_store(store.read_unit(p)[0])
    for k, v in LISTS.items():
        assert back[k] == v, k
        assert back["nested"][k] == v, k
    assert isinstance(back["text_that_looks_like_json"], str)


def test_merged_file_reads_lists_back(tmp_path):
    store.write_unit(tmp_path / "res" / "a" / "u.h5", dict(LISTS), {"analysis": "x"})
    n = store.merge(tmp_path / "res", tmp_path / "all.h5")
    assert n == 1
    (_, result, _), = list(store.iter_units(tmp_path / "all.h5"))
    assert from_store(result) == LISTS


@pytest.mark.parametrize("marker", ["not json", json.dumps({"a": 1}), json.dumps([[]] * 1 + ["[" * 40])])
def test_a_crafted_marker_is_refused_or_harmless(tmp_path, marker):
    p = store.write_unit(tmp_path / "u.h5", {"ragged": [[1], [2, 3]]}, {"analysis": "x"})
    with h5py.File(p, "r+") as f:
        f["result"].attrs[store.JSON_KEYS] = marker
    try:
        result, _ = store.read_unit(p)
    except store.UnsafeResults:
        return
    assert isinstance(result["ragged"], str)  # names nothing readable: the text stays text


def test_deep_json_text_is_refused(tmp_path):
    p = store.write_unit(tmp_path / "u.h5", {"ragged": [[1], [2, 3]]}, {"analysis": "x"})
    with h5py.File(p, "r+") as f:
        f["result"].attrs["ragged"] = "[" * 100 + "]" * 100
    with pytest.raises(store.UnsafeResults, match="JSON"):
        store.read_unit(p)
    skipped = []
    assert list(store.iter_units(tmp_path, on_skip=lambda n, why: skipped.append(why))) == []
    assert skipped and "JSON" in skipped[0]
