"""The ``sam-probe`` command line (typer).

Analysis commands are built from the declarations in :mod:`sam_probe.analyses`;
the others (inspect, train, merge, report, batch) live in ``sam_probe/commands``.
Nothing heavy is imported here: torch, scipy, seaborn, matplotlib and h5py load
only when a command runs.
"""
from __future__ import annotations

import sys
import traceback
from typing import NoReturn, Optional

import typer

from . import errors
from .errors import Interrupted, SamProbeError


def _flags_without_type() -> None:
    """Switches (``--trace``) are shown without a ``<bool>`` type in ``--help``."""
    try:
        from typer.core import TyperOption
    except ImportError:  # pragma: no cover - typer internals moved: keep its default look
        return
    shown = TyperOption.display_type_rich

    def display_type_rich(self, ctx):  # type: ignore[no-untyped-def]
        return None if getattr(self, "is_flag", False) else shown(self, ctx)

    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


_flags_without_type()

from .report.help_layout import install as _stacked_help_on_narrow_terminals  # noqa: E402

_stacked_help_on_narrow_terminals()

app = typer.Typer(
    name="sam-probe",
    help="See how the optimizer shaped a solution: curvature, SAM gradient ratios, alignment, paths and features "
         "from your training checkpoints. Definitions of every quantity: docs/metrics.md.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
)


def _version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"sam-probe {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Optional[bool] = typer.Option(None, "--version", callback=_version, is_eager=True,
                                                 help="Print the version and exit.")) -> None:
    """See how the optimizer shaped a solution: curvature, SAM gradient ratios, alignment, paths and features
    from your training checkpoints. Definitions of every quantity: docs/metrics.md."""


def _register() -> None:
    from .commands import analysis_cmd, batch_cmd, inspect_cmd, merge_cmd, report_cmd, train_cmd

    analysis_cmd.register(app)
    app.command("inspect")(inspect_cmd.inspect)
    report_cmd.register(app)
    app.command("batch")(batch_cmd.batch)
    app.command("train")(train_cmd.train)
    app.command("merge")(merge_cmd.merge)


_register()
_COMMAND: list = []


def command():
    """The click command tree of :data:`app`, built once per process (a batch worker runs many
    commands; typer would rebuild every command's options on each call)."""
    if not _COMMAND:
        from typer.main import get_command

        _COMMAND.append(get_command(app))
    return _COMMAND[0]


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors print one line and exit 2; ``--debug`` shows tracebacks;
    Ctrl-C prints ``interrupted`` and exits 130 (stored units are whole; none is half-written)."""
    import signal

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv

    def interrupt(signum, frame):  # typer turns KeyboardInterrupt into a silent exit: raise ours
        errors.note_interrupt()  # and remember it, in case a library swallows the exception
        if _importing(frame):  # in the middle of an import: not now; deliver it again once the import is over
            import os
            import threading

            again = threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGINT))
            again.daemon = True
            again.start()
            return
        raise Interrupted()

    errors.note_interrupt(False)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        try:
            signal.signal(signal.SIGINT, interrupt)
        except ValueError:  # not the main thread: KeyboardInterrupt cannot reach this thread anyway
            pass
    try:
        with errors.style(errors.CLI):  # messages name settings as flags (--batch-size), not Python names
            _run(argv, debug)
    finally:
        if signal.getsignal(signal.SIGINT) is interrupt:
            signal.signal(signal.SIGINT, signal.default_int_handler)


def _importing(frame) -> bool:
    """Whether ``frame`` (where a signal arrived) runs inside an import.  An exception raised there can
    leave a half-imported module behind that a library's ``except`` hides until a later, unrelated error
    (seen: scipy and numpy under sklearn), or unwind through a C++ callback that then aborts the process
    (seen: torch)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _project_error(argv: list[str]) -> Exception | None:
    """The project config's error when ``argv`` runs (or asks for the help of) an analysis command."""
    from .commands.options import PROJECT_ERROR

    if PROJECT_ERROR[0] is None:
        return None
    from .analyses import names

    first = next((a for a in argv if not a.startswith("-")), None)
    return PROJECT_ERROR[0] if first in names() else None


def _run(argv: list[str], debug: bool) -> None:
    try:
        bad = _project_error(argv)
        if bad is not None:
            raise bad
        try:
            command().main(args=argv, prog_name="sam-probe")
        except SystemExit:
            if errors.interrupt_seen():  # the interrupt was swallowed on the way (by a library); the run went on
                raise Interrupted() from None
            raise
    except SamProbeError as exc:
        if errors.interrupt_seen():
            _interrupted()
        from . import distributed
        from .report.console import error

        if distributed.is_main():  # under torchrun, rank 0 alone speaks
            if debug:
                traceback.print_exc()
            error(str(exc), getattr(exc, "rows", None))
        sys.exit(exc.exit_code)
    except errors.RankLost as exc:
        from .report.console import error

        from . import distributed

        if distributed.is_main() or getattr(exc, "own", False):  # rank 0, or the rank whose failure it is
            error(str(exc))
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, Interrupted):
        _interrupted()


def _interrupted() -> NoReturn:
    """Ctrl-C: say what was kept, exit 130."""
    from .commands.runner import KEPT
    from .report.console import note

    kept = f"{len(KEPT)} units computed by this run are stored; " if KEPT else ""
    note(f"interrupted: {kept}every stored unit is whole (none half-written); re-run the same command to resume")
    sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()
