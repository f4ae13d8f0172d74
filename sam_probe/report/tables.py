"""Tables as data: each view builds :class:`Table` objects once; the terminal (rich) and HTML render them."""
from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any

from . import console


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[Any]]
    notes: list[str] = field(default_factory=list)  # lines printed under the table (settings, rates, ...)


def show(tables: list[Table]) -> None:
    """Print tables (and their notes) on stdout."""
    for t in tables:
        console.out.print(console.table(t.title, t.columns, t.rows))
        for n in t.notes:
            console.out.print(n, highlight=False, markup=False)


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
