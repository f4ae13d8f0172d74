"""The samples an objective averages over, delivered in chunks.

A *sample* is ``(x, y)``: ``x`` a tensor or a dict of tensors (``input_ids``,
``attention_mask``, ``labels``, ... passed to the model as keyword arguments),
``y`` a tensor or ``None`` (token-only data, or labels inside ``x``).  A *chunk*
is the same with a leading batch dimension.  Three sources, one interface:

- :class:`TensorBatches`: everything in memory; chunks are slices.
- :class:`DatasetBatches`: a map-style ``Dataset`` (``__len__``/``__getitem__``)
  and the selected positions; each chunk fetches and collates its items.
- :class:`StreamBatches`: an iterable (``IterableDataset``) re-read from its
  start on every pass; each pass keeps the items at the selected positions and
  yields them in chunks.

Only the selected positions (one int64 per sample) are stored for the last two:
memory is O(chunk) whatever the data size.  ``slices(lo, hi, size)`` yields the
selection's positions ``lo..hi-1`` in consecutive chunks of ``size``;
``take(index)`` is the sub-selection at ``index`` (positions of this selection).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import SpecError

Batch = Any  # Tensor | dict[str, Tensor]
Chunk = tuple[Batch, "Tensor | None"]


class DataError(SpecError, ValueError):
    """Items that cannot be batched (ragged shapes, non-numeric values, a shrinking stream)."""


# ----------------------------------------------------------------- pytrees
def batch_len(x: Batch) -> int:
    """Leading dimension of a tensor or of a dict's tensors."""
    if isinstance(x, Mapping):
        for v in x.values():
            if isinstance(v, Tensor):
                return int(v.shape[0])
        raise DataError("a batch dict holds no tensors")
    return int(x.shape[0])


def index_batch(x: Batch, index: Any) -> Batch:
    """``x[index]`` for a tensor or every tensor of a dict."""
    if x is None:
        return None
    if isinstance(x, Mapping):
        return {k: v[index] if isinstance(v, Tensor) else v for k, v in x.items()}
    return x[index]


def map_tensors(x: Batch, fn: Callable[[Tensor], Tensor]) -> Batch:
    if x is None:
        return None
    if isinstance(x, Mapping):
        return {k: fn(v) if isinstance(v, Tensor) else v for k, v in x.items()}
    return fn(x)


def cast(x: Batch, device: torch.device, dtype: torch.dtype) -> Batch:
    """To ``device``; floating tensors to ``dtype`` (integer and bool tensors keep theirs)."""
    def one(t: Tensor) -> Tensor:
        return t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)
    return map_tensors(x, one)


# ------------------------------------------------------------------ items
def _as_tensor(v: Any, what: str) -> Tensor:
    if isinstance(v, Tensor):
        return v
    try:
        a = np.asarray(v)
    except Exception:  # noqa: BLE001
        raise DataError(f"{what} is not numeric ({type(v).__name__})") from None
    if a.dtype == object or a.dtype.kind in "USV":
        raise DataError(f"{what} is not numeric ({type(v).__name__}, dtype {a.dtype})")
    return torch.as_tensor(a)


def split_item(item: Any) -> tuple[Any, Any]:
    """``(x, y)`` of one dataset item: a pair, a 1-tuple or tensor (``y = None``), or a dict (``y = None``)."""
    if isinstance(item, Mapping):
        return item, None
    if isinstance(item, (tuple, list)):
        if len(item) == 2:
            return item[0], item[1]
        if len(item) == 1:
            return item[0], None
        raise DataError(f"dataset items must be (x, y), x or a dict; got a {len(item)}-tuple")
    return item, None


def _stack(values: Sequence[Any], what: str) -> Tensor:
    ts = [_as_tensor(v, what) for v in values]
    shapes = {tuple(t.shape) for t in ts}
    if len(shapes) > 1:
        raise DataError(f"{what} has items of different shapes {sorted(shapes)[:3]}; pad them to one length "
                        "(or return a DataLoader with a collate_fn that pads)")
    return torch.stack(ts)


def collate(items: Sequence[Any]) -> Chunk:
    """Stack items ``(x, y)`` / ``x`` / ``{key: value}`` into one chunk (non-numeric dict values are dropped)."""
    pairs = [split_item(it) for it in items]
    xs = [p[0] for p in pairs]
    if isinstance(xs[0], Mapping):
        keys = [k for k in xs[0] if _numeric(xs[0][k])]
        x: Batch = {k: _stack([d[k] for d in xs], f"item field {k!r}") for k in keys}
        if not x:
            raise DataError(f"dataset items hold no numeric fields (keys: {', '.join(map(str, xs[0]))})")
    else:
        x = _stack(xs, "inputs")
    ys = [p[1] for p in pairs]
    y = None if all(v is None for v in ys) else _stack(ys, "targets")
    return x, y


def _numeric(v: Any) -> bool:
    if isinstance(v, Tensor):
        return True
    if isinstance(v, (str, bytes)):
        return False
    try:
        a = np.asarray(v)
    except Exception:  # noqa: BLE001
        return False
    return a.dtype != object and a.dtype.kind not in "USV"


def as_chunk(batch: Any) -> Chunk:
    """A ready batch (from a user ``collate_fn``): ``(x, y)``, a tensor, or a dict."""
    x, y = split_item(batch)
    if isinstance(x, Mapping):
        x = {k: _as_tensor(v, f"field {k!r}") for k, v in x.items() if _numeric(v)}
    elif x is not None:
        x = _as_tensor(x, "inputs")
    return x, (None if y is None else _as_tensor(y, "targets"))


# ---------------------------------------------------------------- sources
class Batches:
    """Interface of a sample source (see module docstring)."""

    streamed = False
    n: int

    def __len__(self) -> int:
        return self.n

    def slices(self, lo: int, hi: int, size: int) -> Iterator[Chunk]:
        raise NotImplementedError

    def take(self, index: Tensor) -> "Batches":
        raise NotImplementedError

    def first(self, k: int = 1) -> Chunk:
        """The first ``k`` samples as one chunk (e.g. to check that the model takes them)."""
        return next(iter(self.slices(0, min(k, self.n), k)))


class TensorBatches(Batches):
    """In-memory ``x`` (tensor or dict of tensors) and ``y`` (tensor or ``None``)."""

    def __init__(self, x: Batch, y: Tensor | None = None):
        self.x, self.y = x, y
        self.n = batch_len(x)
        if isinstance(x, Mapping):
            bad = [k for k, v in x.items() if isinstance(v, Tensor) and len(v) != self.n]
            if bad:
                raise DataError(f"fields {bad} do not have {self.n} rows like the others")
        if y is not None and len(y) != self.n:
            raise DataError(f"{self.n} inputs but {len(y)} targets")

    def slices(self, lo: int, hi: int, size: int) -> Iterator[Chunk]:
        for s in range(lo, hi, size):
            e = min(s + size, hi)
            yield index_batch(self.x, slice(s, e)), (None if self.y is None else self.y[s:e])

    def take(self, index: Tensor) -> "TensorBatches":
        index = torch.as_tensor(index)
        xi = index_batch(self.x, index.to(_device_of(self.x)))
        yi = None if self.y is None else self.y[index.to(self.y.device)]
        return TensorBatches(xi, yi)

    def cast(self, device: torch.device, dtype: torch.dtype) -> "TensorBatches":
        return TensorBatches(cast(self.x, device, dtype), None if self.y is None else cast(self.y, device, dtype))


def _device_of(x: Batch) -> torch.device:
    if isinstance(x, Mapping):
        return next(v for v in x.values() if isinstance(v, Tensor)).device
    return x.device


class DatasetBatches(Batches):
    """A map-style dataset at ``positions``; items collated by ``collate_fn`` (default :func:`collate`)."""

    streamed = True

    def __init__(self, dataset: Any, positions: Tensor | None = None, collate_fn: Callable | None = None):
        self.dataset = dataset
        self.positions = torch.arange(len(dataset)) if positions is None else torch.as_tensor(positions).long()
        self.collate_fn = collate_fn
        self.n = len(self.positions)

    def _collate(self, items: list[Any]) -> Chunk:
        return collate(items) if self.collate_fn is None else as_chunk(self.collate_fn(items))

    def slices(self, lo: int, hi: int, size: int) -> Iterator[Chunk]:
        pos = self.positions.tolist()
        for s in range(lo, hi, size):
            yield self._collate([self.dataset[i] for i in pos[s:min(s + size, hi)]])

    def take(self, index: Tensor) -> "DatasetBatches":
        return DatasetBatches(self.dataset, self.positions[torch.as_tensor(index).cpu().long()], self.collate_fn)


class StreamBatches(Batches):
    """An iterable re-read from the start on every pass, keeping the items at sorted ``positions``.

    ``total`` is the stream's length (items per pass); a pass that ends early is an error.
    """

    streamed = True

    def __init__(self, iterable: Iterable, total: int, positions: Tensor | None = None,
                 collate_fn: Callable | None = None):
        self.iterable, self.total = iterable, int(total)
        self.positions = torch.arange(self.total) if positions is None else torch.as_tensor(positions).long()
        self.collate_fn = collate_fn
        self.n = len(self.positions)

    def _collate(self, items: list[Any]) -> Chunk:
        return collate(items) if self.collate_fn is None else as_chunk(self.collate_fn(items))

    def slices(self, lo: int, hi: int, size: int) -> Iterator[Chunk]:
        if lo >= hi:
            return
        wanted = self.positions[lo:hi].tolist()
        j, buf = 0, []
        for i, item in enumerate(self.iterable):
            if i < wanted[j]:
                continue
            buf.append(item)
            j += 1
            if len(buf) == size or j == len(wanted):
                yield self._collate(buf)
                buf = []
            if j == len(wanted):
                return
        raise DataError(f"the data stream ended after {i + 1 if 'i' in locals() else 0} items, but "
                        f"{self.total} were counted; an iterable dataset must yield the same items on every pass")

    def take(self, index: Tensor) -> "StreamBatches":
        idx = torch.as_tensor(index).cpu().long()
        pos = self.positions[idx]
        if len(pos) > 1 and not bool((pos[1:] > pos[:-1]).all()):
            order = torch.argsort(pos)
            if not torch.equal(pos[order], torch.unique(pos)):
                raise DataError("a streamed selection cannot repeat a sample")
            pos = pos[order]  # a stream is read in order; losses are sums, so the order is immaterial
        return StreamBatches(self.iterable, self.total, pos, self.collate_fn)


def count_items(iterable: Iterable) -> int:
    """Items in one pass over ``iterable`` (nothing is kept)."""
    n = 0
    for _ in iterable:
        n += 1
    return n
