"""Terminal output: results on stdout, progress and errors on stderr (rich only here)."""
from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from typing import Any, Callable

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

out = Console(soft_wrap=False, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True)


def print_json(payload: Any) -> None:
    """Plain JSON on stdout (no rich markup) so scripts can parse it."""
    sys.stdout.write(json.dumps(payload, indent=2, allow_nan=False) + "\n")
    sys.stdout.flush()


def error(message: str, rows: list[tuple[str, str, str]] | None = None, prefix: str = "error") -> None:
    """``error: <one line>`` on stderr, then an optional table of details."""
    err.print(f"[bold red]{prefix}:[/] {message}", markup=True, highlight=False, soft_wrap=True)
    if rows:
        t = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
        for col in ("problem", "name", "detail"):
            t.add_column(col)
        for r in rows[:40]:
            t.add_row(*r)
        if len(rows) > 40:
            t.add_row("...", f"{len(rows) - 40} more", "")
        err.print(t)


def warn(message: str) -> None:
    err.print(f"[bold yellow]warning:[/] {message}", highlight=False, soft_wrap=True)


@contextlib.contextmanager
def progress(enabled: bool) -> Iterator[Callable[[str, int, int], None]]:
    """A ``(message, done, total)`` callback that drives a rich progress bar on stderr."""
    if not enabled or not err.is_terminal:
        yield lambda msg, done, total: None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=err, transient=True) as bar:
        task = bar.add_task("starting", total=None)

        def update(msg: str, done: int, total: int) -> None:
            bar.update(task, description=msg, completed=done, total=total)

        yield update


def table(title: str, columns: list[str], rows: list[list[Any]]) -> Table:
    t = Table(title=title, title_justify="left", header_style="bold cyan")
    for c in columns:
        t.add_column(c, justify="right" if c not in ("path", "file", "name", "status", "reason", "tensor", "run", "analysis", "layer") else "left")
    for r in rows:
        t.add_row(*[fmt(v) for v in r])
    return t


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != v:
            return "nan"
        if v == 0 or 1e-3 <= abs(v) < 1e5:
            return f"{v:.4g}"
        return f"{v:.3e}"
    return str(v)
