"""HDF5 result store: nested dict round trips, metadata, atomic unit files, iteration and merge."""
from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from sam_probe import store


def _files(d):
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())


def _no_temp_files(d) -> bool:
    return not [p for p in d.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]


RESULT = {
    "int": 3,
    "float": 2.5,
    "neg": -1e-30,
    "str": "sharpness",
    "unicode": "σ_max ≈ λ",
    "true": True,
    "false": False,
    "none": None,
    "npf": np.float32(1.5),
    "npi": np.int64(7),
    "ints": [1, 2, 3],
    "floats": [0.5, 1.5],
    "with_none": [1.0, None, 3.0],
    "ints_with_none": [1, None],
    "grid": [[1.0, 2.0], [3.0, 4.0]],
    "int_grid": [[1, 2], [3, 4]],
    "tuple": (4.0, 5.0),
    "bools": [True, False, True],
    "strs": ["a", "bc"],
    "empty": [],
    "array": np.arange(6, dtype=np.int32).reshape(2, 3),
    "f64": np.linspace(0, 1, 5),
    "tensor": torch.arange(4, dtype=torch.float32).reshape(2, 2),
    "big": np.random.RandomState(0).randn(5000),
    "nested": {"deep": {"v": 3, "gone": None, "arr": np.ones(2)}, "k": "x"},
    "rows": [{"step": i, "value": float(i) / 2, "eig": [float(i), 1.0]} for i in range(12)],
    1: "int key",
}


@pytest.fixture
def unit(tmp_path):
    path = store.unit_path(tmp_path / "out", "sharpness", "run", "step_000172.pt", "abc123")
    meta = {"sam_probe_version": "0.1.0", "torch_version": str(torch.__version__), "step": 172, "seed": 0,
            "wall_time": 1.25, "checkpoint": "/runs/a/step_000172.pt", "sha256": "f" * 64,
            "command": ["sam-probe", "sharpness", "run"], "config": {"rho": 0.05, "n": [1, 2]},
            "model_spec": {"name": "mlp", "args": {"width": 4}}, "data_spec": {"name": "digits"},
            "device": "cpu", "other": {"a": 1}, "skip": None, "trusted": False}
    return store.write_unit(path, RESULT, meta), meta


def test_round_trip(unit):
    path, _ = unit
    r, _ = store.read_unit(path)
    for k in ("int", "str", "unicode", "true", "false"):
        assert r[k] == RESULT[k] and type(r[k]) is type(RESULT[k])
    assert r["float"] == 2.5 and r["neg"] == -1e-30
    assert "none" not in r
    assert r["npf"] == 1.5 and r["npi"] == 7
    assert r["ints"].dtype == np.int64 and r["ints"].tolist() == [1, 2, 3]
    assert r["floats"].dtype == np.float64 and r["floats"].tolist() == [0.5, 1.5]
    np.testing.assert_array_equal(r["with_none"], [1.0, np.nan, 3.0])
    np.testing.assert_array_equal(r["ints_with_none"], [1.0, np.nan])
    np.testing.assert_array_equal(r["grid"], [[1.0, 2.0], [3.0, 4.0]])
    np.testing.assert_array_equal(r["int_grid"], [[1, 2], [3, 4]])
    assert r["grid"].shape == (2, 2)
    assert r["tuple"].tolist() == [4.0, 5.0]
    assert r["bools"].dtype == bool and r["bools"].tolist() == [True, False, True]
    assert list(r["strs"]) == ["a", "bc"]
    assert r["empty"].shape == (0,)
    assert r["array"].dtype == np.int32 and r["array"].tolist() == [[0, 1, 2], [3, 4, 5]]
    np.testing.assert_array_equal(r["f64"], np.linspace(0, 1, 5))
    assert r["tensor"].dtype == np.float32 and r["tensor"].tolist() == [[0.0, 1.0], [2.0, 3.0]]
    np.testing.assert_array_equal(r["big"], RESULT["big"])
    assert r["nested"]["k"] == "x" and r["nested"]["deep"]["v"] == 3 and "gone" not in r["nested"]["deep"]
    assert r["nested"]["deep"]["arr"].tolist() == [1.0, 1.0]
    assert isinstance(r["rows"], list) and len(r["rows"]) == 12
    assert [row["step"] for row in r["rows"]] == list(range(12))
    assert r["rows"][5]["value"] == 2.5 and r["rows"][5]["eig"].tolist() == [5.0, 1.0]
    assert r["1"] == "int key"


def test_big_arrays_compressed(unit):
    path, _ = unit
    with h5py.File(path, "r") as f:
        assert f["result/big"].compression == "gzip"
        assert f["result/ints"].compression is None


def test_unstorable_lists_kept_as_json(tmp_path):
    p = store.write_unit(tmp_path / "u.h5", {"ragged": [[1, 2], [3]], "mixed": [1, "a"]}, {})
    with h5py.File(p, "r") as f:  # stored as JSON text, named in the group's JSON_KEYS ...
        assert json.loads(f["result"].attrs["ragged"]) == [[1, 2], [3]]
    r, _ = store.read_unit(p)  # ... and read back as lists
    assert r["ragged"] == [[1, 2], [3]] and r["mixed"] == [1, "a"]


def test_list_of_dicts_at_top_and_empty_dicts(tmp_path):
    p = store.write_unit(tmp_path / "u.h5", {"a": [{"x": 1}, {}], "b": {}}, {})
    r, _ = store.read_unit(p)
    assert r == {"a": [{"x": 1}, {}], "b": {}}


def test_meta_attrs(unit):
    path, meta = unit
    _, m = store.read_unit(path)
    assert "skip" not in m
    for k in ("sam_probe_version", "torch_version", "step", "seed", "wall_time", "checkpoint", "sha256", "device"):
        assert m[k] == meta[k]
    assert m["trusted"] is False or m["trusted"] == False  # noqa: E712 - numpy bool from HDF5
    # JSON-encoded structures come back parsed for the known keys ...
    for k in ("command", "config", "model_spec", "data_spec"):
        assert m[k] == meta[k]
    # ... and as JSON text otherwise
    assert json.loads(m["other"]) == {"a": 1}
    with h5py.File(path, "r") as f:
        assert f.attrs["step"] == 172 and f.attrs["sha256"] == "f" * 64


def test_meta_torch_version_object(tmp_path):
    """pipeline.unit_meta records ``torch.__version__`` itself, which is a ``str`` subclass."""
    p = store.write_unit(tmp_path / "u.h5", {"v": 1}, {"torch_version": torch.__version__})
    assert store.read_unit(p)[1]["torch_version"] == str(torch.__version__)


def test_result_str_subclass(tmp_path):
    class Name(str):
        pass

    p = store.write_unit(tmp_path / "u.h5", {"name": Name("sam"), "version": torch.__version__}, {})
    assert store.read_unit(p)[0] == {"name": "sam", "version": str(torch.__version__)}


def test_unit_path_and_config_key(tmp_path):
    p = store.unit_path(tmp_path, "trace", "my run", "a/b c?.pt", "k1")
    assert p == tmp_path / "trace" / "my run" / "a_b_c_.pt-k1.h5"
    k = store.config_key({"a": 1, "b": 2}, "x")
    assert k == store.config_key({"b": 2, "a": 1}, "x") and len(k) == 12 and int(k, 16) >= 0
    assert k != store.config_key({"a": 1, "b": 3}, "x")


# ------------------------------------------------------------------ exists
def test_exists(unit, tmp_path):
    path, _ = unit
    assert store.exists(path)
    assert not store.exists(tmp_path / "missing.h5")
    assert not store.exists(tmp_path)  # a directory
    data = path.read_bytes()
    for frac in (0.5, 0.05):
        cut = tmp_path / f"cut{frac}.h5"
        cut.write_bytes(data[: int(len(data) * frac)])
        assert not store.exists(cut)
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5 at all" * 10)
    assert not store.exists(junk)
    empty = tmp_path / "empty.h5"
    empty.write_bytes(b"")
    assert not store.exists(empty)
    noresult = tmp_path / "noresult.h5"
    with h5py.File(noresult, "w") as f:
        f.attrs["step"] = 1
    assert not store.exists(noresult)


# ------------------------------------------------------------------ atomic writes
def test_write_leaves_no_temp_files(tmp_path):
    d = tmp_path / "out" / "a" / "run"
    for i in range(3):
        store.write_unit(d / f"u{i}.h5", {"v": i}, {"step": i})
    store.write_unit(d / "u0.h5", {"v": 10}, {"step": 10})  # overwrite
    assert _files(d) == ["u0.h5", "u1.h5", "u2.h5"]
    assert _no_temp_files(tmp_path)
    assert store.read_unit(d / "u0.h5")[0] == {"v": 10}


def _crash_on_second_dataset(monkeypatch):
    real = h5py.Group.create_dataset
    calls = {"n": 0}

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("simulated crash while writing")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", flaky)
    return calls


def test_crash_mid_write_leaves_no_file(tmp_path, monkeypatch):
    path = tmp_path / "u.h5"
    calls = _crash_on_second_dataset(monkeypatch)
    with pytest.raises(OSError, match="simulated crash"):
        store.write_unit(path, {"a": [1.0, 2.0], "b": [3.0, 4.0], "c": [5.0]}, {"step": 1})
    assert calls["n"] == 2
    assert not path.exists() and not store.exists(path)
    assert list(tmp_path.iterdir()) == []  # the temporary file was removed too


def test_crash_mid_overwrite_keeps_previous_content(tmp_path, monkeypatch):
    path = tmp_path / "u.h5"
    store.write_unit(path, {"a": [1.0], "note": "old"}, {"step": 1})
    before = path.read_bytes()
    _crash_on_second_dataset(monkeypatch)
    with pytest.raises(OSError, match="simulated crash"):
        store.write_unit(path, {"a": [9.0], "b": [9.0], "note": "new"}, {"step": 2})
    assert path.read_bytes() == before
    res, meta = store.read_unit(path)
    assert res["note"] == "old" and res["a"].tolist() == [1.0] and meta["step"] == 1
    assert _files(tmp_path) == ["u.h5"]


def test_crash_at_fsync_keeps_previous_content(tmp_path, monkeypatch):
    path = tmp_path / "u.h5"
    store.write_unit(path, {"v": 1}, {})

    def boom(fd):
        raise OSError("disk full")

    monkeypatch.setattr(store.os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        store.write_unit(path, {"v": 2}, {})
    monkeypatch.undo()
    assert store.read_unit(path)[0] == {"v": 1}
    assert _files(tmp_path) == ["u.h5"]


def test_final_name_appears_only_by_rename(tmp_path, monkeypatch):
    """While the file is being written, nothing exists under the final name."""
    path = tmp_path / "u.h5"
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append((os.path.exists(dst), os.path.basename(str(src)).startswith("."), store.exists(src)))
        return real_replace(src, dst)

    monkeypatch.setattr(store.os, "replace", spy)
    store.write_unit(path, {"v": 1}, {})
    assert seen == [(False, True, True)]
    assert store.exists(path)


# ------------------------------------------------------------------ iterate and merge
def _populate(out):
    paths = []
    for run in ("run_a", "run_b"):
        for i in range(3):
            key = store.config_key(run, i)
            p = store.unit_path(out, "sharpness", run, f"step_{i}.pt", key)
            paths.append(store.write_unit(p, {"value": float(i), "curve": [1.0, float(i)], "rows": [{"i": i}]},
                                          {"step": i, "run": run, "config": {"rho": 0.05}}))
    p = store.unit_path(out, "trace", "run_a", "step_0.pt", "t0")
    paths.append(store.write_unit(p, {"trace": 12.5}, {"step": 0}))
    # things that are not units
    (out / "sharpness" / "run_a" / ".step_9.pt-x.h5.abc.tmp").write_bytes(b"partial")
    (out / "sharpness" / "run_a" / "corrupt.h5").write_bytes(b"junk")
    with h5py.File(out / "trace" / "noresult.h5", "w") as f:
        f.attrs["x"] = 1
    (out / "notes.txt").write_text("hi")
    return paths


def test_iter_units_on_dir(tmp_path):
    out = tmp_path / "out"
    paths = _populate(out)
    units = list(store.iter_units(out))
    assert [n for n, _, _ in units] == sorted(str(p.relative_to(out)) for p in paths)
    by_name = {n: (r, m) for n, r, m in units}
    r, m = by_name[str(paths[1].relative_to(out))]
    assert r["value"] == 1.0 and r["curve"].tolist() == [1.0, 1.0] and r["rows"] == [{"i": 1}]
    assert m["step"] == 1 and m["run"] == "run_a" and m["config"] == {"rho": 0.05}


def test_merge_and_iter_merged_file(tmp_path):
    out = tmp_path / "out"
    paths = _populate(out)
    target = tmp_path / "merged" / "all.h5"
    assert store.merge(out, target) == len(paths) == 7
    assert _no_temp_files(tmp_path / "merged")
    from_dir = {n[: -len(".h5")]: (r, m) for n, r, m in store.iter_units(out)}
    from_file = {n: (r, m) for n, r, m in store.iter_units(target)}
    assert set(from_file) == set(from_dir)
    for name, (r, m) in from_file.items():
        r0, m0 = from_dir[name]
        assert m == m0
        assert set(r) == set(r0)
        for k in r:
            if isinstance(r[k], np.ndarray):
                np.testing.assert_array_equal(r[k], r0[k])
            else:
                assert r[k] == r0[k]
    assert not store.exists(target)  # a merged file is not a unit itself


def test_merge_into_own_folder_and_remerge(tmp_path):
    out = tmp_path / "out"
    paths = _populate(out)
    target = out / "all.h5"
    assert store.merge(out, target) == len(paths)
    assert store.merge(out, target) == len(paths)  # the target itself is skipped
    assert len(list(store.iter_units(target))) == len(paths)
    assert len(list(store.iter_units(out))) == len(paths)  # all.h5 is not mistaken for a unit


def test_merge_empty_and_crash(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    target = tmp_path / "all.h5"
    assert store.merge(empty, target) == 0
    assert list(store.iter_units(target)) == []
    out = tmp_path / "out"
    _populate(out)
    assert store.merge(out, target) == 7
    before = target.read_bytes()

    def boom(*a, **k):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(h5py.Group, "copy", boom)
    with pytest.raises(RuntimeError):
        store.merge(out, target)
    monkeypatch.undo()
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["all.h5"]  # temp file removed


def test_merge_write_failure_is_not_swallowed(tmp_path, monkeypatch):
    out = tmp_path / "out"
    _populate(out)
    target = tmp_path / "all.h5"
    assert store.merge(out, target) == 7
    before = target.read_bytes()

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(h5py.Group, "copy", full)
    with pytest.raises(OSError):
        store.merge(out, target)
    monkeypatch.undo()
    assert target.read_bytes() == before


def test_names_with_slashes_percent_dots_and_undecodable_bytes_round_trip(tmp_path):
    from sam_probe.store import read_unit, write_unit

    weird = "ckpt_\udcff.pt"  # a non-UTF-8 file name as Python sees it
    result = {"path": weird, "per_tensor": {"a/b": [1.0], "50%": [2.0], ".hidden": [3.0], "plain.w": [4.0]},
              "names": [weird, "x"]}
    p = write_unit(tmp_path / "u.h5", result, {"checkpoint": weird})
    back, meta = read_unit(p)
    assert set(back["per_tensor"]) == {"a/b", "50%", ".hidden", "plain.w"}
    assert back["path"] == meta["checkpoint"] == "ckpt_\\xff.pt"


# ------------------------------------------------------------------ hostile results files
def _hostile(tmp_path, name, build):
    """A results folder holding one good unit and one crafted file built by ``build(f)``."""
    d = tmp_path / "res"
    store.write_unit(d / "good.h5", {"x": 1.0}, {"analysis": "sharpness"})
    with h5py.File(d / name, "w") as f:
        g = f.create_group("result")
        g.attrs["__kind__"] = "dict"
        build(f, g)
    skipped = []
    units = list(store.iter_units(d, on_skip=lambda n, why: skipped.append((n, why))))
    return [u[0] for u in units], skipped


def test_links_external_storage_and_cycles_are_refused(tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\x01" * 64)
    outside = tmp_path / "other.h5"
    with h5py.File(outside, "w") as o:
        o["data"] = np.arange(4.0)
    builds = {
        "ext_link.h5": lambda f, g: g.__setitem__("v", h5py.ExternalLink(str(outside), "/data")),
        "soft_cycle.h5": lambda f, g: g.__setitem__("loop", h5py.SoftLink("/result")),
        "ext_storage.h5": lambda f, g: g.create_dataset("v", shape=(64,), dtype="u1",
                                                       external=[(str(secret), 0, 64)]),
        "hard_cycle.h5": lambda f, g: g.create_group("a").__setitem__("up", g),
        "reference.h5": lambda f, g: g.create_dataset("v", data=np.array([g.ref], dtype=h5py.ref_dtype)),
        "compound.h5": lambda f, g: g.create_dataset("v", data=np.zeros(3, dtype=[("a", "i4"), ("b", "f8")])),
    }
    for name, build in builds.items():
        names, skipped = _hostile(tmp_path / name.split(".")[0], name, build)
        assert names == ["good.h5"], name
        assert len(skipped) == 1 and skipped[0][0] == name and skipped[0][1].startswith("refused"), (name, skipped)


def test_a_compression_bomb_is_refused_before_it_is_read(tmp_path):
    def bomb(f, g):  # 2 GB of zeros in a file of a few hundred KB (budget: 256 MiB)
        g.create_dataset("v", shape=(2 ** 31,), dtype="u1", chunks=(2 ** 22,), compression="gzip", fillvalue=0)

    names, skipped = _hostile(tmp_path, "bomb.h5", bomb)
    assert names == ["good.h5"] and "compression bomb" in skipped[0][1]


def test_deep_nesting_is_refused_and_a_merged_file_keeps_its_good_units(tmp_path):
    def deep(f, g):
        for _ in range(store.MAX_DEPTH + 5):
            g = g.create_group("d")
            g.attrs["__kind__"] = "dict"

    names, skipped = _hostile(tmp_path, "deep.h5", deep)
    assert names == ["good.h5"] and "nested" in skipped[0][1]
    merged = tmp_path / "merged.h5"
    with h5py.File(merged, "w") as f:
        for name, val in (("a", 1.0), ("b", 2.0)):
            u = f.create_group(name)
            u.attrs["analysis"] = "sharpness"
            r = u.create_group("result")
            r.attrs["__kind__"] = "dict"
            r.attrs["x"] = val
        f["b/result/link"] = h5py.SoftLink("/a")
    seen = []
    units = list(store.iter_units(merged, on_skip=lambda n, why: seen.append((n, why))))
    assert [u[0] for u in units] == ["a"] and seen[0][0] == "b" and seen[0][1].startswith("refused")


def test_a_refused_stored_unit_is_recomputed_and_overwritten(tiny_runs, tmp_path):
    from clitools import run_cli

    ck = tiny_runs["sgd"] / "step_000020.pt"
    args = ("sharpness", ck, "--top-k", "1", "--rho", "0", "--max-samples", "40", "--out", tmp_path, "--json")
    first = run_cli(*args).json()["results"][0]
    (unit,) = tmp_path.glob("sharpness/*/*.h5")
    with h5py.File(unit, "a") as f:  # an attacker swaps a value for a link into another file
        del f["result/eigenvalues"]
        f["result/eigenvalues"] = h5py.ExternalLink("/etc/hostname", "/x")
    again = run_cli(*args)
    assert again.code == 0, again.stderr
    assert again.json()["results"][0]["eigenvalues"] == first["eigenvalues"]
    store.read_unit(unit)  # overwritten with a clean unit


# ------------------------------------------------------------------ hostile results files, round 2 (issue 23)
def _good_units(d, names=("a", "b")):
    for n in names:
        store.write_unit(d / f"{n}.h5", {"x": 1.0, "curve": [1.0, 2.0]}, {"analysis": "sharpness", "config": {"k": 1}})


def test_vlen_strings_aliasing_one_heap_object_are_charged_each_time(tmp_path):
    """20,000 vlen strings pointing at one 8 MiB heap object (160 GiB when read) are refused after the unit's
    text budget, block by block, in a child whose address space is capped far below what they expand to."""
    from capped import run_capped

    d = tmp_path / "res"
    _good_units(d)
    bad = d / "alias.h5"
    n = 20_000
    with h5py.File(bad, "w") as f:
        g = f.create_group("result")
        g.attrs["__kind__"] = "dict"
        data = np.array(["x" * (8 << 20)] + ["y"] * (n - 1), dtype=object)
        ds = g.create_dataset("names", data=data, dtype=h5py.string_dtype())
        offset = ds.id.get_offset()
    with open(bad, "r+b") as fh:  # every element's heap reference := the first one's (16 bytes each)
        fh.seek(offset)
        first = fh.read(16)
        fh.seek(offset)
        fh.write(first * n)
    with h5py.File(bad, "r") as f:  # really aliased: two elements read back the same 8 MiB string
        assert len(f["result/names"][5]) == 8 << 20
    got = run_capped(r"""
from sam_probe import store
skipped = []
units = [u[0] for u in store.iter_units(ARGS["d"], on_skip=lambda n, why: skipped.append([n, why]))]
print(json.dumps({"units": units, "skipped": skipped}))
""", d=str(d), extra=2**30)
    assert got["units"] == ["a.h5", "b.h5"]
    assert got["skipped"][0][0] == "alias.h5" and "more text than a file of this size" in got["skipped"][0][1]


def test_attributes_are_budgeted_and_must_be_single_plain_values(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "MAX_ITEMS", 4096)  # (the real budget, 2**18 items, is charged the same way)
    builds = {
        "big_attr.h5": lambda g: g.attrs.create("v", np.zeros(100_000)),
        "compound_attr.h5": lambda g: g.attrs.create("v", np.zeros(2, dtype=[("a", "i4"), ("b", "f8")])),
        "string_array_attr.h5": lambda g: g.attrs.create("v", ["a"] * 10, dtype=h5py.string_dtype()),
        "many_attrs.h5": lambda g: [g.attrs.create(f"a{i}", i) for i in range(store.MAX_ITEMS + 1)],
    }
    for name, build in builds.items():
        d = tmp_path / name.split(".")[0]
        _good_units(d)
        with h5py.File(d / name, "w", libver="latest") as f:  # dense attribute storage: no 64 KiB limit
            g = f.create_group("result")
            g.attrs["__kind__"] = "dict"
            build(g)
        skipped = []
        names = [u[0] for u in store.iter_units(d, on_skip=lambda n, why: skipped.append((n, why)))]
        assert names == ["a.h5", "b.h5"], name
        assert skipped[0][0] == name and skipped[0][1].startswith("refused"), (name, skipped)


def test_a_fifo_named_like_a_unit_is_skipped_not_opened(tmp_path):
    import subprocess
    import sys

    d = tmp_path / "res"
    _good_units(d)
    os.mkfifo(d / "blocker.h5")
    os.mkfifo(tmp_path / "merged.h5")
    code = (f"from sam_probe import store; s=[]; u=[x[0] for x in store.iter_units({str(d)!r}, "
            "on_skip=lambda n, w: s.append((n, w)))]; print(u, s); "
            f"n = store.merge({str(d)!r}, {str(tmp_path / 'out.h5')!r}); print(n)\n"
            f"try:\n    list(store.iter_units({str(tmp_path / 'merged.h5')!r}))\nexcept OSError as e:\n    print('OSError', e)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "['a.h5', 'b.h5'] [('blocker.h5', 'not read: is a FIFO, not a regular file')]" in proc.stdout
    assert "\n2\n" in proc.stdout and "OSError is a FIFO" in proc.stdout


def test_crafted_structures_are_skipped_per_unit_with_the_reason(tmp_path):
    def result_dataset(f):
        f.create_dataset("result", data=np.zeros(3))

    def list_of_datasets(f):
        g = f.create_group("result")
        g.attrs["__kind__"] = "list"
        g.create_dataset("000000", data=np.zeros(2))

    def deep_json(f):
        g = f.create_group("result")
        g.attrs["__kind__"] = "dict"
        f.attrs["analysis"] = "sharpness"
        f.attrs["config"] = "[" * 950 + "]" * 950

    cases = {"result_dataset.h5": (result_dataset, "where a unit holds a group"),
             "list_of_datasets.h5": (list_of_datasets, "a list item that is not a group"),
             "deep_json.h5": (deep_json, "nests JSON")}
    for name, (build, why) in cases.items():
        d = tmp_path / name.split(".")[0]
        _good_units(d)
        with h5py.File(d / name, "w") as f:
            build(f)
        skipped = []
        names = [u[0] for u in store.iter_units(d, on_skip=lambda n, w: skipped.append((n, w)))]
        assert names == ["a.h5", "b.h5"], name
        assert skipped == [(name, skipped[0][1])] and why in skipped[0][1], (name, skipped)


def test_a_results_folder_1100_deep_is_walked_without_recursion(tmp_path):
    d = tmp_path / "res"
    _good_units(d, ("a",))
    deep = str(d)
    for _ in range(1100):  # os.makedirs / Path.mkdir(parents=True) recurse: one level at a time
        deep += "/d"
        os.mkdir(deep)
    try:
        store.write_unit(Path(deep) / "z.h5", {"x": 2.0}, {"analysis": "sharpness"})
        names = [u[0] for u in store.iter_units(d)]
        assert names[0] == "a.h5" and names[1].endswith("/d/z.h5") and names[1].count("/") == 1100
        assert store.merge(d, tmp_path / "all.h5") == 2
    finally:  # shutil.rmtree (pytest's clean-up) recurses: take the tower down one level at a time
        while deep != str(d):
            for e in os.listdir(deep):
                os.unlink(os.path.join(deep, e))
            os.rmdir(deep)
            deep = os.path.dirname(deep)


def test_in_a_merged_file_each_unit_has_its_own_budget(tmp_path):
    merged = tmp_path / "merged.h5"
    with h5py.File(merged, "w") as f:
        for name in ("a_bomb", "b", "c"):
            u = f.create_group(name)
            u.attrs["analysis"] = "sharpness"
            r = u.create_group("result")
            r.attrs["__kind__"] = "dict"
            r.attrs["x"] = 1.0
            if name == "a_bomb":
                r.create_dataset("v", shape=(2**31,), dtype="u1", chunks=(2**22,), compression="gzip", fillvalue=0)
    skipped = []
    units = [u[0] for u in store.iter_units(merged, on_skip=lambda n, w: skipped.append((n, w)))]
    assert units == ["b", "c"]  # the bomb first, the good units after it are still reported
    assert skipped[0][0] == "a_bomb" and "/a_bomb/result/v" in skipped[0][1]


def test_merge_copies_only_what_the_hardened_reader_accepts(tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\x01" * 64)
    d = tmp_path / "res"
    _good_units(d)
    crafted = {
        "ext_storage.h5": lambda g: g.create_dataset("v", shape=(64,), dtype="u1", external=[(str(secret), 0, 64)]),
        "ext_link.h5": lambda g: g.__setitem__("v", h5py.ExternalLink(str(d / "a.h5"), "/result")),
        "compound.h5": lambda g: g.create_dataset("v", data=np.zeros(3, dtype=[("a", "i4"), ("b", "f8")])),
        "vds.h5": lambda g: g.create_virtual_dataset("v", h5py.VirtualLayout(shape=(4,), dtype="f8")),
    }
    for name, build in crafted.items():
        with h5py.File(d / name, "w") as f:
            f.attrs["analysis"] = "sharpness"
            g = f.create_group("result")
            g.attrs["__kind__"] = "dict"
            build(g)
    skipped = []
    assert store.merge(d, tmp_path / "all.h5", lambda p, why: skipped.append((p.name, why))) == 2
    assert sorted(n for n, _ in skipped) == sorted(crafted) and all(w.startswith("refused") for _, w in skipped)
    with h5py.File(tmp_path / "all.h5") as f:
        assert sorted(f.keys()) == ["a", "b"]


def test_big_integers_long_names_and_undecodable_run_names_are_storable(tmp_path):
    p = store.write_unit(tmp_path / "u.h5", {"step": 2**70, "hp": {"seed": -(2**80)}, "ids": [1, 2**65]},
                         {"step": 2**64})
    back, meta = store.read_unit(p)
    assert back["step"] == str(2**70) and back["hp"]["seed"] == str(-(2**80)) and meta["step"] == str(2**64)
    unit = store.unit_path(tmp_path, "sharpness", "r" * 250, "c" * 250 + ".pt", "0123456789ab")
    assert all(len(part.encode()) <= store.MAX_NAME_BYTES + 20 for part in unit.parts[-2:])
    assert unit != store.unit_path(tmp_path, "sharpness", "r" * 250, "c" * 249 + "d.pt", "0123456789ab")
    store.write_unit(unit, {"x": 1.0}, {"analysis": "sharpness"})
    assert store.exists(unit)
    weird = tmp_path / "res" / "sharpness" / "run_\udcff"
    store.write_unit(weird / "a.h5", {"x": 1.0}, {"analysis": "sharpness"})
    assert store.merge(tmp_path / "res", tmp_path / "all.h5") == 1
    assert [n for n, _, _ in store.iter_units(tmp_path / "all.h5")] == ["sharpness/run_\\xff/a"]


def test_a_value_hdf5_cannot_hold_is_one_line_and_keeps_the_result(tmp_path):
    class Odd:
        pass

    with pytest.raises(store.UnstorableResult) as ei:
        store.write_unit(tmp_path / "u.h5", {"x": np.array([Odd()], dtype=object)}, {})
    line = store.describe_write_error(tmp_path / "u.h5", tmp_path, ei.value)
    assert "\n" not in line and "computed but not stored" in line
    assert not (tmp_path / "u.h5").exists()
