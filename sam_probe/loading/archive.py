"""A torch zip checkpoint, checked before any byte of it is used.

torch's own reader does not check the zip CRCs, so a tensor record overwritten
with finite garbage loads silently.  Here, before unpickling:

- the central directory is parsed (``zipfile``) and must describe one archive
  that starts at byte 0 (no data before it, no second directory), with unique
  member names (case-insensitively, as torch's reader looks them up), no
  encrypted members, and members whose local headers match the directory and
  whose data lie one after another without overlapping (so the verification
  below reads each byte of the file at most once);
- tensor records (``<archive>/data/<key>``) must be stored uncompressed (torch
  never compresses them, and they are memory-mapped); other members may be
  deflated, inflating to at most ``MAX_PICKLE_BYTES``;
- the CRC-32 of **every** member is verified, streaming over the memory-mapped
  file (64 MiB at a time, no copy; large members on up to 4 threads); a mismatch
  is reported as ``corrupt: member archive/data/3 fails its CRC``.  With
  ``verify="metadata"`` only the members that are not stored tensor records are
  verified here (the pickle, byte order, version): the records are left in
  :attr:`TorchZip.unverified` for the one streaming pass of :mod:`.verify`, which
  checks their CRCs while it hashes the file and scans the weights.  The file is
  read once, and the tensors later use the same pages.

TorchScript archives are recognised (``constants.pkl`` or a ``code/`` folder).
"""
from __future__ import annotations

import os
import struct
import zipfile
import zlib
from dataclasses import dataclass

from .files import MappedFile, RefusedFile
from .pickle_scan import MAX_PICKLE_BYTES

_CHUNK = 64 * 2**20
_PARALLEL_MEMBER = 2**20  # members this large are verified on several threads...
_PARALLEL_TOTAL = 64 * 2**20  # ...when they add up to this much
_LOCAL = struct.Struct("<4s5H3L2H")  # local file header, 30 bytes


@dataclass(frozen=True)
class Member:
    """One member: ``name`` in the archive, where its (stored or deflated) bytes lie and their CRC."""

    name: str
    offset: int
    size: int
    csize: int
    stored: bool
    crc: int


def _corrupt(reason: str) -> RefusedFile:
    return RefusedFile(f"truncated or corrupt file ({reason}); re-save or re-copy it")


class TorchZip:
    """The verified members of a torch zip checkpoint (see module docstring)."""

    def __init__(self, mf: MappedFile, *, verify: bool | str = True):
        self.mf = mf
        mm = mf.data
        try:
            zf = zipfile.ZipFile(mm)
            infos = zf.infolist()
            start_dir = zf.start_dir
            end = zipfile._EndRecData(mm) if hasattr(zipfile, "_EndRecData") else None
        except zipfile.BadZipFile as exc:
            reason = "its zip directory is missing" if "not a zip file" in str(exc).lower() else str(exc)[:100]
            raise _corrupt(reason) from None
        except Exception as exc:  # noqa: BLE001 - zipfile raises many types on damaged directories
            raise _corrupt(f"its zip directory is damaged: {type(exc).__name__}") from None
        if not infos:
            raise _corrupt("the zip archive is empty")
        if end is not None and start_dir != end[zipfile._ECD_OFFSET]:
            raise _corrupt("there are bytes before the zip archive")
        first = infos[0].filename
        if "/" not in first:
            raise RefusedFile("a zip archive, but not a torch checkpoint (its members are not in one folder)",
                              "unsupported")
        self.prefix = first.split("/", 1)[0] + "/"
        self.members: dict[str, Member] = {}
        self._by_full: dict[str, Member] = {}
        seen: set[str] = set()
        spans = []
        for info in infos:
            folded = info.filename.lower()
            if folded in seen:
                raise _corrupt(f"member {info.filename} appears twice")
            seen.add(folded)
            m = self._member(mm, info, mf.size)
            spans.append((info.header_offset, m.offset + m.csize, info.filename))
            self._by_full[info.filename] = m
            if info.filename.startswith(self.prefix):
                self.members[info.filename[len(self.prefix):]] = m
        spans.sort()
        if spans[0][0] != 0:
            raise _corrupt("there are bytes before the first zip member")
        for (_, end_a, name_a), (start_b, _, name_b) in zip(spans, spans[1:]):
            if end_a > start_b:
                raise _corrupt(f"members {name_a} and {name_b} overlap")
        if spans[-1][1] > start_dir:
            raise _corrupt(f"member {spans[-1][2]} runs into the zip directory")
        self._inflated: dict[str, bytes] = {}
        self.unverified: list[Member] = []
        members = list(self._by_full.values())
        if verify == "metadata":
            self.unverified = [m for m in members if m.stored and self._is_record(m.name)]
            skip = {m.name for m in self.unverified}
            members = [m for m in members if m.name not in skip]
        if verify:
            self._verify_all(members)

    def _is_record(self, name: str) -> bool:
        """``<archive>/data/<key>``: a tensor record (never deflated, memory-mapped)."""
        return name.startswith(self.prefix + "data/") and "/" not in name[len(self.prefix) + 5:] \
            and not name.endswith(".pkl")

    @staticmethod
    def _member(mm, info: zipfile.ZipInfo, size: int) -> Member:
        name = info.filename
        if info.flag_bits & 0x1:
            raise RefusedFile(f"member {name} is encrypted", "unsupported")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise RefusedFile(f"member {name} uses zip compression method {info.compress_type}, which sam-probe "
                              "does not read", "unsupported")
        stored = info.compress_type == zipfile.ZIP_STORED
        if stored and info.compress_size != info.file_size:
            raise _corrupt(f"member {name} claims {info.file_size} bytes but stores {info.compress_size}")
        if not stored and info.file_size > MAX_PICKLE_BYTES:
            raise RefusedFile(f"member {name} inflates to {info.file_size:,} bytes (a zip bomb?), more than the "
                              f"{MAX_PICKLE_BYTES // 2**20} MiB sam-probe inflates; refusing it", "limit")
        if not stored and "/data/" in name and not name.endswith(".pkl"):
            raise RefusedFile(f"tensor record {name} is compressed; torch never writes compressed records (re-save "
                              "it with torch.save)", "unsupported")
        off = info.header_offset
        if off + _LOCAL.size > size:
            raise _corrupt(f"member {name} starts past the end of the file")
        sig, _, _, method, _, _, _, _, _, n_name, n_extra = _LOCAL.unpack_from(mm, off)
        encoding = "utf-8" if info.flag_bits & 0x800 else "cp437"
        local_name = bytes(mm[off + _LOCAL.size: off + _LOCAL.size + n_name])
        if sig != b"PK\x03\x04" or method != info.compress_type or local_name != info.orig_filename.encode(encoding):
            raise _corrupt(f"the local header of member {name} does not match the zip directory")
        data = off + _LOCAL.size + n_name + n_extra
        if data + info.compress_size > size:
            raise _corrupt(f"member {name} runs past the end of the file")
        return Member(name, data, info.file_size, info.compress_size, stored, info.CRC)

    def _verify_all(self, members: list[Member]) -> None:
        """Every member's CRC; large stored members on a few threads (``zlib.crc32`` releases the GIL)."""
        big = [m for m in members if m.stored and m.size >= _PARALLEL_MEMBER]
        workers = min(4, os.cpu_count() or 1, len(big))
        if workers > 1 and sum(m.size for m in big) >= _PARALLEL_TOTAL:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(workers) as pool:
                for _ in pool.map(self._verify, sorted(big, key=lambda m: -m.size)):
                    pass
            done = {m.name for m in big}
            members = [m for m in members if m.name not in done]
        for m in members:
            self._verify(m)

    def _verify(self, m: Member) -> None:
        mm = self.mf.data
        if m.stored:
            crc = 0
            with memoryview(mm) as view:
                for a in range(m.offset, m.offset + m.size, _CHUNK):
                    crc = zlib.crc32(view[a:min(a + _CHUNK, m.offset + m.size)], crc)
        else:
            inflate = zlib.decompressobj(-15)
            try:
                out = inflate.decompress(mm[m.offset:m.offset + m.csize], m.size + 1)
            except zlib.error:
                raise RefusedFile(f"corrupt: member {m.name} does not inflate; re-save or re-copy it") from None
            if len(out) != m.size:
                raise RefusedFile(f"corrupt: member {m.name} inflates to {len(out)} bytes, not the {m.size} its "
                                  "directory says; re-save or re-copy it")
            crc = zlib.crc32(out)
            self._inflated[m.name] = out
        if crc != m.crc:
            raise RefusedFile(f"corrupt: member {m.name} fails its CRC; re-save or re-copy it")

    @property
    def torchscript(self) -> bool:
        return any(n == "constants.pkl" or n.startswith("code/") for n in self.members)

    def member(self, name: str) -> Member | None:
        """The member ``<archive>/<name>`` or ``None``."""
        return self.members.get(name)

    def read(self, name: str) -> bytes:
        """The (verified) bytes of member ``<archive>/<name>``."""
        m = self.members.get(name)
        if m is None:
            raise _corrupt(f"member {self.prefix}{name} is missing")
        if m.stored:
            return bytes(self.mf.data[m.offset:m.offset + m.size])
        if m.name not in self._inflated:
            self._verify(m)
        return self._inflated[m.name]
