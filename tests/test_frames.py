"""``sp.load_results``: a store written by the CLI as a DataFrame whose values are those ``--json`` printed."""
from __future__ import annotations

import io
import math
import sys
import warnings

import pytest

from clitools import run_cli

pd = pytest.importorskip("pandas")

import sam_probe as sp  # noqa: E402
from sam_probe.errors import SpecError  # noqa: E402
from sam_probe.frames import columns, singular  # noqa: E402

COMMON = ["--max-samples", "60", "--quiet", "--no-plot", "--json"]
LISTS = {"eigenvalues": "eigenvalue", "residuals": "residual", "converged": "converged"}


@pytest.fixture(scope="module")
def stored(tiny_runs, tmp_path_factory):
    """A store of sharpness (both runs) and ratios (the SAM run), and what ``--json`` printed."""
    out = tmp_path_factory.mktemp("frames")
    printed = {}
    for args in (["sharpness", tiny_runs["sgd"], tiny_runs["sam"], "--top-k", "2"], ["ratios", tiny_runs["sam"]]):
        res = run_cli(*args, *COMMON, "--out", out)
        assert res.code == 0, res.stderr
        printed[args[0]] = res.json()["results"]
    return out, printed


def expected_cells(result: dict, prefix: str = ""):
    """``(column, value)`` of a printed result, written out independently of sam_probe.frames."""
    for k, v in result.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from expected_cells(v, f"{name}.")
        elif isinstance(v, list):
            if k in LISTS:
                for i, x in enumerate(v, 1):
                    yield f"{LISTS[k]}_{i}", x
        else:
            yield name, v


def same(a, b) -> bool:
    if b is None:
        return a is None or (isinstance(a, float) and math.isnan(a))
    return a == b and (not isinstance(b, float) or isinstance(a, float))


def test_every_row_equals_the_json_output(stored):
    out, printed = stored
    df = sp.load_results(out)
    assert list(df.columns[:4]) == ["analysis", "run", "step", "path"]
    assert len(df) == sum(len(rs) for rs in printed.values()) == 6 + 3
    assert df.attrs["skipped"] == []
    assert "ratios:per_layer" in df.attrs["left_out"] and "codes" not in " ".join(df.columns)
    for analysis, results in printed.items():
        for r in results:
            rows = df[(df.analysis == analysis) & (df.path == r["path"])]
            assert len(rows) == 1, (analysis, r["path"])
            row = rows.iloc[0]
            checked = 0
            for col, v in expected_cells(r):
                if v is None and col not in df.columns:
                    continue  # a null the store does not keep
                assert same(row[col], v), (analysis, col, row[col], v)
                checked += 1
            assert checked > 20
    sharp = df[df.analysis == "sharpness"]
    assert {"eigenvalue_1", "eigenvalue_2", "residual_2", "settings.top_k"} <= set(df.columns)
    assert "eigenvalue_3" not in df.columns and (sharp["settings.top_k"] == 2).all()
    assert sorted(set(sharp.run)) == ["tiny-sam", "tiny-sgd"] and list(sharp.step[:3]) == [0, 10, 20]
    assert (sharp.eigenvalue_1 >= sharp.eigenvalue_2).all()


def test_settings_columns_are_those_of_the_report_csv(stored):
    out, _ = stored
    res = run_cli("report", out, "--format", "csv", "--no-plot", "-a", "ratios")
    assert res.code == 0, res.stderr
    csv = pd.read_csv(io.StringIO(res.stdout.split("\n", 1)[1]))
    df = sp.load_results(out, "ratios")
    assert set(df.analysis) == {"ratios"} and len(df) == 3
    want = [c for c in csv.columns if c.startswith("settings.")]
    assert want and [c for c in df.columns if c.startswith("settings.")] == want
    assert list(df["settings.rho"]) == list(csv["settings.rho"])


def test_merged_file_filters_and_errors(stored, tmp_path):
    out, printed = stored
    merged = tmp_path / "all.h5"
    assert run_cli("merge", out, "-o", merged).code == 0
    df = sp.load_results(merged, ["sharpness"])
    assert len(df) == 6
    pd.testing.assert_frame_equal(df.drop(columns="unit"), sp.load_results(out, "sharpness").drop(columns="unit"))
    with pytest.raises(SpecError, match="did you mean 'sharpness'"):
        sp.load_results(out, "sharpnes")
    with pytest.raises(SpecError, match="no such results"):
        sp.load_results(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "junk.h5").write_bytes(b"not hdf5")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        df = sp.load_results(empty)
    assert len(df) == 0 and list(df.columns) == ["analysis", "run", "step", "path", "run_dir", "unit"]
    assert df.attrs["skipped"][0][0] == "junk.h5" and "skipped" in str(caught[0].message)


def test_without_pandas_the_message_says_what_to_install(stored, monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match=r"pip install pandas"):
        sp.load_results(stored[0])


def test_column_names():
    assert [singular(n) for n in ("eigenvalues", "categories", "converged", "loss", "previous", "basis", "s")] == \
        ["eigenvalue", "category", "converged", "loss", "previous", "basis", "s"]
    row, left = columns({"eigenvalues": [3.0, 1.0], "solver": {"steps": [1, 2]}, "per_layer": [{"a": 1}],
                         "grid": [[1, 2]], "long": list(range(5)), "empty": [], "x": None}, max_list=4)
    assert row == {"eigenvalue_1": 3.0, "eigenvalue_2": 1.0, "solver.step_1": 1, "solver.step_2": 2, "x": None}
    assert left == {"per_layer", "grid", "long"}


def test_reused_results_read_back_as_the_computed_lists(tiny_runs, tmp_path, monkeypatch):
    import sam_probe.pipeline as pipeline

    ckpt = tiny_runs["sgd"] / "step_000010.pt"
    kw = dict(top_k=2, max_samples=60, out=tmp_path, store=True)
    first = sp.analyze("sharpness", ckpt, **kw)["results"][0]
    monkeypatch.setattr(pipeline.Session, "objective", lambda *a, **k: pytest.fail("recomputed, not reused"))
    again = sp.analyze("sharpness", ckpt, **kw)["results"][0]
    assert without_nulls(again) == without_nulls(first)  # nulls in free dicts (hparams) are not stored
    assert isinstance(again["eigenvalues"], list) and isinstance(again["converged"][0], bool)


def without_nulls(obj):
    if isinstance(obj, dict):
        return {k: without_nulls(v) for k, v in obj.items() if v is not None}
    return [without_nulls(v) for v in obj] if isinstance(obj, list) else obj


def test_pandas_is_imported_only_when_called():
    import subprocess

    code = "import sys, sam_probe as sp; sp.load_results; print('pandas' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
