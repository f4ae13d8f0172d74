"""The ``sam-probe`` command line (typer). Each command lives in ``sam_probe/commands``."""
from __future__ import annotations

import sys
import traceback

import typer

from .errors import SamProbeError

app = typer.Typer(
    name="sam-probe",
    help="See how the optimizer shaped a solution: curvature, SAM gradient ratios, alignment, paths and features "
         "from your training checkpoints.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _register() -> None:
    from .commands import inspect_cmd, merge_cmd, train_cmd

    app.command("inspect")(inspect_cmd.inspect)
    app.command("train")(train_cmd.train)
    app.command("merge")(merge_cmd.merge)
    for module_name in ("sharpness_cmd", "ratios_cmd", "alignment_cmd", "paths_cmd", "features_cmd",
                        "report_cmd", "batch_cmd"):
        try:
            module = __import__(f"sam_probe.commands.{module_name}", fromlist=["register"])
        except ModuleNotFoundError as exc:
            if exc.name != f"sam_probe.commands.{module_name}":
                raise
            continue
        module.register(app)


_register()


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors print one line and exit 2; ``--debug`` shows tracebacks."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        app(args=argv, prog_name="sam-probe")
    except SamProbeError as exc:
        from . import distributed
        from .report.console import error

        if distributed.is_main():  # under torchrun, rank 0 alone speaks
            if debug:
                traceback.print_exc()
            error(str(exc), getattr(exc, "rows", None))
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()
