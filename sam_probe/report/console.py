"""Terminal output: results on stdout, progress and errors on stderr (rich only here)."""
from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from typing import Any, Callable

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

PIPED_WIDTH = 200  # width of piped output when COLUMNS is not set (logs keep whole tables on one line)


def _columns() -> int | None:
    import os

    c = os.environ.get("COLUMNS", "")
    return int(c) if c.isdigit() and int(c) >= 20 else None


def out_width() -> int:
    """Width of stdout: the terminal's (rich reads ``COLUMNS`` first), else ``COLUMNS``, else 200."""
    if out.is_terminal:
        return _columns() or out.size.width
    return _columns() or PIPED_WIDTH


out = Console(soft_wrap=False, width=None if sys.stdout.isatty() else (_columns() or PIPED_WIDTH))
err = Console(stderr=True)


def print_json(payload: Any) -> None:
    """Plain JSON on stdout (no rich markup) so scripts can parse it."""
    sys.stdout.write(json.dumps(payload, indent=2, allow_nan=False) + "\n")
    sys.stdout.flush()


_CONTROL = {c: "?" for c in range(32) if c not in (9,)} | {127: "?"}


def plain(text: Any) -> str:
    """``text`` as printable text: control characters (terminal escape sequences) and undecodable
    bytes of file names replaced (for :class:`rich.text.Text`, which reads no markup)."""
    return str(text).encode("utf-8", "surrogateescape").decode("utf-8", "replace").translate(_CONTROL)


def safe(text: Any) -> str:
    """``text`` as plain, printable terminal text with rich markup escaped (for markup strings)."""
    return escape(plain(text))


def error(message: str, rows: list[tuple[str, str, str]] | None = None, prefix: str = "error") -> None:
    """``error: <one line>`` on stderr, then an optional table of details."""
    one_line = " ".join(str(message).split("\n"))
    err.print(f"[bold red]{prefix}:[/] {safe(one_line)}", markup=True, highlight=False, soft_wrap=True)
    if rows:
        t = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
        for col in ("problem", "name", "detail"):
            t.add_column(col)
        for r in rows[:40]:
            t.add_row(*[safe(c) for c in r])
        if len(rows) > 40:
            t.add_row("...", f"{len(rows) - 40} more", "")
        err.print(t)


def warn(message: str) -> None:
    err.print(f"[bold yellow]warning:[/] {safe(message)}", highlight=False, soft_wrap=True)


def note(message: str) -> None:
    """A plain line on stderr (paths and names escaped)."""
    err.print(safe(message), highlight=False, soft_wrap=True)


def note_line(message: str) -> None:
    """``note: <one line>`` on stderr (facts about the settings, e.g. how attention is run)."""
    err.print(f"[bold]note:[/] {safe(message)}", highlight=False, soft_wrap=True)


def unit_line(outcome: Any) -> None:
    """One line per finished unit, for logs and CI where no progress bar is drawn."""
    from pathlib import Path

    name = Path(str(outcome.path)).name if " -> " not in str(outcome.path) else outcome.path
    step = f" step {outcome.step}" if outcome.step is not None else ""
    took = f" in {outcome.seconds:.2f} s" if outcome.seconds is not None else ""
    status = {"skipped": "reused from the store"}.get(outcome.status, outcome.status)
    note(f"{name}{step}: {status}{took}")


def summary_line(analysis: str, outcomes: list[Any], seconds: float) -> None:
    """``sharpness: 11 units, 8 computed, 3 reused from the store, 0 failed (12.3 s)``."""
    n = {k: sum(o.status == k for o in outcomes) for k in ("ok", "skipped", "failed")}
    if not outcomes:
        return
    note(f"{analysis}: {len(outcomes)} units, {n['ok']} computed, {n['skipped']} reused from the store, "
         f"{n['failed']} failed ({seconds:.1f} s)")


@contextlib.contextmanager
def progress(enabled: bool) -> Iterator[Callable[[str, int, int], None]]:
    """A ``(message, done, total)`` callback that drives a rich progress bar on stderr."""
    if not enabled or not err.is_terminal:
        yield lambda msg, done, total: None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=err, transient=True) as bar:
        task = bar.add_task("starting", total=None)

        def update(msg: str, done: int, total: int) -> None:
            bar.update(task, description=safe(msg), completed=done, total=total)

        yield update


def table(title: str, columns: list[str], rows: list[list[Any]]) -> Any:
    """A table for stdout, fitted to its width (see :mod:`sam_probe.report.tables`)."""
    from rich.console import Group

    from .tables import Table as Data, fit

    return Group(*fit(Data(title, columns, rows), out_width()))


def fmt(v: Any) -> str:
    """A cell as plain text: 4 significant digits, ``-`` for missing, control characters replaced."""
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
    return plain(v)
