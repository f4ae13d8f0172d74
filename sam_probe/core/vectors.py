"""Where a solver's parameter-sized vectors live, and how many it holds at once.

A :class:`VectorStore` holds the rows ``q_1 … q_n`` (each ``[P]``) of a Krylov basis
``Q = [q_1 … q_n]`` and does the few things a solver needs with them, each
*streamed* row by row (and, away from the compute device, in column blocks of
``chunk`` entries), so no ``[P, n]`` copy of the basis is ever made:

- ``Qᵀ W`` (:meth:`dots`) and ``W ← W − Q H`` (:meth:`subtract`) for a block ``W [P, b]``
  on the compute device, and classical Gram–Schmidt with them (:meth:`orthogonalise`), whose
  sweeps after the first are fused (:meth:`subtract_dots`: ``W ← W − Q H`` and ``Qᵀ W`` of the
  result in one pass over ``Q``), so ``p`` sweeps read the basis ``p + 1`` times, not ``2p``;
- ``Q ← Q S`` in place (:meth:`rotate`, thick restarts and Ritz vectors), column block
  by column block, with a temporary of at most ``P / 4`` entries;
- ``Q s`` for a few small ``s`` (:meth:`combine`).

Rows live (``where``) on the compute device (``"device"``, the default), in host memory
(``"cpu"``; page-locked when the compute device is CUDA, so copies overlap), or in
memory-mapped files in a directory (a path: ``--basis-dir``).  Each file is created
with a random name inside that directory, mapped, and unlinked at once: the mapping
keeps it alive while the solver runs, and nothing remains on disk when the process
ends, however it ends (normal exit, exception, Ctrl-C, even ``SIGKILL``).  Nothing is
written outside the directory.

On the CPU, rows on the device are walked in column blocks of :data:`CACHE_CHUNK` entries
(1 MiB of a float32 row), each block of ``W`` read once for all rows while it sits in cache;
the float32 partial sums of a block are added in float64, as in :mod:`.inner`.

Every vector a solver holds is counted in a :class:`VectorCount` (``live`` now, ``peak``
so far), in units of one parameter-sized vector; the first ``first_page`` rows share one
``[first_page, P]`` block so the solver's answer (``k`` Ritz vectors) is returned as a
view without a copy.
"""
from __future__ import annotations

import mmap
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from . import inner

#: ``c``: parameter-sized vectors a solver may hold beyond the ``k`` it returns
#: (docs/metrics.md, "Memory of the solvers").
WORK_VECTORS = 8
STREAM_CHUNK = 1 << 22  # entries per streamed column block away from the compute device (16 MiB in float32)
ROTATE_CHUNK = 1 << 21  # entries gathered and combined at a time by a rotation of rows on a CPU device (8 MiB in float32)
CACHE_CHUNK = 1 << 18  # entries per column block of rows on a CPU device (the rows' blocks stay in cache)
WHERE = ("device", "cpu")  # or a directory (memory-mapped files)


@dataclass
class VectorCount:
    """Parameter-sized vectors held by a solver: ``live`` now and the ``peak`` so far."""

    live: float = 0
    peak: float = 0
    events: list = field(default_factory=list, repr=False)

    def add(self, n: float) -> None:
        self.live += n
        self.peak = max(self.peak, self.live)

    def sub(self, n: float) -> None:
        self.live -= n

    def hold(self, n: float):
        """Context manager counting ``n`` vectors while it is open."""
        count = self

        class _Hold:
            def __enter__(self):
                count.add(n)

            def __exit__(self, *exc):
                count.sub(n)

        return _Hold()


def where_label(where) -> str:
    """``device``, ``cpu`` or ``dir:PATH`` (what a plan records)."""
    if where in (None, "device"):
        return "device"
    if where == "cpu":
        return "cpu"
    return f"dir:{Path(where)}"


class VectorStore:
    """Rows ``q_i [P]`` of a basis on ``where`` (module docstring), used from ``device``."""

    def __init__(self, P: int, dtype: torch.dtype, device: torch.device | str = "cpu", where=None,
                 count: VectorCount | None = None, first_page: int = 0, chunk: int | None = None):
        self.P = int(P)
        self.dtype = dtype
        self.device = torch.device(device)
        self.where = "device" if where in (None, "device") else where
        self.count = count if count is not None else VectorCount()
        self.first_page = int(first_page)
        self.chunk = max(1, int(chunk or STREAM_CHUNK))
        self.rows: list[Tensor] = []
        self._page: Tensor | None = None
        self._page_used = 0
        self._dir: Path | None = None
        if self.where not in WHERE:
            self._dir = Path(self.where)
            if not self._dir.is_dir():
                raise ValueError(f"basis directory {self._dir} does not exist (create it first)")
        self.files_made = 0

    # ------------------------------------------------------------ storage
    @property
    def local(self) -> bool:
        """Rows live on the compute device (no streaming)."""
        return self.where == "device" or (self.where == "cpu" and self.device.type == "cpu")

    @property
    def in_memory(self) -> bool:
        """Rows take the process's memory (not files): counted in :attr:`count`."""
        return self._dir is None

    def _new_rows(self, n: int) -> Tensor:
        """``[n, P]`` fresh rows on the storage."""
        if self._dir is not None:
            return self._mapped(n)
        if self.where == "cpu":
            pin = self.device.type == "cuda"
            return torch.empty(n, self.P, dtype=self.dtype, pin_memory=pin)
        return torch.empty(n, self.P, dtype=self.dtype, device=self.device)

    def _mapped(self, n: int) -> Tensor:
        """``[n, P]`` rows in a file of ``self._dir``, unlinked as soon as it is mapped."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        nbytes = max(1, n * self.P * itemsize)
        fd, path = tempfile.mkstemp(prefix=".sam-probe-basis-", suffix=".bin", dir=self._dir)
        try:
            os.ftruncate(fd, nbytes)
            buf = mmap.mmap(fd, nbytes)
        finally:
            os.close(fd)
            os.unlink(path)
        self.files_made += 1
        return torch.frombuffer(buf, dtype=self.dtype, count=n * self.P).view(n, self.P)

    def _fresh(self) -> Tensor:
        """One new row ``[P]`` (from the first page while it lasts)."""
        if len(self.rows) < self.first_page:
            if self._page is None:
                self._page = self._new_rows(self.first_page)
                if self.in_memory:
                    self.count.add(self.first_page)
            row = self._page[len(self.rows)]
            return row
        if self.in_memory:
            self.count.add(1)
        return self._new_rows(1)[0]

    def _release(self, row: Tensor) -> None:
        if self.in_memory and not (self._page is not None and row.untyped_storage().data_ptr()
                                   == self._page.untyped_storage().data_ptr()):
            self.count.sub(1)

    def __len__(self) -> int:
        return len(self.rows)

    # -------------------------------------------------------------- rows
    def append(self, V: Tensor) -> None:
        """Append the columns of ``V [P, b]`` (or a row ``[P]``) as rows."""
        V = V if V.dim() == 2 else V.reshape(self.P, 1)  # (not reshape(P, -1): a rank's shard may be empty)
        for j in range(V.shape[1]):
            row = self._fresh()
            self._put(row, V[:, j])
            self.rows.append(row)

    def _put(self, row: Tensor, v: Tensor) -> None:
        if self.local:
            row.copy_(v)
            return
        for a in range(0, self.P, self.chunk):
            row[a:a + self.chunk].copy_(v[a:a + self.chunk], non_blocking=False)

    def row(self, i: int) -> Tensor:
        """Row ``i`` on the compute device (a view when local, else a copy: one vector)."""
        r = self.rows[i]
        return r if self.local else r.to(self.device)

    def _pieces(self):
        """Column blocks ``(a, b, [row[a:b] on device for each row])``: whole rows on an accelerator,
        :data:`CACHE_CHUNK` entries on a CPU device, :attr:`chunk` entries streamed from elsewhere."""
        if self.local:
            if self.device.type != "cpu" or self.P <= CACHE_CHUNK:
                yield 0, self.P, self.rows
                return
            for a in range(0, self.P, CACHE_CHUNK):
                b = min(a + CACHE_CHUNK, self.P)
                yield a, b, [r[a:b] for r in self.rows]
            return
        for a in range(0, self.P, self.chunk):
            yield a, min(a + self.chunk, self.P), [r[a:a + self.chunk].to(self.device, non_blocking=True)
                                                   for r in self.rows]

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` rows."""
        for r in self.rows[n:]:
            self._release(r)
        del self.rows[n:]

    def move(self, src: list[int], dst: int) -> None:
        """Move rows ``src`` (not in the first page) to positions ``dst, dst+1, …`` (list order only)."""
        moved = [self.rows[i] for i in src]
        rest = [r for i, r in enumerate(self.rows) if i not in set(src)]
        self.rows = rest[:dst] + moved + rest[dst:]

    def close(self) -> None:
        self.truncate(0)
        if self._page is not None and self.in_memory:
            self.count.sub(self.first_page)
        self._page = None

    # ------------------------------------------------------------ algebra
    def dots(self, W: Tensor, rows: int | None = None) -> Tensor:
        """``Q[:, :rows]ᵀ W`` for ``W [P, b]`` on the device: ``[rows, b]`` in the store's dtype."""
        n = len(self.rows) if rows is None else rows
        out = torch.zeros(n, W.shape[1], dtype=torch.float64, device=W.device)
        if n == 0:
            return out.to(W.dtype)
        for a, b, pieces in self._pieces():
            out += _block_dots(pieces[:n], W[a:b])
        return inner.allsum(out).to(W.dtype)  # summed over the shards of a model-sharded group (core/inner.py)

    def subtract(self, W: Tensor, H: Tensor) -> None:
        """``W ← W − Q[:, :n] H`` in place (``H [n, b]``)."""
        n = H.shape[0]
        if n == 0:
            return
        Hc = _coefficients(H, W)
        for a, b, pieces in self._pieces():
            _block_subtract(pieces[:n], W[a:b], Hc)

    def subtract_dots(self, W: Tensor, H: Tensor) -> Tensor:
        """``W ← W − Q[:, :n] H`` in place, then ``Q[:, :n]ᵀ W`` of the result (as :meth:`dots`), block by
        block in one pass over ``Q`` (each block of rows is read once for both)."""
        n = H.shape[0]
        out = torch.zeros(n, W.shape[1], dtype=torch.float64, device=W.device)
        if n == 0:
            return out.to(W.dtype)
        Hc = _coefficients(H, W)
        for a, b, pieces in self._pieces():
            Wp = W[a:b]
            _block_subtract(pieces[:n], Wp, Hc)
            out += _block_dots(pieces[:n], Wp)
        return inner.allsum(out).to(W.dtype)

    def orthogonalise(self, W: Tensor, passes: int = 2, first: Tensor | None = None) -> None:
        """``W ← (I − Q Qᵀ)^passes W`` in place by classical Gram–Schmidt sweeps (``passes ≥ 1``);
        ``first``: ``Qᵀ W`` when the caller has it already.  Reads ``Q`` ``passes + 1`` times (``passes``
        without ``first``)."""
        H = self.dots(W) if first is None else first
        for _ in range(passes - 1):
            H = self.subtract_dots(W, H)
        self.subtract(W, H)

    def combine(self, s: Tensor) -> Tensor:
        """``Q[:, :n] s`` for ``s [n]`` (one new vector on the device)."""
        s = s.to(device=self.device, dtype=self.dtype)
        out = torch.zeros(self.P, dtype=self.dtype, device=self.device)
        for a, b, pieces in self._pieces():
            for i in range(len(s)):
                out[a:b].add_(pieces[i], alpha=float(s[i]))
        return out

    def rotate(self, S: Tensor) -> None:
        """``Q[:, :n] ← Q[:, :n] S`` in place for ``S [n, m]``, ``m ≤ n``; rows ``m..n-1`` are
        dropped, rows after ``n`` (e.g. a pending block) kept after the new ones."""
        n, m = S.shape
        if m > n:
            raise ValueError("rotate keeps at most as many rows as it combines")
        S = S.to(dtype=self.dtype)
        Sd = S.to(self.device)
        # temporary: [n, c] gathered + [m, c] result, at most P / 4 entries together (and, on a CPU
        # device, about CACHE_CHUNK entries, so the gathered block is still in cache when it is used)
        step = max(1, self.P // (4 * (n + m)))
        if self.local and self.device.type == "cpu":
            step = min(step, max(1, ROTATE_CHUNK // (n + m)))
        gathered = result = None
        for a in range(0, self.P, step):
            b = min(a + step, self.P)
            if self.local:
                if gathered is None or gathered.shape[1] != b - a:
                    gathered = torch.empty(n, b - a, dtype=self.dtype, device=self.device)
                    result = torch.empty(m, b - a, dtype=self.dtype, device=self.device)
                block = torch.stack([r[a:b] for r in self.rows[:n]], out=gathered)  # [n, c]
                new = torch.matmul(Sd.T, block, out=result)  # [m, c]
            else:
                block = torch.stack([r[a:b] for r in self.rows[:n]]).to(self.device)
                new = Sd.T @ block
            for i in range(m):
                self.rows[i][a:b].copy_(new[i])
        for r in self.rows[m:n]:
            self._release(r)
        del self.rows[m:n]


def _block_dots(pieces: list[Tensor], Wp: Tensor) -> Tensor:
    """``[len(pieces), b]`` float64 ``rowᵀ Wp`` of one column block: for float32 rows and one column, one
    float32 (cascade) sum per row, added in float64 by the caller (as :mod:`.inner` does); otherwise
    :func:`~sam_probe.core.inner.local_gram` (float64 by BLAS, half rows in float32)."""
    if Wp.shape[1] == 1 and Wp.dtype == torch.float32 and all(p.dtype == torch.float32 for p in pieces):
        w = Wp[:, 0]
        buf = torch.empty_like(w)  # one block's products (1 MiB at most): no allocation per row
        return torch.stack([torch.mul(p, w, out=buf).sum() for p in pieces]).double()[:, None]
    return torch.stack([inner.local_gram(p, Wp) for p in pieces])


def _coefficients(H: Tensor, W: Tensor) -> Tensor | list[float]:
    """``H`` as :func:`_block_subtract` takes it: Python floats for one column (read once, not per block)."""
    return H[:, 0].tolist() if W.shape[1] == 1 else H.to(device=W.device, dtype=W.dtype)


def _block_subtract(pieces: list[Tensor], Wp: Tensor, H: Tensor | list[float]) -> None:
    """``Wp ← Wp − Σ_i row_i H[i]`` for one column block (``H``: :func:`_coefficients`)."""
    if isinstance(H, list):
        w = Wp[:, 0]
        for h, p in zip(H, pieces):
            w.add_(p, alpha=-h)
    else:
        for i, p in enumerate(pieces):
            Wp.addr_(p, H[i], alpha=-1)
