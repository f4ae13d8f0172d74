"""The λ1 panel draws 2/η and SAM's edge only where the axis reaches half-way to them, and its legend
names only what is drawn (an edge far above the data is named as such, not drawn)."""
from sam_probe.report.sharpness import panels


def _results(edge: float, sam: float | None = None) -> list[dict]:
    return [{"path": f"run/step_{s}.pt", "run": "run", "run_dir": "run", "step": s, "eigenvalues": [3.0 - s / 10],
             "lambda_edge": edge, "sam_edge": None if sam is None else {"lambda_edge": sam}} for s in (0, 1, 2)]


def _legend(results: list[dict]) -> tuple[list[str], list[str]]:
    ps, extra = panels(results)
    lines = [s.label for s in ps[0].series(results)]
    return lines, [text for _, text in extra]


def test_an_edge_far_above_the_data_is_named_not_drawn():
    lines, legend = _legend(_results(20.0))
    assert "_2/eta" not in lines and "2/η: edge of stability" not in legend
    assert legend == ["2/η above the axis: 20"]


def test_edges_within_reach_are_drawn_with_their_legend_entries():
    lines, legend = _legend(_results(4.0, sam=3.5))
    assert "_2/eta" in lines and "_sam_edge" in lines
    assert legend == ["2/η: edge of stability", "SAM edge"]
