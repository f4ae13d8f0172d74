"""torch's own allow-listed constructors, bounded while sam-probe unpickles a checkpoint.

torch's ``weights_only`` allow-list is about *code*; several of its entries
still do work proportional to a number in the pickle rather than to the file:

- ``builtins.bytearray(n)`` zero-fills ``n`` bytes (10 bytes of pickle, 20 GB of
  memory);
- ``_rebuild_tensor*`` accept any size and stride over a storage, so one stored
  float can be a (2^20, 2^20) tensor of stride 0, which ``set(t)``,
  ``Counter(t)``, ``torch.Size(t)`` or ``_rebuild_device_tensor_from_cpu_tensor``
  (``t.to(...)``) then iterate or materialise; ``_rebuild_qtensor`` allocates its
  size before checking it against the storage;
- tensor classes (``torch.FloatTensor(n)``) and ``torch.UntypedStorage(n)`` give
  tensors over uninitialised memory, whose bytes would then be shown as
  hyper-parameters;
- nested tensors and data-less wrapper subclasses take offsets and sizes that
  torch does not check against their buffer; sam-probe refuses them.

During a load, :class:`Guard` swaps those entries for checking versions (the
module attribute ``_get_allowed_globals`` of torch's restricted unpickler is
pointed at a copy of its table with the replacements; restored afterwards):
a tensor's size and stride must have no zero strides on dimensions longer than
one and no overlapping entries, and must fit in its storage, which must hold
bytes from the file (storages made by the loader are registered as *backed*);
``set``/``Counter``/``torch.Size``/``bytearray`` take only the argument types a
pickle of those objects contains.  After unpickling, tensors whose data are not
from the file become :class:`UnbuiltTensor` placeholders.
"""
from __future__ import annotations

import threading
from collections import Counter
from typing import Any

from .files import RefusedFile
from .placeholders import Placeholder

MAX_NDIM = 64
_LOCK = threading.RLock()
_ENCODINGS = {"latin-1", "latin1", "ascii", "utf-8", "utf8"}


def strided_problem(size: Any, stride: Any) -> str | None:
    """Why a (size, stride) pair is refused, or ``None``: not integers, zero or overlapping strides."""
    if len(size) != len(stride) or len(size) > MAX_NDIM:
        return f"has a size and stride of different lengths or more than {MAX_NDIM} dimensions"
    if not all(type(n) is int and n >= 0 for n in size) or not all(type(s) is int for s in stride):
        return "has a size or stride that is not made of non-negative integers"
    shape, strides = tuple(size), tuple(stride)
    dims = sorted((s, n) for n, s in zip(shape, strides) if n > 1)
    if any(s < 0 for s, _ in dims):
        return f"has a negative stride (shape {shape}, stride {strides})"
    if any(s == 0 for s, _ in dims):
        return f"has a zero stride (shape {shape}, stride {strides}: an expanded view, many entries stored once)"
    reach = 0
    for s, n in dims:
        if s <= reach:
            return f"has overlapping entries (shape {shape}, stride {strides})"
        reach += (n - 1) * s
    return None


def span(size: Any, stride: Any) -> int:
    """Storage elements from a tensor's offset to its last entry (0 when it has none)."""
    if any(n == 0 for n in size):
        return 0
    return 1 + sum((n - 1) * abs(s) for n, s in zip(size, stride))


class UnbuiltTensor(Placeholder):
    """A tensor the pickle made from something other than the file's data (never read)."""

    _sam_probe_global = "torch.Tensor"

    def __repr__(self) -> str:
        return f"<{self.args[0] if self.args else 'tensor not rebuilt'}>"

    def plain(self) -> Any:
        return repr(self)


class Guard:
    """The replacements of one load and the storages it made from the file."""

    def __init__(self):
        self.backed: set[int] = set()
        self._saved: list[Any] = []

    # ---------------------------------------------------------------- storages and tensors
    def back(self, typed_storage: Any) -> Any:
        """Register a storage made from the file's bytes; return it."""
        self.backed.add(typed_storage._untyped_storage.data_ptr())
        return typed_storage

    def _check(self, storage: Any, offset: Any, size: Any, stride: Any) -> None:
        import torch

        if not isinstance(storage, torch.storage.TypedStorage) or storage._untyped_storage.data_ptr() not in self.backed:
            if not (isinstance(storage, torch.storage.TypedStorage) and storage._untyped_storage.nbytes() == 0):
                raise RefusedFile("its pickle builds a tensor over storage that is not the file's data")
        if not isinstance(size, (tuple, list)) or not isinstance(stride, (tuple, list)) or type(offset) is not int:
            raise RefusedFile("its pickle builds a tensor whose size, stride or offset is malformed")
        problem = strided_problem(size, stride)
        if problem:
            raise RefusedFile(f"its pickle builds a tensor that {problem}; sam-probe only reads tensors whose "
                              "entries are stored separately (re-save it with .contiguous())")
        if offset < 0 or offset + span(size, stride) > storage._size():
            raise RefusedFile("corrupt: a tensor's size and stride need more bytes than its storage holds; re-save "
                              "or re-copy it")

    def is_backed(self, t: Any) -> bool:
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse and other storage-less layouts keep their checks
            return True
        return storage.nbytes() == 0 or storage.data_ptr() in self.backed or t.device.type == "meta"

    @staticmethod
    def constructs_tensors(names: set[str]) -> bool:
        """Whether a pickle naming ``names`` can make tensors that are not over the file's storages."""
        import torch

        classes = {f"{t.__module__}.{t.__name__}" for t in torch._tensor_classes}
        return bool(names & (classes | {"torch.Tensor", "torch.nn.parameter.Parameter", "torch.storage.UntypedStorage",
                                        "torch._tensor._rebuild_from_type_v2"}))

    def pick(self, obj: Any) -> Any:
        """For :func:`.objgraph.replace_all`: a placeholder for a tensor not made from the file."""
        import torch

        if isinstance(obj, torch.Tensor) and not self.is_backed(obj):
            return UnbuiltTensor(f"tensor {tuple(obj.shape)} not rebuilt: its data is not in the file (the pickle "
                                 "constructs it)")
        return None

    # ---------------------------------------------------------------- the replaced allow-list entries
    def table(self) -> dict[str, Any]:
        """torch's allow-list with the checking replacements."""
        import torch
        from torch import _utils as tu
        from torch import _weights_only_unpickler as wou

        guard = self

        def checked(original):
            def rebuild(storage, storage_offset, size, stride, *rest):
                guard._check(storage, storage_offset, size, stride)
                return original(storage, storage_offset, size, stride, *rest)
            rebuild.__name__ = rebuild.__qualname__ = original.__name__  # torch's messages name it
            return rebuild

        def from_cpu_tensor(data, dtype, device, requires_grad):
            if not isinstance(data, torch.Tensor) or not guard.is_backed(data) or not isinstance(dtype, torch.dtype):
                raise RefusedFile("its pickle converts something that is not a tensor from the file")
            out = data.to(dtype=dtype)  # sam-probe loads onto the CPU
            out.requires_grad = bool(requires_grad)
            guard.backed.add(out.untyped_storage().data_ptr())
            return out

        def plain_set(*args):
            if args and not (len(args) == 1 and type(args[0]) in (list, tuple, set, frozenset)):
                raise RefusedFile("its pickle builds a set from something other than a list")
            return set(*args)

        def plain_counter(*args):
            if args and not (len(args) == 1 and type(args[0]) is dict):
                raise RefusedFile("its pickle builds a Counter from something other than a dict")
            return Counter(*args)

        def plain_size(*args):
            if args and not (len(args) == 1 and type(args[0]) in (tuple, list)
                             and all(type(n) is int for n in args[0])):
                raise RefusedFile("its pickle builds a torch.Size from something other than integers")
            return torch.Size(*args)

        def plain_bytearray(*args):
            ok = not args or (len(args) == 1 and type(args[0]) in (bytes, bytearray)) or (
                len(args) == 2 and type(args[0]) is str and type(args[1]) is str and args[1].lower() in _ENCODINGS)
            if not ok:
                raise RefusedFile("its pickle asks for a bytearray from a size or another object (an allocation "
                                  "bomb?); refusing it", "limit")
            return bytearray(*args)

        def refuse(what: str):
            def unsupported(*args, **kwargs):
                raise RefusedFile(f"it holds {what}, which sam-probe does not read", "unsupported")
            return unsupported

        for fn, name in ((from_cpu_tensor, "_rebuild_device_tensor_from_cpu_tensor"), (plain_set, "set"),
                         (plain_counter, "Counter"), (plain_size, "Size"), (plain_bytearray, "bytearray")):
            fn.__name__ = fn.__qualname__ = name  # torch's messages name the function the pickle called
        table = dict(wou._get_allowed_globals.__wrapped__() if hasattr(wou._get_allowed_globals, "__wrapped__")
                     else wou._get_allowed_globals())
        table.update({f"torch._utils.{f.__name__}": checked(f) for f in (
            tu._rebuild_tensor, tu._rebuild_tensor_v2, tu._rebuild_tensor_v3, tu._rebuild_qtensor)})
        table.update({
            "torch._utils._rebuild_device_tensor_from_cpu_tensor": from_cpu_tensor,
            "builtins.set": plain_set, "collections.Counter": plain_counter, "torch.Size": plain_size,
            "builtins.bytearray": plain_bytearray,
            "torch._utils._rebuild_nested_tensor": refuse("nested tensors"),
            "torch._utils._rebuild_wrapper_subclass": refuse("tensor subclasses without data"),
        })
        return table

    def __enter__(self) -> "Guard":
        from torch import _weights_only_unpickler as wou

        _LOCK.acquire()
        try:
            table = self.table()
        except BaseException:
            _LOCK.release()
            raise
        self._saved.append(wou._get_allowed_globals)
        wou._get_allowed_globals = lambda: table
        return self

    def __exit__(self, *exc: Any) -> None:
        from torch import _weights_only_unpickler as wou

        wou._get_allowed_globals = self._saved.pop()
        _LOCK.release()
