"""One streaming pass over a checkpoint file: its sha256, its zip CRC-32s and the non-finite scan, together.

Before an analysis a checkpoint's bytes are needed three ways: the sha256 that
keys its stored results, the CRC-32 of every tensor record of a zip archive
(torch's reader checks none), and the number of NaN/Inf weights.  They are
computed in **one pass** over the memory-mapped file, in ``CHUNK`` pieces in
file order: the main thread hashes a piece while a second thread checks the
CRCs of the members it holds and counts the non-finite values of the weights it
holds (``hashlib``, ``zlib`` and torch release the GIL), so every page comes
from the disk once and is used while it is in memory.  The scan sums each piece
(an IEEE sum is NaN/Inf exactly when a term is, or on overflow) and counts
entries only when the sum is not finite.

What a pass found is remembered per file identity (device, inode, size, mtime
and ctime, :func:`.files.identity`; at most ``MAX_REMEMBERED`` files and
``MAX_REMEMBERED_REGIONS`` tensor storages in all): the same
unchanged file read again in this process (a run is ordered by step, then each
checkpoint is loaded for its analysis) is not hashed, verified or scanned again.
A file rewritten in place has a new ctime and is read again; a file changed less
than ``RACY_NS`` ago is not remembered at all (a rewrite within one coarse
timestamp tick would keep its times).
"""
from __future__ import annotations

import hashlib
import time
import zlib
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .files import MappedFile, RefusedFile, map_file

CHUNK = 16 * 2**20
MAX_REMEMBERED = 4096  # files
MAX_REMEMBERED_REGIONS = 2**19  # region counts over all files (~50 MB); the oldest files are forgotten first


@dataclass(frozen=True)
class Region:
    """Weights stored in the file: ``nbytes`` bytes of ``dtype`` values from byte ``offset``."""

    offset: int
    nbytes: int
    dtype: Any  # torch.dtype


@dataclass
class Known:
    """What earlier passes found about one file identity."""

    sha256: str | None = None
    verified: bool = False  # every CRC checked
    counts: dict[int, int] = field(default_factory=dict)  # region offset -> non-finite entries


_KNOWN: OrderedDict[tuple, Known] = OrderedDict()
PASSES: list[int] = [0]  # full passes made in this process (tests count them)


def _known(identity: tuple) -> Known:
    k = _KNOWN.get(identity)
    if k is None:
        k = _KNOWN[identity] = Known()
    _KNOWN.move_to_end(identity)
    regions = sum(len(v.counts) for v in _KNOWN.values())
    while len(_KNOWN) > 1 and (len(_KNOWN) > MAX_REMEMBERED or regions > MAX_REMEMBERED_REGIONS):
        _, old = _KNOWN.popitem(last=False)
        regions -= len(old.counts)
    return k


def forget() -> None:
    """Drop everything remembered (tests)."""
    _KNOWN.clear()


class _Walk:
    """Applies ``fn(item, lo, hi)`` to the part of each sorted, non-overlapping ``(offset, end)`` item in a piece."""

    def __init__(self, items: Sequence[Any], span: Callable[[Any], tuple[int, int]], fn: Callable[[Any, int, int], None]):
        self.items = sorted(items, key=lambda it: span(it)[0])
        self.span, self.fn, self.i = span, fn, 0

    def __call__(self, a: int, b: int) -> None:
        items, span = self.items, self.span
        j = self.i
        while j < len(items):
            lo, hi = span(items[j])
            if lo >= b:
                break
            if hi > a:
                self.fn(items[j], max(a, lo), min(b, hi))
            j += 1
        while self.i < len(items) and span(items[self.i])[1] <= b:
            self.i += 1


def _pass(mf: MappedFile, crcs: Sequence[Any], regions: Sequence[Region], want_sha: bool) -> tuple[str | None, dict]:
    """One pass: sha256 (when wanted), CRC-32 of ``crcs`` (archive members) and non-finite counts of ``regions``."""
    import torch

    from .state import count_flat

    view = memoryview(mf.data)
    crc = {m.name: 0 for m in crcs}
    counts = {r.offset: 0 for r in regions}

    def crc_part(m: Any, lo: int, hi: int) -> None:
        crc[m.name] = zlib.crc32(view[lo:hi], crc[m.name])

    def scan_part(r: Region, lo: int, hi: int) -> None:
        el = torch.empty(0, dtype=r.dtype).element_size()
        first = -(-(lo - r.offset) // el)  # elements whose first byte lies in [lo, hi)
        last = min(-(-(hi - r.offset) // el), r.nbytes // el)
        if last > first:
            x = torch.frombuffer(mf.data, dtype=r.dtype, count=last - first, offset=r.offset + first * el)
            counts[r.offset] += count_flat(x)

    crc_walk = _Walk(crcs, lambda m: (m.offset, m.offset + m.size), crc_part)
    scan_walk = _Walk(regions, lambda r: (r.offset, r.offset + r.nbytes), scan_part)
    sha = hashlib.sha256() if want_sha else None
    PASSES[0] += 1
    def check_and_scan(a: int, b: int) -> None:
        crc_walk(a, b)
        scan_walk(a, b)

    with ThreadPoolExecutor(1) as pool:
        for a in range(0, mf.size, CHUNK):
            b = min(a + CHUNK, mf.size)
            if sha is not None:  # hash here, check and scan there
                job = pool.submit(check_and_scan, a, b)
                sha.update(view[a:b])
            else:  # check here, scan there
                job = pool.submit(scan_walk.__call__, a, b)
                crc_walk(a, b)
            job.result()
    for m in crcs:
        if crc[m.name] != m.crc:
            raise RefusedFile(f"corrupt: member {m.name} fails its CRC; re-save or re-copy it")
    return (sha.hexdigest() if sha is not None else None), counts


RACY_NS = 50_000_000  # a file changed this recently may change again within one timestamp tick: not remembered


def _remember(mf: MappedFile) -> Known:
    """Where to keep what a pass finds: the file's entry, or a throw-away one for a file changed within
    ``RACY_NS`` of now (file times have a coarse tick, so a rewrite of the same size in the same tick would
    look unchanged: such a file is read again next time, as git does with "racily clean" files)."""
    _, _, _, mtime, ctime = mf.identity
    if time.time_ns() - max(mtime, ctime) < RACY_NS:
        return Known()
    return _known(mf.identity)


def verified(mf: MappedFile, crcs: Sequence[Any] = (), regions: Sequence[Region] = ()) -> tuple[str, dict[int, int]]:
    """``(sha256, {region offset: non-finite entries})`` of a mapped file, its CRCs verified; from one pass, or
    from what an earlier pass over the same unchanged file found."""
    known = _remember(mf)
    missing = [r for r in regions if r.offset not in known.counts]
    if known.sha256 is None or (crcs and not known.verified) or (missing and not known.verified):
        sha, counts = _pass(mf, crcs if not known.verified else (), missing, known.sha256 is None)
        known.sha256 = known.sha256 or sha
        known.verified = True
        known.counts.update(counts)
    elif missing:  # the file was verified under another --key: scan only what is new
        known.counts.update(_pass(mf, (), missing, False)[1])
    return known.sha256, {r.offset: known.counts[r.offset] for r in regions}  # type: ignore[return-value]


def mapped_regions(mf: MappedFile, tensors: Sequence[Any]) -> list[Region]:
    """The floating storages of ``tensors`` that are views of the mapped file (zero-copy), as regions."""
    import torch

    if not tensors:
        return []
    base = torch.frombuffer(mf.data, dtype=torch.uint8, count=1).data_ptr()
    out: dict[int, Region] = {}
    for t in tensors:
        if not (t.is_floating_point() or t.is_complex()) or t.device.type != "cpu":
            continue
        st = t.untyped_storage()
        off = st.data_ptr() - base
        el = t.element_size()
        if 0 <= off and off + st.nbytes() <= mf.size and off % el == 0 and st.nbytes() % el == 0:
            out.setdefault(off, Region(off, st.nbytes(), t.dtype))
    return list(out.values())


def tensor_counts(mf: MappedFile, state: dict[str, Any], counts: dict[int, int]) -> dict[str, int]:
    """Non-finite entries per floating tensor: from its region when it is its whole storage, else counted."""
    import torch

    from .state import count_nonfinite

    base = torch.frombuffer(mf.data, dtype=torch.uint8, count=1).data_ptr() if state else 0
    out = {}
    for name, t in state.items():
        if not (t.is_floating_point() or t.is_complex()):
            continue
        st = t.untyped_storage()
        off = st.data_ptr() - base
        whole = t.storage_offset() == 0 and t.is_contiguous() and t.numel() * t.element_size() == st.nbytes()
        out[name] = counts[off] if whole and off in counts else count_nonfinite(t)
    return out


def file_sha256(path: str | Path) -> str:
    """sha256 of a regular file (FIFOs and devices are refused, never read), remembered per file identity."""
    mf = map_file(path)
    known = _remember(mf)
    if known.sha256 is None:
        known.sha256 = _pass(mf, (), (), True)[0]
    return known.sha256  # type: ignore[return-value]


def remember_sha256(mf: MappedFile, sha256: str) -> None:
    """Remember the sha256 a source computed in its own pass over a mapped file (e.g. over the copies of the
    parts it read and the bytes between them), so that keying it later does not read it again."""
    known = _remember(mf)
    if known.sha256 is None:
        known.sha256 = sha256
