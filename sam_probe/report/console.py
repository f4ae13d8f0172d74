"""Terminal output: results on stdout, progress and errors on stderr (rich only here)."""
from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from typing import Any, Callable

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
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


def unit_line(outcome: Any, counter: str = "") -> None:
    """One line per finished unit, for logs and CI where no progress bar is drawn."""
    from pathlib import Path

    name = Path(str(outcome.path)).name if " -> " not in str(outcome.path) else outcome.path
    step = f" step {outcome.step}" if outcome.step is not None else ""
    took = f" in {outcome.seconds:.2f} s" if outcome.seconds is not None else ""
    status = {"reused": "reused from the store"}.get(outcome.status, outcome.status)
    note(f"{counter}{name}{step}: {status}{took}")


def summary_line(analysis: str, outcomes: list[Any], seconds: float, counts: dict[str, int] | None = None) -> None:
    """``sharpness: 11 units, 8 computed, 3 reused from the store, 0 failed (12.3 s)``: ``counts``
    (every unit the command ran, e.g. a tracker's) or the statuses of ``outcomes``."""
    n: dict[str, int] = {k: sum(int(o.status == k) for o in outcomes) for k in ("ok", "reused", "failed")}
    if counts is not None and any(counts.values()):
        n = counts
    total = sum(n.get(k, 0) for k in ("ok", "reused", "failed"))
    if not total:
        return
    note(f"{analysis}: {total} units, {n.get('ok', 0)} computed, {n.get('reused', 0)} reused from the store, "
         f"{n.get('failed', 0)} failed ({seconds:.1f} s)")


class Tracker:
    """Progress over *all* units of a command (every run together), with honest time.

    ``total`` is set once the command knows its units; :meth:`finished` counts one unit.
    Elapsed time runs from the start and never stops while units remain; the ETA is the
    mean wall time of the units *computed* so far (units read back from the store cost
    nothing) times the units left, less the time already spent on the current one — and
    ``?`` until one unit has been computed.
    """

    def __init__(self, total: int | None = None, clock: Callable[[], float] | None = None):
        import time

        self.clock = clock or time.monotonic
        self.total = total
        self.done = 0
        self.counts = {"ok": 0, "reused": 0, "failed": 0}  # units by status
        self.seen: set[int] = set()  # ids of the outcomes counted
        self.computed = 0
        self.compute_seconds = 0.0
        self.started = self.clock()
        self.last = self.started
        self.description = "starting"
        self._bar: Any = None
        self._task: Any = None

    def set_total(self, total: int) -> None:
        self.total = total
        self._refresh()

    def describe(self, message: str) -> None:
        """What runs now (``sharpness step_000040.pt``)."""
        self.description = message
        self._refresh()

    def finished(self, outcome: Any) -> None:
        """One unit done: computed (``ok``), read back (``reused``) or ``failed``."""
        now = self.clock()
        self.seen.add(id(outcome))
        self.done += 1
        if self.total is not None and self.done > self.total:
            self.total = self.done  # a unit the count did not foresee: never show more done than due
        status = getattr(outcome, "status", None)
        if status in self.counts:
            self.counts[status] += 1
        if status == "ok":
            self.computed += 1
            self.compute_seconds += now - self.last
        self.last = now
        self._refresh()

    def counter(self) -> str:
        return f"[{self.done}/{self.total}] " if self.total else ""

    def eta(self) -> float | None:
        """Seconds left (None: nothing computed yet to time the rest by)."""
        if self.total is None or not self.computed:
            return None
        left = max(self.total - self.done, 0)
        if not left:
            return 0.0
        mean = self.compute_seconds / self.computed
        return max(mean * left - (self.clock() - self.last), mean * (left - 1))

    def eta_text(self) -> str:
        import datetime

        eta = self.eta()
        return "ETA ?" if eta is None else f"ETA {datetime.timedelta(seconds=int(round(eta)))}"

    def _refresh(self) -> None:
        if self._bar is not None:
            self._bar.update(self._task, description=safe(self.description), completed=self.done,
                             total=self.total)


@contextlib.contextmanager
def progress(enabled: bool, total: int | None = None) -> Iterator[Tracker]:
    """A :class:`Tracker` that drives a rich progress bar on stderr (when ``enabled`` on a terminal)."""
    tracker = Tracker(total)
    if not enabled or not err.is_terminal:
        yield tracker
        return
    from rich.progress import ProgressColumn
    from rich.text import Text

    class Eta(ProgressColumn):
        def render(self, task: Any) -> Text:
            return Text(tracker.eta_text(), style="progress.remaining")

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} units"),
                  TimeElapsedColumn(), Eta(), console=err, transient=True) as bar:
        tracker._bar, tracker._task = bar, bar.add_task("starting", total=total)
        yield tracker


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
