"""A ``batch`` worker: runs sam-probe commands in this one process, one per request line.

Protocol (``sam_probe.batch``): each stdin line is ``{"argv": [...], "status_file": PATH}``;
the command runs in-process exactly as ``sam-probe ARGV`` would (its per-unit
statuses appended to ``status_file``), and one line ``{"rc": CODE, "stderr": TEXT}``
answers on stdout.  What the command prints on stdout is discarded (statuses
travel through the file); torch, the data selections, built models and
objectives stay loaded between requests (:data:`sam_probe.pipeline.build.CACHE`).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys


def main() -> None:
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    devnull = open(os.devnull, "w")
    os.dup2(devnull.fileno(), 1)  # nothing a command or a library prints can reach the protocol
    threads = int(os.environ.get("SAM_PROBE_THREADS", "0") or 0)
    from .cli import main as cli_main
    from .commands.output import STATUS_FILE_ENV
    from .pipeline.build import CACHE

    CACHE.enabled = True
    if threads:
        import torch

        torch.set_num_threads(threads)
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        os.environ[STATUS_FILE_ENV] = request["status_file"]
        err = io.StringIO()
        code = 0
        with contextlib.redirect_stdout(devnull), contextlib.redirect_stderr(err):
            try:
                cli_main(list(request["argv"]))
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except Exception as exc:  # noqa: BLE001 - a bug in one job must not take the worker down
                code = 1
                err.write(f"error: {type(exc).__name__}: {exc}\n")
        os.environ.pop(STATUS_FILE_ENV, None)
        protocol.write(json.dumps({"rc": code, "stderr": err.getvalue()[-8000:]}) + "\n")
        protocol.flush()


if __name__ == "__main__":
    main()
