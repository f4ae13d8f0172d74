"""Collecting results for ``report`` from hostile files: no expansion of crafted arrays, no terminal escapes,
names that are not UTF-8 (issue 23 #2, #7, #8)."""
from __future__ import annotations

import h5py
import numpy as np

from capped import run_capped
from clitools import run_cli
from sam_probe import store
from sam_probe.report import collect


def _unit(path, result, **meta):
    return store.write_unit(path, result, {"analysis": "sharpness", "analysis_version": 1, "step": 1,
                                           "config": {"top_k": 1}, **meta})


def test_a_small_gzip_array_of_200_mib_is_skipped_not_expanded(tmp_path):
    d = tmp_path / "res"
    _unit(d / "good.h5", {"path": "good.pt", "step": 1, "eigenvalues": [1.0], "n_params": 3})
    with h5py.File(d / "zeros.h5", "w") as f:  # a few KB declaring 200 MiB (within the byte budget)
        f.attrs["analysis"] = "sharpness"
        g = f.create_group("result")
        g.attrs["__kind__"] = "dict"
        g.create_dataset("eigenvalues", shape=(25 * 2**20,), dtype="f8", chunks=(2**20,), compression="gzip",
                         fillvalue=0.0)
    assert (d / "zeros.h5").stat().st_size < 2**20
    got = run_capped(r"""
import contextlib, io
from sam_probe.cli import main
out, err = io.StringIO(), io.StringIO()
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
        main(["report", ARGS["d"], "-f", "json", "--no-plot"])
    except SystemExit as exc:
        code = exc.code
print(json.dumps({"code": code, "out": out.getvalue()[:20000], "err": err.getvalue()[-2000:]}))
""", d=str(d), extra=3 * 2**29)
    assert got["code"] == 0, got["err"]
    payload = __import__("json").loads(got["out"])
    assert [r["path"] for r in payload["analyses"]["sharpness"]] == ["good.pt"]
    (skip,) = payload["skipped"]
    assert skip["file"] == "zeros.h5" and "26,214,400 values" in skip["reason"]


def test_terminal_escapes_from_a_results_file_never_reach_the_output(tmp_path):
    d = tmp_path / "res"
    osc_title, osc_link, csi = "\x1b]0;pwned\x07", "\x1b]8;;http://x\x1b\\click\x1b]8;;\x1b\\", "\x9b31m"
    _unit(d / "u.h5", {"path": f"ck{csi}.pt", "step": 1, "eigenvalues": [1.0], "note": osc_title},
          config={"top_k": 1, "label": osc_title}, data_spec={"data": osc_link})
    coll = collect.collect(d)
    (r,) = coll.analyses["sharpness"]
    assert "\x1b" not in repr(r).replace("\\x1b", "") and r["note"] == "?]0;pwned?"
    for fmt in ("table", "csv", "json"):
        res = run_cli("report", d, "-f", fmt, "--no-plot")
        assert res.code == 0, res.stderr
        assert "\x1b" not in res.stdout and "\x9b" not in res.stdout and "\x07" not in res.stdout, fmt


def test_undecodable_run_names_reach_html_as_escapes(tmp_path):
    d = tmp_path / "res"
    _unit(d / "sharpness" / "run_\udcff" / "u.h5", {"path": "run_\udcff/u.pt", "step": 1, "eigenvalues": [1.0]})
    res = run_cli("report", d, "--no-plot", "--html", tmp_path / "page.html")
    assert res.code == 0, res.stderr
    page = (tmp_path / "page.html").read_text()  # valid UTF-8: the surrogate never reaches it
    assert "run__xff" in page  # the run's label, made of safe characters from the escape
    assert "run_/xff" not in page  # the escape's backslash is not a path separator


def test_shown_values_counts_arrays_outside_packed_ones():
    r = {"codes": np.zeros(10**6, dtype=np.uint8), "curve": np.zeros(5), "rows": [{"v": np.zeros(7)}]}
    assert collect.shown_values(r) == 12
