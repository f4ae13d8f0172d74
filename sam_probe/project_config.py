"""A project's own defaults for the analysis commands: ``sam-probe.toml`` or ``[tool.sam-probe]``.

Looked for in the current directory, then its parents, up to the first directory holding
``.git`` (the repository root, included) or the filesystem root; in each directory
``sam-probe.toml`` (the whole file is the table) before ``pyproject.toml`` (its
``[tool.sam-probe]`` table; a ``pyproject.toml`` without one is passed over).  The first
found is the project config.  Keys, all optional::

    out = "results"            # --out
    model = "models.py:make"   # --model
    data = "data/train.pt"     # --data
    max-samples = 2000         # --max-samples

Paths are relative to the folder holding the file: ``out``, and in ``model``/``data`` every
``:``-separated part that looks like a path (holds ``/``, starts with ``.`` or ends in a file
suffix such as ``.py``/``.pt``) and exists there.  Flags given on the command line win; the
command's ``--help`` shows the project's values as the defaults and ``--verbose`` prints where
each came from.  A ``model = "file.py:factory"`` runs that file's code like the flag does: it is
acceptable here only because the project's own file names it (see the README).

The file is read as untrusted text: at most :data:`MAX_BYTES`, parsed with :mod:`tomllib`
(``tomli`` before Python 3.11), unknown keys and wrong types refused with one line naming the
file and the key (:class:`~sam_probe.errors.SpecError`, exit 2).  Torch-free and cheap: it runs
when ``sam-probe --help`` builds the commands.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FILE_NAME = "sam-probe.toml"
TABLE = "tool.sam-probe"
MAX_BYTES = 1 << 20
KEYS = {"out": str, "model": str, "data": str, "max-samples": int}  # config key -> type
OPTION_OF = {"out": "out", "model": "model", "data": "data", "max-samples": "max_samples"}  # -> option name
PATH_SUFFIXES = (".py", ".pt", ".pth", ".npz", ".h5", ".hdf5", ".safetensors", ".bin", ".ckpt")


@dataclass(frozen=True)
class ProjectConfig:
    """The project config found (``path`` None: none), its values by option name, and where it is."""

    path: Path | None = None
    values: dict[str, Any] = field(default_factory=dict)  # option name (max_samples) -> value

    @property
    def where(self) -> str:
        if self.path is None:
            return ""
        return str(self.path) + ("" if self.path.name == FILE_NAME else f" [{TABLE}]")


def _error(path: Path, text: str) -> Exception:
    from .errors import SpecError

    where = str(path) + ("" if path.name == FILE_NAME else f" [{TABLE}]")
    return SpecError(f"project config {where}: {text}")


def _parse(path: Path) -> dict[str, Any] | None:
    """The table of ``path`` (None: a pyproject.toml without ``[tool.sam-probe]``)."""
    try:
        import tomllib  # type: ignore[import-not-found,unused-ignore]
    except ImportError:  # Python < 3.11
        try:
            import tomli as tomllib  # type: ignore[no-redef,import-not-found,unused-ignore]
        except ImportError:
            raise _error(path, "reading it needs Python 3.11 (tomllib) or `pip install tomli`") from None
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except OSError as exc:
        raise _error(path, f"cannot be read ({exc.strerror or exc})") from None
    if len(raw) > MAX_BYTES:
        raise _error(path, f"larger than {MAX_BYTES // 1024} KiB; not read")
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise _error(path, "not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise _error(path, f"not valid TOML ({str(exc).splitlines()[0]})") from None
    if path.name == FILE_NAME:
        return doc
    tool = doc.get("tool")
    table = tool.get("sam-probe") if isinstance(tool, dict) else None
    if table is None:
        return None
    if not isinstance(table, dict):
        raise _error(path, "tool.sam-probe must be a table")
    return table


def _checked(path: Path, table: dict[str, Any]) -> dict[str, Any]:
    from .errors import suggest

    out: dict[str, Any] = {}
    for key, value in table.items():
        if key not in KEYS:
            close = suggest(str(key), KEYS) or suggest(str(key).replace("_", "-"), KEYS)
            raise _error(path, f"unknown key {str(key)[:60]!r}{close}; the keys are {', '.join(KEYS)}")
        kind = KEYS[key]
        if kind is int:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise _error(path, f"key {key!r} must be a positive integer, got {str(value)[:60]!r}")
        elif not isinstance(value, str) or not value.strip() or "\n" in value or len(value) > 4096:
            raise _error(path, f"key {key!r} must be a non-empty one-line string, got {str(value)[:60]!r}")
        out[OPTION_OF[key]] = _resolved(path.parent, key, value)
    return out


def _looks_like_path(part: str) -> bool:
    return "/" in part or part.startswith(".") or part.lower().endswith(PATH_SUFFIXES)


def _resolved(folder: Path, key: str, value: Any) -> Any:
    """Paths relative to the config's folder made absolute (see the module docstring)."""
    if key == "out":
        p = Path(value).expanduser()
        return str(p if p.is_absolute() else (folder / p))
    if key not in ("model", "data"):
        return value
    parts = value.split(":")
    for i, part in enumerate(parts):
        if part and not Path(part).is_absolute() and _looks_like_path(part) and (folder / part).exists():
            parts[i] = str((folder / part).resolve())
    return ":".join(parts)


def find(start: Path | None = None) -> ProjectConfig:
    """The project config for ``start`` (default: the current directory); raises a
    :class:`~sam_probe.errors.SpecError` for a file that is not a valid one."""
    try:
        here = Path(start or os.getcwd()).resolve()
    except OSError:  # the current directory was removed
        return ProjectConfig()
    for folder in (here, *here.parents):
        for name in (FILE_NAME, "pyproject.toml"):
            path = folder / name
            if path.is_file():
                table = _parse(path)
                if table is not None:
                    return ProjectConfig(path, _checked(path, table))
        if (folder / ".git").exists():
            break
    return ProjectConfig()


def safe_find(start: Path | None = None) -> tuple[ProjectConfig, Exception | None]:
    """:func:`find`, with its error returned instead of raised (building ``--help`` never fails)."""
    try:
        return find(start), None
    except Exception as exc:  # noqa: BLE001 - a SpecError; anything else is reported the same way
        return ProjectConfig(), exc
