"""``--help`` on narrow terminals: each option on its own line with its help below, at full width.

typer lays options out in six columns (long flag, short flag, negative flag, short negative
flag, type, help); at 80 columns sam-probe's flags and choices leave the help 17 characters
wide and ``sharpness --help`` 268 lines long.  Below :data:`NARROW` columns each option is
printed as ``--flag, -f CHOICES`` with its help indented underneath, wrapped at the whole width.
Wide terminals keep typer's own layout.  Only rich and typer are imported (``--help`` stays instant).
"""
from __future__ import annotations

from typing import Any

NARROW = 100  # terminal columns below which options are stacked


def install() -> None:
    """Route typer's option panels through :func:`options_panel` (a no-op if typer's internals moved)."""
    try:
        from typer import rich_utils
    except ImportError:  # pragma: no cover - typer without rich
        return
    wide = getattr(rich_utils, "_print_options_panel", None)
    if wide is None or getattr(wide, "_sam_probe", False):
        return

    def panel(*, name: str, params: list, ctx: Any, markup_mode: Any, console: Any) -> None:
        if console.width >= NARROW:
            return wide(name=name, params=params, ctx=ctx, markup_mode=markup_mode, console=console)
        try:
            return options_panel(name=name, params=params, ctx=ctx, markup_mode=markup_mode, console=console)
        except (AttributeError, TypeError):  # pragma: no cover - typer internals changed: its own layout
            return wide(name=name, params=params, ctx=ctx, markup_mode=markup_mode, console=console)

    panel._sam_probe = True  # type: ignore[attr-defined]
    rich_utils._print_options_panel = panel


def _flags(param: Any, ctx: Any) -> Any:
    """``* --top-k, -k <int>``: required mark, flags, negative flags and the value's type, one line."""
    from rich.text import Text
    from typer import rich_utils
    from typer.core import TyperArgument

    line = Text()
    if param.required:
        line.append(rich_utils.REQUIRED_SHORT_STRING + " ", style=rich_utils.STYLE_REQUIRED_SHORT)
    if isinstance(param, TyperArgument):
        name = getattr(param, "display_name_raw", None) or param.make_metavar(ctx)  # type: ignore[attr-defined]
        line.append(str(name) + ("..." if param.metavar is None and param.nargs != 1 else ""),
                    style=rich_utils.STYLE_OPTION)
    else:
        line.append(", ".join(list(param.opts)), style=rich_utils.STYLE_OPTION)
        if param.secondary_opts:
            line.append(" / " + ", ".join(param.secondary_opts), style=rich_utils.STYLE_NEGATIVE_OPTION)
    kind = param.display_type_rich(ctx=ctx)
    if kind:
        line.append(f"  {kind}", style=rich_utils.STYLE_TYPES)
    return line


def options_panel(*, name: str, params: list, ctx: Any, markup_mode: Any, console: Any) -> None:
    """One panel of options, stacked: flags on one line, help indented below at the panel's width."""
    from rich.padding import Padding
    from rich.panel import Panel
    from rich.table import Table
    from typer import rich_utils

    if not params:
        return
    grid = Table.grid(expand=True, padding=(0, 0))
    grid.add_column(ratio=1)
    for param in params:
        grid.add_row(_flags(param, ctx))
        grid.add_row(Padding(rich_utils._get_parameter_help(param=param, ctx=ctx, markup_mode=markup_mode),
                             (0, 0, 0, 4)))
    console.print(Panel(grid, border_style=rich_utils.STYLE_OPTIONS_PANEL_BORDER, title=name,
                        title_align=rich_utils.ALIGN_OPTIONS_PANEL))
