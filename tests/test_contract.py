"""The result contract of every registered analysis: what ``compute`` returns is declared.

Each analysis runs on a tiny real run (every optional part switched on, cheaply) and
every key of every result must be declared: its ``schema``, or the keys the unit runner
and the command add for its target (:func:`sam_probe.analyses.base.declared_keys`).
The JSON keys written in its README command-table row and in its ``--help`` JSON line
must be declared too, and every analysis must have a README row.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, TypedDict

import pytest

from sam_probe import analyses
from sam_probe.analyses.base import PAIR, declared_keys

ROOT = Path(__file__).resolve().parents[1]

# cheap settings that switch optional parts on ({other} is the second tiny run; _one: the last
# checkpoint alone); an analysis not listed runs once with its defaults
CASES: dict[str, list[dict]] = {
    "sharpness": [dict(top_k=1, trace=True, trace_max_hvp=6, trace_tol=0.5, density=True, density_steps=4,
                       density_probes=1, per_layer="module", worst_case=True, ascent_steps=1, average_case=True,
                       samples=2, adaptive=True, m=20, _one=True),
                  dict(top_k=1, curvature="fisher", mc_samples=2, trace=True, trace_max_hvp=6, trace_tol=0.5,
                       rho=0.0, cold_check=True)],
    "ratios": [dict(faithful=True, minibatch=8)],
    "overlap": [dict(control="{other}")],
    "alignment": [dict(k=1, eta_grid="0.1,1", variant="usam", minibatch_size=8)],
    "subspace": [dict(k=1)],
    "distance": [dict(eigen_k=1, same_step="{other}")],
    "interpolate": [dict(points=3)],
    "landscape": [dict(grid=3), dict(grid=3, directions="top-eigen", tol=0.5, _one=True)],
}
RUNS_OF = [(name, i) for name in analyses.names() for i in range(len(CASES.get(name, [{}])))]


def _run(name: str, runs: dict[str, Path], case: int = 0):
    from sam_probe.pipeline.session import Session
    from sam_probe.pipeline.units import run_analysis
    from sam_probe.settings import Settings

    analysis = analyses.get(name)
    run, other = runs["sam"], runs["sgd"]
    opts = {o.name: o.default for o in analysis.compute_options()}
    given = dict(CASES.get(name, [{}])[case])
    one = given.pop("_one", False)  # the last checkpoint alone (the run's warm starts are another case's)
    opts.update({k: v.format(other=other) if isinstance(v, str) else v for k, v in given.items()})
    settings = Settings(store=False, max_samples=40, dtype="float64")
    cfg = analysis.impl.configure(opts, settings)
    targets = sorted(run.glob("*.pt"))[::2] if analysis.target == PAIR else [sorted(run.glob("*.pt"))[-1] if one else run]
    outcomes = run_analysis(Session(settings, command=["test"]), analysis, targets, cfg)
    return analysis, outcomes


def test_cases_name_registered_analyses():
    assert set(CASES) <= set(analyses.names())


@pytest.mark.parametrize("name,case", RUNS_OF)
def test_returned_keys_are_declared(name, case, tiny_runs):
    from sam_probe.commands.runner import payload_of

    analysis, outcomes = _run(name, tiny_runs, case)
    assert outcomes and all(o.status == "ok" for o in outcomes), [o.error for o in outcomes]
    declared = declared_keys(analysis)
    for o in outcomes:
        undeclared = sorted(set(o.result) - set(declared))
        assert not undeclared, f"{name} returns undeclared keys {undeclared}: add them to its schema"
    payload, shown = payload_of(analysis, outcomes, 1)
    for r in shown:  # the JSON printed: with the command's keys
        assert set(r) <= set(declared)
    assert all(isinstance(v, str) and v for v in analysis.schema.values())


# ----------------------------------------------------------------- the written contract
def top_level_keys(text: str) -> list[str]:
    """The top-level keys of a JSON sketch such as ``results[{path, dL{dom, bulk}, per_layer[{name}]}]``
    or ``{steps, k, anchor{step}} ({runs: [...]} for several runs)``: those of one result."""
    text = text.strip()
    m = re.match(r"results\[\{", text)
    start = m.end() if m else (1 if text.startswith("{") else None)
    assert start is not None, f"not a JSON sketch: {text!r}"
    depth, items, cur = 0, [], ""
    for ch in text[start:]:
        if ch in "{[(":
            depth += 1
        elif ch in "}])":
            if depth == 0:
                break
            depth -= 1
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    items.append(cur)
    keys = [re.match(r"\s*([A-Za-z_][A-Za-z0-9_]*)", it) for it in items]
    return [k.group(1) for k in keys if k]


def readme_rows() -> dict[str, str]:
    """``{command: JSON cell}`` of the README command table."""
    rows = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        m = re.match(r"\| `sam-probe ([a-z-]+)[ `]", line)
        if m:
            cells = re.split(r"(?<!\\)\|", line)
            rows[m.group(1)] = cells[-2].strip()
    return rows


def test_top_level_keys_parser():
    assert top_level_keys("results[{path, dL{dom, bulk}, per_layer[{name, n}], seconds}]") == \
        ["path", "dL", "per_layer", "seconds"]
    assert top_level_keys("{steps, anchor{step, lift}, nulls} ({runs: [...]} for several runs)") == \
        ["steps", "anchor", "nulls"]


@pytest.mark.parametrize("name", analyses.names())
def test_readme_row_and_help_json_are_declared(name):
    analysis = analyses.get(name)
    rows = readme_rows()
    assert name in rows, f"README command table: add a row for `sam-probe {name}`"
    cell = re.match(r"`([^`]*)`", rows[name])
    assert cell, f"README row of {name}: give its JSON in backticks"
    declared = declared_keys(analysis)
    for where, text in (("README row", cell.group(1)), ("--help JSON", analysis.json)):
        keys = top_level_keys(text)
        assert keys, f"{name}: {where} names no keys"
        undeclared = [k for k in keys if k not in declared]
        assert not undeclared, f"{name}: {where} names undeclared keys {undeclared}"


@pytest.mark.parametrize("name", analyses.names())
def test_typed_analyses_derive_schema_json_and_readme_row_from_their_result(name):
    """An analysis with a ``Result`` ``TypedDict`` (the pattern new analyses follow): its schema and
    JSON line are derived from it, and the README row is exactly that JSON line."""
    from sam_probe.analyses.base import json_of, schema_of

    analysis = analyses.get(name)
    result_type = getattr(analysis.impl, "Result", None)
    if result_type is None:
        pytest.skip(f"{name} has no typed Result yet")
    assert analysis.schema == schema_of(result_type)
    assert analysis.json == json_of(result_type, analysis.target)
    assert readme_rows()[name] == f"`{analysis.json}`"
    config_type = getattr(analysis.impl, "Config", None)
    assert config_type is not None and config_type.__dataclass_params__.frozen, f"{name}: a frozen Config dataclass"


class _Inner(TypedDict):
    a: int
    b: float


class _Outer(TypedDict):
    x: Annotated[float, "x"]
    parts: Annotated[list[_Inner], "parts"]
    one: Annotated[_Inner, "one"]


def test_json_of_spells_nested_results():
    from sam_probe.analyses.base import CHECKPOINTS, RUNS, json_of, schema_of

    assert json_of(_Outer, CHECKPOINTS) == "results[{path, step, x, parts[{a, b}], one{a, b}, seconds}]"
    assert json_of(_Outer, RUNS) == "{x, parts[{a, b}], one{a, b}} ({runs: [...]} for several runs)"
    assert json_of(_Outer, PAIR) == "{x, parts[{a, b}], one{a, b}}"
    assert schema_of(_Outer) == {"x": "x", "parts": "parts", "one": "one"}
    assert top_level_keys(json_of(_Outer, RUNS)) == ["x", "parts", "one"]
