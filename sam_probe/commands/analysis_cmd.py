"""One typer command per declared analysis, built from its declaration (no torch imported)."""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Optional

import typer

from ..analyses.base import CHECKPOINTS, PAIR, RUNS, Analysis, Option
from .options import analysis_options

TARGET_HELP = {CHECKPOINTS: "Checkpoint files or run directories.", RUNS: "Run directories."}
ALIAS_SUFFIX = "__alias"


def metavar(option: Option) -> str | None:
    """What the help shows after a flag: the choices, or (None) the value's type."""
    return "|".join(option.choices) if option.choices else None


def typer_option(option: Option) -> tuple[Any, Any]:
    """``(annotation, typer.Option)`` of a declared option."""
    ann = option.type if option.default is not None or option.type is bool else Optional[option.type]
    return ann, typer.Option(option.default, *option.flags, help=option.help, metavar=metavar(option),
                             show_default=option.type is not bool and option.default is not None)


def parameters(analysis: Analysis) -> list[inspect.Parameter]:
    """The command's signature: its targets, then its own options (hidden aliases last)."""
    kw = inspect.Parameter.KEYWORD_ONLY
    if analysis.target == PAIR:
        params = [inspect.Parameter("a", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Path,
                                    default=typer.Argument(..., help="Checkpoint A (alpha = 0).", metavar="A")),
                  inspect.Parameter("b", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Path,
                                    default=typer.Argument(..., help="Checkpoint B (alpha = 1).", metavar="B"))]
    else:
        name = "checkpoints" if analysis.target == CHECKPOINTS else "runs"
        params = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=list[Path],
                                    default=typer.Argument(..., help=TARGET_HELP[analysis.target],
                                                           metavar=name.upper()[:-1]))]
    for o in analysis.options:
        ann, opt = typer_option(o)
        params.append(inspect.Parameter(o.name, kw, annotation=ann, default=opt))
    for o in analysis.options:
        if o.hidden_flags:
            ann = o.type if o.type is bool else Optional[o.type]
            params.append(inspect.Parameter(o.name + ALIAS_SUFFIX, kw, annotation=ann,
                                            default=typer.Option(None if o.type is not bool else False,
                                                                 *o.hidden_flags, hidden=True)))
    return params


def make_command(analysis: Analysis):
    """The typer callback of ``sam-probe NAME``."""

    def command(*, common, **values: Any) -> None:
        from .runner import run_command

        for o in analysis.options:
            alias = values.pop(o.name + ALIAS_SUFFIX, None)
            if o.hidden_flags and alias not in (None, False) and values[o.name] in (None, o.default):
                values[o.name] = alias
        targets = [values.pop("a"), values.pop("b")] if analysis.target == PAIR else \
            list(values.pop("checkpoints" if analysis.target == CHECKPOINTS else "runs"))
        run_command(analysis, targets, values, common)

    command.__name__ = analysis.name.replace("-", "_")
    command.__doc__ = analysis.help_text()
    command.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        parameters(analysis) + [inspect.Parameter("common", inspect.Parameter.KEYWORD_ONLY)])
    return analysis_options(command)


def command_class(analysis: Analysis):
    """A click command for ``analysis`` whose options with a ``flag_value`` may be given bare
    (``--per-layer`` alone means ``--per-layer tensor``)."""
    from typer.core import TyperCommand

    bare = {f: o for o in analysis.options if o.flag_value is not None for f in o.flags}
    if not bare:
        return TyperCommand

    class Command(TyperCommand):
        def parse_args(self, ctx, args):  # type: ignore[override]
            args = list(args)
            out: list[str] = []
            for i, a in enumerate(args):
                out.append(a)
                o = bare.get(a)
                if o is not None and (i + 1 >= len(args) or args[i + 1] not in o.choices):
                    out.append(str(o.flag_value))
            return super().parse_args(ctx, out)

    return Command


def register(app: typer.Typer) -> None:
    from ..analyses import all_analyses

    for analysis in all_analyses():
        app.command(analysis.name, help=analysis.help_text(), short_help=analysis.summary,
                    cls=command_class(analysis))(make_command(analysis))
