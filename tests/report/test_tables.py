"""Every view's tables rendered by rich at 80 columns (a small tmux pane): no cell is ever cut."""
from __future__ import annotations

import io

import pytest
from rich.console import Console

import report_synth as syn
from sam_probe.report import (alignment, console, distance, features, figures, interpolate, overlap, ratios, sharpness,
                              subspace, tables)
from sam_probe.report.tables import Table


def sharp_results():
    rs = syn.sharpness() + syn.sharpness("/runs/digits-cnn-sgd-with-a-longer-name", syn.CNN, 4258, switch=None,
                                         scale=10.0)
    for r in rs:
        r.update(worst_case_sharpness=2.5 * r["sam_sharpness"], average_case_sharpness=0.3 * r["sam_sharpness"],
                 average_case_se=1.234567e-5)
    return rs


def every_table() -> list[Table]:
    with figures.palette_session():
        per_layer = syn.ratios()
        for r in per_layer:
            r["per_layer"] = [{"name": "transformer.h.0.attn.c_attn.weight", "n": 100,
                               "counts": {"C1": 50, "C2": 30, "C3": 10, "C4": 10}}]
        return (sharpness.tables_of(sharp_results())
                + ratios.tables_of(per_layer + syn.ratios("/runs/mlp-sgd"), bucket=True, per_layer=True)
                + overlap.tables_of(syn.overlap(n=5)) + alignment.tables_of(syn.alignment())
                + distance.tables_of(syn.distance()) + interpolate.tables_of(syn.interpolate())
                + features.tables_of(syn.features()) + subspace.tables_of(syn.subspace()))


def rendered(t: Table, width: int) -> str:
    c = Console(width=width, file=io.StringIO(), record=True, color_system=None)
    for part in tables.fit(t, width):
        c.print(part)
    return c.export_text()


@pytest.mark.parametrize("width", [80, 60])
def test_no_cell_is_cut_at_narrow_widths(width):
    seen = 0
    for t in every_table():
        text = rendered(t, width)
        assert "…" not in text, (t.title, text)
        assert max(len(line) for line in text.splitlines()) <= width
        for row in t.rows:
            for col, v in zip(t.columns, row):
                cell = console.fmt(v)
                if col in tables.LABEL_COLUMNS and cell not in text:
                    legend = " ".join(text[text.index(f"\n{col}: "):].split())
                    assert f"= {' '.join(cell.split())}" in legend, (t.title, col, cell)  # a key and its legend
                else:
                    assert cell in text, (t.title, col, cell)
                seen += 1
    assert seen > 500


def test_wide_tables_fold_into_continuations_that_repeat_run_and_step():
    t = sharpness.tables_of(sharp_results())[0]
    text = rendered(t, 80)
    assert "(continued)" in text
    assert text.count("┃ run ") >= 2 and text.count(" step ┃") >= 2
    assert "run: R1 = mlp-late-sam, R2 = digits-cnn-sgd-with-a-longer-name" in text
    header = [ln for ln in text.splitlines() if "average" in ln]
    assert header and any("± SE" in ln for ln in text.splitlines())  # the SE stays beside its value
    wide = rendered(t, 250)
    assert "(continued)" not in wide and "mlp-late-sam" in wide and "R1 =" not in wide


def test_a_width_no_table_fits_prints_records():
    t = alignment.tables_of(syn.alignment())[0]
    text = rendered(t, 24)
    assert "…" not in text and "  χ full: 0.5" in text


def test_piped_output_honours_COLUMNS(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    assert console.out_width() == 80
    monkeypatch.delenv("COLUMNS")
    assert console.out_width() == console.PIPED_WIDTH


def test_sharpness_columns_name_the_end_of_the_spectrum_and_every_residual():
    rs = syn.sharpness(steps=[0])
    t = sharpness.tables_of(rs)[0]
    assert [c for c in t.columns if c.startswith("λ")] == ["λ1", "λ2", "λ3"]
    assert ["resid λ1", "resid λ2", "resid λ3"] == [c for c in t.columns if c.startswith("resid")]
    assert t.rows[0][t.columns.index("resid λ3")] == "5e-04"
    rs[0]["_meta"]["config"] = {**rs[0]["_meta"]["config"], "which": "SA"}
    t = sharpness.tables_of(rs)[0]
    assert [c for c in t.columns if c.startswith("λ")] == ["λ(P−2)", "λ(P−1)", "λ(P)"]
    assert any("smallest" in n for n in t.notes)
