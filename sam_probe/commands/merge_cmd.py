"""``sam-probe merge DIR -o all.h5``: combine stored units into one HDF5 file."""
from __future__ import annotations

from pathlib import Path

import typer

from ..errors import SamProbeError
from ..report import console


def merge(
    results: Path = typer.Argument(..., help="Results directory written by the analysis commands."),
    output: Path = typer.Option(..., "-o", "--output", help="Merged HDF5 file to write."),
) -> None:
    """Combine every stored unit under RESULTS into one HDF5 file (each unit a group)."""
    from .. import store

    if not results.is_dir():
        raise SamProbeError(f"{results}: not a results directory")
    skipped: list[Path] = []

    def on_skip(path: Path, why: str) -> None:
        skipped.append(path)
        console.warn(f"skipped {path}: {why}")

    try:
        n = store.merge(results, output, on_skip)
    except OSError as exc:
        raise SamProbeError(store.describe_write_error(output, output.parent, exc, "nothing was merged")) from None
    console.note(f"merged {n} units into {output}" + (f"; skipped {len(skipped)} files (named above)" if skipped else ""))
