"""Tables as data: each view builds :class:`Table` objects once; the terminal (rich) and HTML render them.

On the terminal a table is fitted to the width (``COLUMNS``, 80 in a small pane) and never
cuts a cell: headers wrap at spaces; long labels (runs, layers, files) become short keys
(``R1``, ``R2``) with a legend under the table; columns that still do not fit go into a
continuation table that repeats the row keys (run, step); a width too narrow even for that
prints one record per row.  Numbers keep their digits.
"""
from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any

from rich.cells import cell_len

from . import console


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[Any]]
    notes: list[str] = field(default_factory=list)  # lines printed under the table (settings, rates, ...)


LABEL_COLUMNS = ("run", "path", "file", "name", "layer", "module", "tensor", "analysis", "status", "reason")
KEY_COLUMNS = ("run", "path", "file", "step", "epoch", "step/epoch", "layer", "module", "tensor")
LONG_LABEL = 12  # labels longer than this become legend keys when a table does not fit
BORDERS = 3  # rich's default box: one space each side of a cell and one rule between cells


def show(tables: list[Table], width: int | None = None) -> None:
    """Print tables (and their notes) on stdout, each fitted to the terminal width."""
    w = width or console.out_width()
    for t in tables:
        for part in fit(t, w):
            console.out.print(part, width=w)


def fit(t: Table, width: int) -> list[Any]:
    """The renderables of ``t`` at ``width`` columns: tables (folded where needed) and note lines."""
    cells = [[console.fmt(v) for v in row] for row in t.rows]
    cols = list(t.columns)
    legend: list[str] = []
    if table_width(cols, cells) > width:
        cells, legend = _short_labels(cols, cells, width)
    parts = []
    for i, (c, body) in enumerate(_fold(cols, cells, width)):
        title = t.title if i == 0 else f"{t.title} (continued)"
        if c is None:  # too narrow for a table: one record per row
            parts += _records(title, cols, cells)
            break
        parts.append(_rich_table(title, c, body, width))
    for line in legend + list(t.notes):
        parts.append(_text(line))
    return parts


def _text(line: str) -> Any:
    from rich.text import Text

    return Text(console.plain(line))


def _widths(cols: list[str], cells: list[list[str]]) -> tuple[list[int], list[int]]:
    """Per column: the narrowest width that cuts nothing (longest cell or header word) and the natural one."""
    lo, hi = [], []
    for j, c in enumerate(cols):
        body = max((cell_len(r[j]) for r in cells), default=0)
        words = max((cell_len(w) for w in c.split()), default=0)
        lo.append(max(body, words, 1))
        hi.append(max(body, cell_len(c), 1))
    return lo, hi


def table_width(cols: list[str], cells: list[list[str]], natural: bool = False) -> int:
    lo, hi = _widths(cols, cells)
    return sum(hi if natural else lo) + BORDERS * len(cols) + 1


def _short_labels(cols: list[str], cells: list[list[str]], width: int) -> tuple[list[list[str]], list[str]]:
    """Long label cells replaced by keys (``R1``: first run, ``L3``: third layer) and the legend lines
    (entries packed into lines of ``width``, never split between two lines where they fit one)."""
    cells = [list(r) for r in cells]
    legend = []
    for j, c in enumerate(cols):
        if c not in LABEL_COLUMNS or max((cell_len(r[j]) for r in cells), default=0) <= LONG_LABEL:
            continue
        prefix = "R" if c == "run" else c[0].upper()
        keys: dict[str, str] = {}
        for r in cells:
            keys.setdefault(r[j], f"{prefix}{len(keys) + 1}")
            r[j] = keys[r[j]]
        line = f"{c}:"
        for v, k in keys.items():
            entry = f" {k} = {v}"
            if cell_len(line) + cell_len(entry) + 1 > width and line != f"{c}:":
                legend.append(line + ",")
                line = " " * len(c) + " "
                entry = entry[1:]
            line += ("," if not line.endswith((":", " ")) else "") + entry
        legend.append(line)
    return cells, legend


def _fold(cols: list[str], cells: list[list[str]], width: int) -> list[tuple[list[str] | None, list[list[str]]]]:
    """Column groups that each fit ``width``, every group led by the key columns (run, step, ...)."""
    nkey = 0
    while nkey < len(cols) and cols[nkey] in KEY_COLUMNS:
        nkey += 1
    lo, _ = _widths(cols, cells)
    base = sum(lo[:nkey]) + BORDERS * nkey + 1
    if table_width(cols, cells) <= width:
        return [(cols, cells)]
    units: list[list[int]] = []  # a "± SE" column stays beside the value it qualifies
    for j in range(nkey, len(cols)):
        if units and cols[j].startswith("±"):
            units[-1].append(j)
        else:
            units.append([j])
    groups: list[list[int]] = []
    for u in units:
        need = sum(lo[i] + BORDERS for i in u)
        if base + need > width:
            return [(None, cells)]
        if groups and base + sum(lo[i] + BORDERS for i in groups[-1]) + need <= width:
            groups[-1].extend(u)
        else:
            groups.append(list(u))
    keep = list(range(nkey))
    return [([cols[i] for i in keep + g], [[r[i] for i in keep + g] for r in cells]) for g in groups]


def _rich_table(title: str, cols: list[str], cells: list[list[str]], width: int) -> Any:
    """A rich table whose columns get at least their uncut width (headers wrap at spaces when short of room)."""
    from rich.table import Table as RichTable
    from rich.text import Text

    lo, hi = _widths(cols, cells)
    room = width - (BORDERS * len(cols) + 1)
    widths = None
    if sum(hi) > room:  # give the spare room to wrapped headers, left to right
        widths, spare = list(lo), room - sum(lo)
        for j in range(len(cols)):
            add = min(spare, hi[j] - lo[j])
            widths[j] += add
            spare -= add
    t = RichTable(title=Text(console.plain(title)), title_justify="left", header_style="bold cyan")
    for j, c in enumerate(cols):
        t.add_column(Text(console.plain(c)), justify="left" if c in LABEL_COLUMNS else "right",
                     width=widths[j] if widths else None, overflow="fold")
    for r in cells:
        t.add_row(*[Text(x) for x in r])
    return t


def _records(title: str, cols: list[str], cells: list[list[str]]) -> list[Any]:
    """One ``name: value`` block per row, for widths no table fits."""
    out = [_text(title)]
    for r in cells:
        out += [_text(f"  {c}: {v}") for c, v in zip(cols, r)] + [_text("")]
    return out


def to_html(t: Table) -> str:
    """One ``<table>`` with its title as caption; numbers formatted as in the terminal."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in t.columns)
    body = "\n".join("<tr>" + "".join(f"<td>{html.escape(console.fmt(v))}</td>" for v in row) + "</tr>"
                     for row in t.rows)
    notes = "".join(f'<p class="note">{html.escape(n)}</p>' for n in t.notes)
    return (f'<table><caption>{html.escape(t.title)}</caption><thead><tr>{head}</tr></thead>'
            f"<tbody>\n{body}\n</tbody></table>{notes}")


def step_value(v: Any) -> Any:
    """A step as an integer where it is one (stored steps may come back as floats)."""
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v
