"""Run labels: the one short name a run goes by in tables, figures, the store, CSV and JSON.

A *run* is a directory of checkpoints; a checkpoint file (or a Hugging Face folder
checkpoint) given alone belongs to the directory that holds it.  Its label is

* the name the user gave it (``--run-name NAME``, or ``--run-name PATH=NAME``), else
* the shortest trailing part of its path that says more than a generic folder name:
  ``runs/digits-mlp-sgd`` is ``digits-mlp-sgd``, Lightning's
  ``lightning_logs/version_0/checkpoints`` is ``version_0/checkpoints`` (``checkpoints``,
  ``lightning_logs``, ``output`` ... alone name nothing).

The label does not depend on the other runs of a command, so a run keeps its store folder
whatever it is analysed with.  Where runs shown together would share a label, the
display (:func:`disambiguate`) lengthens their suffixes until they differ.  Labels hold
only ``A-Z a-z 0-9 . _ + = -`` and ``/`` between path parts (others become ``_``), so a
label is also a safe relative folder of the store.  Nothing here imports torch.
"""
from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

GENERIC = frozenset({"checkpoints", "checkpoint", "ckpts", "ckpt", "weights", "models", "model", "saved_models",
                     "output", "outputs", "out", "results", "runs", "logs", "lightning_logs", "save", "saves",
                     "train", "training", "artifacts", "files"})
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=-]{0,63}")
_UNSAFE = re.compile(r"[^A-Za-z0-9._+=-]")
_GIVEN: dict[str, str] = {}  # resolved run directory -> the name given with --run-name (the command running now)


def _key(path: str | Path) -> str:
    try:
        return str(Path(path).resolve())
    except (OSError, RuntimeError):
        return str(Path(path).absolute())


def _is_folder_checkpoint(p: Path) -> bool:
    from .loading.sources import is_checkpoint  # the folder sources (Hugging Face, DeepSpeed, ...): no torch

    return p.is_dir() and is_checkpoint(p)


def run_dir(target: str | Path) -> Path:
    """The run a CHECKPOINT argument names: a directory of checkpoints itself, else the
    directory holding the file (or the Hugging Face folder checkpoint)."""
    p = Path(target)
    if p.is_dir() and not _is_folder_checkpoint(p):
        return p
    return p.parent


def _safe(part: str) -> str:
    s = _UNSAFE.sub("_", part)
    return s if s.strip(".") else s.replace(".", "_")  # never "." or ".." (a store folder)


def default_label(directory: str | Path, parts: int = 1) -> str:
    """At least ``parts`` trailing names of ``directory`` (resolved), more while the leading one is generic."""
    names = [n for n in Path(_key(directory)).parts if n not in ("/", "\\")] or ["run"]
    n = min(max(parts, 1), len(names))
    while n < len(names) and names[-n].lower() in GENERIC:
        n += 1
    return "/".join(_safe(x) for x in names[-n:])


def label_for(target: str | Path) -> str:
    """The label of the run ``target`` belongs to: its ``--run-name``, else :func:`default_label`."""
    return label_for_dir(run_dir(target))


def label_for_dir(directory: str | Path) -> str:
    """The label of the run in ``directory``: its ``--run-name``, else :func:`default_label`."""
    return _GIVEN.get(_key(directory)) or default_label(directory)


def check_name(name: str) -> str:
    """A ``--run-name`` as given, or ValueError saying what a name may hold."""
    if not NAME_RE.fullmatch(name):
        raise ValueError(f"{name!r}: a run name is 1-64 letters, digits and . _ + = - (starting with a letter or "
                         "digit; no / or spaces)")
    return name


def parse_names(items: Sequence[str], targets: Sequence[str | Path]) -> dict[str, str]:
    """``--run-name`` values -> ``{resolved run directory: name}``.

    ``PATH=NAME`` names the run of PATH; bare ``NAME`` values name the targets' runs in order
    (as many as there are runs).  ValueError on a bad name, an unknown path or a count mismatch.
    """
    named: dict[str, str] = {}
    runs = list(dict.fromkeys(_key(run_dir(t)) for t in targets))
    bare = []
    for item in items:
        path, sep, name = item.rpartition("=")
        if sep and path and Path(path).exists():
            key = _key(run_dir(path))
            if key not in runs:
                raise ValueError(f"--run-name {item}: {path} is not one of this command's runs")
            named[key] = check_name(name)
        else:
            bare.append(check_name(item))
    if bare:
        left = [r for r in runs if r not in named]
        if len(bare) != len(left):
            raise ValueError(f"--run-name: {len(bare)} names for {len(left)} runs; give one per run, in order, or "
                             "PATH=NAME")
        named.update(zip(left, bare))
    used = [n for n in named.values()]
    if len(set(used)) != len(used):
        raise ValueError(f"--run-name: two runs named {next(n for n in used if used.count(n) > 1)!r}")
    return named


@contextlib.contextmanager
def given(names: Mapping[str, str]) -> Iterator[None]:
    """Within the block, :func:`label_for` returns these names (``{resolved run directory: name}``)."""
    before = dict(_GIVEN)
    _GIVEN.clear()
    _GIVEN.update(names)
    try:
        yield
    finally:
        _GIVEN.clear()
        _GIVEN.update(before)


def _candidates(key: str, label: str) -> list[str]:
    """Ever longer labels of run ``key``: ``label``, then longer path suffixes (after a given name, in
    parentheses), then numbered."""
    names = [n for n in Path(_key(key)).parts if n not in ("/", "\\")]
    suffixes = list(dict.fromkeys(default_label(key, n) for n in range(1, len(names) + 1)))
    if label in suffixes:
        more = suffixes[suffixes.index(label) + 1:]
    else:
        more = [f"{label} ({s})" for s in suffixes]
    return [label] + more


def disambiguate(labels: Mapping[str, str]) -> dict[str, str]:
    """``{run key: label}`` where runs with different keys never share a label: clashing ones get
    longer path suffixes (a name the user gave keeps its text, its folder added in parentheses)."""
    cands = {k: _candidates(k, lab) for k, lab in labels.items()}
    at = dict.fromkeys(labels, 0)
    while True:
        out = {k: cands[k][min(at[k], len(cands[k]) - 1)] for k in labels}
        by_label: dict[str, list[str]] = {}
        for k, lab in out.items():
            by_label.setdefault(lab, []).append(k)
        clashes = [ks for ks in by_label.values() if len(ks) > 1]
        if not clashes:
            return out
        moved = False
        for ks in clashes:
            for k in ks:
                if at[k] < len(cands[k]) - 1:
                    at[k] += 1
                    moved = True
        if not moved:  # identical paths as far as they go: number them
            for ks in clashes:
                for i, k in enumerate(ks[1:], start=2):
                    cands[k].append(f"{out[k]}#{i}")
                    at[k] = len(cands[k]) - 1


def labels(run_keys: Iterable[str], stored: Mapping[str, str] | None = None) -> dict[str, str]:
    """Display labels of ``run_keys`` (run directories): the label stored or given for a key, else
    its default; then :func:`disambiguate`."""
    stored = stored or {}
    return disambiguate({k: stored.get(k) or default_label(k) for k in dict.fromkeys(run_keys)})


def run_of(result: Mapping) -> str:
    """The run directory a result belongs to, from its keys alone (no file system access): its
    ``run_dir``; a run-level result's ``run`` (stored as the directory); the folder of ``a`` for a
    pair; else the folder of its checkpoint ``path``."""
    import os

    if result.get("run_dir"):
        return os.path.normpath(str(result["run_dir"]))
    if result.get("run") and not result.get("path"):
        return os.path.normpath(str(result["run"]))
    p = result.get("path") or result.get("a") or ""
    parent = os.path.dirname(os.path.normpath(str(p))) if p else ""
    return parent or "."


def stored_label(unit: str) -> str | None:
    """The label a unit was stored under (``analysis/<label>/<file>``), if it is a well-formed one."""
    parts = str(unit).split("/")  # the store writes "/" only; a backslash is part of a name (e.g. an escape)
    label = "/".join(parts[1:-1])
    if len(parts) < 3 or len(label) > 200 or any(not p or p in (".", "..") or _UNSAFE.search(p) for p in parts[1:-1]):
        return None
    return label
