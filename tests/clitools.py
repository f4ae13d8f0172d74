"""Run the ``sam-probe`` CLI in-process and capture what a user would see."""
from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from typing import Any

from sam_probe.cli import main


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


def run_cli(*args: str) -> CliResult:
    """``sam-probe ARGS``: exit code, stdout and stderr (never raises SystemExit)."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return CliResult(code, out.getvalue(), err.getvalue())
