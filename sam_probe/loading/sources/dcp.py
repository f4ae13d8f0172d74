"""Source ``dcp``: a ``torch.distributed.checkpoint`` folder (``.metadata`` + ``__<rank>_<n>.distcp``).

``torch.distributed.checkpoint.save`` (FSDP, torchtitan, Accelerate, ...) writes one
folder per checkpoint: ``.metadata``, a pickle of DCP's ``Metadata`` naming every
saved item and where its bytes lie, and one or more ``.distcp`` files holding the
items one after another, each item a ``torch.save`` zip archive:

- ``state_dict_metadata``: ``{fqn: TensorStorageMetadata(properties(dtype, ...), size,
  chunks=[ChunkStorageMetadata(offsets, sizes)])}`` (each rank's piece of a tensor is
  one chunk) or ``BytesStorageMetadata()`` for anything that is not a tensor;
- ``storage_data``: ``{MetadataIndex(fqn, offset, index): _StorageInfo(relative_path,
  offset, length)}``, where each chunk's archive lies;
- ``planner_data``: ``{fqn: path}``, the keys of the nested state dict a flat ``fqn``
  came from (``model.fc.weight`` <- ``('model', 'fc.weight')``).

Nothing DCP pickled is imported or called.  ``.metadata`` is protocol 4, which
torch's restricted unpickler does not read, so it is read here by a small inert
interpreter (:func:`read_metadata`): a fixed set of opcodes, at most ``MAX_METADATA``
bytes and ``MAX_OPS`` opcodes; the classes it names become inert placeholders
(:mod:`..placeholders`), ``torch.<dtype>`` names map to dtypes from a fixed table,
code-running globals (``os.system``, ``builtins.eval``) refuse the folder, and any
other global is refused as not DCP's.  Every field is then validated: types and
ranges; each chunk inside its tensor and the chunks tiling it exactly (no overlap,
no gap); every ``relative_path`` a plain file name of a regular file in the folder
(not a link); every item inside its file, items not overlapping; every chunk's
bytes (entries x item size) within its item's length -- all before anything is
allocated, so the tensors built are bounded by the bytes the files hold.

Each item is read by the restricted torch loader (:mod:`..safe_pickle`) from a copy
of its byte range, its archive's CRCs verified on that copy, and must hold a dense
tensor of exactly its chunk's dtype and shape.  Each ``.distcp`` file is read in one
pass in file order: the bytes of the items used are copied once, and the sha256 of
the file is computed over those copies and the bytes between them (so the digest
and the CRC checks come from the same bytes); the non-finite scan is of the
assembled tensors.

The model part of a nested state dict is kept: the entries under ``model`` (or
``--key NAME``) when the state dict had one (torchtitan, FSDP ``get_state_dict``
saved as ``{'model': ..., 'optim': ...}``), else the top-level tensors without
``optimizer`` / ``optim`` / ``lr_scheduler`` / ``dataloader`` / ``train_state``.
The step is the saved ``step`` / ``global_step`` / ``train_state.step`` item, else
the folder name (``step-100``, ``global_step100``); ``hparams['lr']`` is the first
parameter group's ``lr`` of the saved optimizer state, when there is one.
:func:`read_rows` reads only the rows one FSDP rank needs (:func:`rank_rows`),
opening only the items that hold them.  :func:`load_lazy` (``--shard-model``)
validates the folder as :func:`load` does but reads no tensor: its state holds
meta tensors and ``ck.lazy`` reads each rank's rows when it fills its shards
(what is verified then, and how the digest is computed: its docstring).
"""
from __future__ import annotations

import hashlib
import io
import math
import mmap
import os
import pickletools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import CheckpointError
from ..files import MappedFile, RefusedFile, display, map_file, printable
from .base import FOLDER, Source

METADATA = ".metadata"
ACCELERATE_MODEL = "pytorch_model_fsdp_0"  # Accelerate / Trainer FSDP SHARDED_STATE_DICT: checkpoint-N/pytorch_model_fsdp_0/
SUFFIX = ".distcp"
MAX_METADATA = 64 * 2**20  # bytes of .metadata
MAX_OPS = 32_000_000  # opcodes of .metadata (a 256-rank save of a large model holds ~10M)
MAX_ITEMS = 2**20  # entries of state_dict_metadata / storage_data
MAX_CHUNKS = 2**22  # chunks over all tensors
MAX_CELLS = 2**24  # cells of the grids the chunks are checked on (all tensors)
MAX_NDIM = 64
MAX_TUPLE_DEPTH = 64
MAX_FILES = 100_000
MAX_LISTED = 100
STATE_TOPS = ("model", "model_state_dict", "state_dict", "module", "ema")
NON_MODEL_TOPS = frozenset({"optimizer", "optim", "optimizers", "optimizer_state_dict", "lr_scheduler",
                            "lr_schedulers", "scheduler", "dataloader", "train_state", "rng", "rng_state",
                            "extra_state", "data_loader"})
STEP_ITEMS = ("step", "global_step", "train_state.step", "iteration", "train_state.global_step")

DTYPES = ("float32", "float64", "float16", "bfloat16", "complex64", "complex128", "int8", "uint8", "int16",
          "int32", "int64", "bool", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
          "uint16", "uint32", "uint64", "complex32")
_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
                "torch.distributed.checkpoint._extension", "torch.distributed.checkpoint.storage",
                "torch.distributed._shard.sharded_tensor.metadata")  # where torch <= 2.1 kept TensorProperties
_INERT = frozenset({"torch.Size", "torch.serialization._get_layout", "torch.strided", "torch.contiguous_format",
                    "torch.preserve_format", "torch.channels_last", "torch.channels_last_3d", "pathlib.PosixPath",
                    "pathlib.WindowsPath", "pathlib.PurePosixPath", "pathlib.PureWindowsPath", "pathlib.Path",
                    "collections.OrderedDict"})


class _Bad(Exception):
    pass


def _need(ok: bool, why: str) -> None:
    if not ok:
        raise _Bad(why)


# ------------------------------------------------------------------ the inert .metadata interpreter
@dataclass(frozen=True)
class _Dtype:
    name: str  # a torch dtype's name from DTYPES (resolved with getattr(torch, name) only after validation)


_MARK = object()


def _global(name: str) -> Any:
    """What a global the metadata names becomes: a placeholder class, a dtype marker, or a refusal."""
    from ..placeholders import is_dangerous, make_placeholder, python3_name

    name = python3_name(name)
    module, _, attr = name.rpartition(".")
    if module == "torch" and attr in DTYPES:
        return _Dtype(attr)
    if name in _INERT or module in _DCP_MODULES:
        return make_placeholder(name)  # inert: calling it records its arguments
    if is_dangerous(name):
        from ..safe_pickle import UnsafePickleError

        raise UnsafePickleError(name)
    raise RefusedFile(f"its pickle names {name[:120]}, which a torch.distributed.checkpoint .metadata never "
                      "names; nothing was executed", "unsupported")


def _hashable(v: Any) -> Any:
    from ..placeholders import Placeholder

    if isinstance(v, (str, int, float, bool, type(None), _Dtype, Placeholder)):
        return v
    if type(v) is tuple:
        for x in v:
            _hashable(x)
        return v
    raise RefusedFile("its pickle uses a mutable value as a dictionary key", "corrupt")


def read_metadata(data: bytes) -> Any:
    """The object a DCP ``.metadata`` pickle holds, built inertly (module docstring); :class:`RefusedFile`."""
    from ..placeholders import Placeholder

    if len(data) > MAX_METADATA:
        raise RefusedFile(f".metadata is {len(data):,} bytes, more than the {MAX_METADATA // 2**20} MiB sam-probe "
                          "reads", "limit")
    stack: list[Any] = []
    marks: list[int] = []
    memo: dict[int, Any] = {}
    depth: dict[int, tuple[Any, int]] = {}  # id(tuple) -> (tuple, nesting depth); tuples kept alive here
    n_globals = 0

    def tup(items: list) -> tuple:
        d = 1 + max((depth.get(id(x), (None, 0))[1] for x in items if type(x) is tuple), default=0)
        if d > MAX_TUPLE_DEPTH:
            raise RefusedFile("its pickle nests tuples too deeply", "limit")
        t = tuple(items)
        depth[id(t)] = (t, d)
        return t

    def pop_mark() -> list:
        if not marks:
            raise RefusedFile("its pickle is malformed (no mark)")
        at = marks.pop()
        items = stack[at:]
        del stack[at:]
        return items

    def pop() -> Any:
        if not stack:
            raise RefusedFile("its pickle is malformed (empty stack)")
        v = stack.pop()
        if v is _MARK:
            raise RefusedFile("its pickle is malformed (mark)")
        return v

    try:
        arg: Any
        for n, (op, arg, _) in enumerate(pickletools.genops(io.BytesIO(data))):
            if n >= MAX_OPS:
                raise RefusedFile(f"its pickle has more than {MAX_OPS:,} opcodes", "limit")
            name = op.name
            if name in ("PROTO", "FRAME"):
                continue
            if name == "STOP":
                if len(stack) != 1 or marks:
                    raise RefusedFile("its pickle is malformed (stack at STOP)")
                return stack[0]
            if name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "BININT", "BININT1", "BININT2",
                        "BINFLOAT", "SHORT_BINBYTES", "BINBYTES"):
                stack.append(arg)
            elif name == "LONG1":
                if not -2**63 <= arg < 2**64:
                    raise RefusedFile("its pickle holds an integer too large for a size or offset", "limit")
                stack.append(arg)
            elif name == "NONE":
                stack.append(None)
            elif name in ("NEWTRUE", "NEWFALSE"):
                stack.append(name == "NEWTRUE")
            elif name == "EMPTY_TUPLE":
                stack.append(())
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                k = int(name[-1])
                items = [pop() for _ in range(k)][::-1]
                stack.append(tup(items))
            elif name == "MARK":
                marks.append(len(stack))
                stack.append(_MARK)
            elif name == "TUPLE":
                items = pop_mark()[1:]
                stack.append(tup(items))
            elif name == "EMPTY_LIST":
                stack.append([])
            elif name == "EMPTY_DICT":
                stack.append({})
            elif name == "EMPTY_SET":
                stack.append(set())
            elif name in ("APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS"):
                items = [pop()] if name == "APPEND" else [pop(), pop()][::-1] if name == "SETITEM" else pop_mark()[1:]
                target = stack[-1] if stack else None
                if name in ("APPEND", "APPENDS") and type(target) is list:
                    target.extend(items)
                elif name in ("SETITEM", "SETITEMS") and type(target) is dict and len(items) % 2 == 0:
                    for k, v in zip(items[::2], items[1::2]):
                        target[_hashable(k)] = v
                elif name == "ADDITEMS" and type(target) is set:
                    target.update(_hashable(v) for v in items)
                else:
                    raise RefusedFile(f"its pickle uses {name} on a {type(target).__name__}", "unsupported")
            elif name in ("MEMOIZE", "BINPUT", "LONG_BINPUT"):
                if not stack or stack[-1] is _MARK:
                    raise RefusedFile("its pickle is malformed (memo)")
                memo[len(memo) if name == "MEMOIZE" else int(arg)] = stack[-1]
            elif name in ("BINGET", "LONG_BINGET"):
                if arg not in memo:
                    raise RefusedFile("its pickle is malformed (memo)")
                stack.append(memo[arg])
            elif name in ("STACK_GLOBAL", "GLOBAL"):
                if name == "GLOBAL":
                    full = str(arg).replace(" ", ".")
                else:
                    attr, module = pop(), pop()
                    if type(attr) is not str or type(module) is not str:
                        raise RefusedFile("its pickle is malformed (global)")
                    full = f"{module}.{attr}"
                n_globals += 1
                if n_globals > MAX_OPS // 4:
                    raise RefusedFile("its pickle names too many globals", "limit")
                stack.append(_global(full))
            elif name in ("REDUCE", "NEWOBJ"):
                args, cls = pop(), pop()
                if not (isinstance(cls, type) and issubclass(cls, Placeholder)) or type(args) is not tuple:
                    raise RefusedFile(f"its pickle calls {getattr(cls, '_sam_probe_global', type(cls).__name__)}, "
                                      "which a DCP .metadata never calls; nothing was executed", "unsupported")
                stack.append(cls.__new__(cls, *args))  # Placeholder.__new__: records the arguments
            elif name == "BUILD":
                state, obj = pop(), stack[-1] if stack else None
                if not isinstance(obj, Placeholder):
                    raise RefusedFile("its pickle sets the state of something that is not an object", "unsupported")
                object.__setattr__(obj, "state", state)
            else:
                raise RefusedFile(f"its pickle uses opcode {name}, which a DCP .metadata does not", "unsupported")
    except RefusedFile:
        raise
    except Exception as exc:  # noqa: BLE001 - truncated or malformed opcode arguments
        raise RefusedFile(f"its pickle is malformed or truncated ({type(exc).__name__})") from None
    raise RefusedFile("its pickle is truncated (no STOP)")


# ------------------------------------------------------------------ validating the metadata
@dataclass(frozen=True)
class Chunk:
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str  # relative_path: a plain file name in the folder
    start: int  # the item's bytes in that file
    length: int


@dataclass(frozen=True)
class TensorMeta:
    dtype: str
    size: tuple[int, ...]
    chunks: tuple[Chunk, ...]


@dataclass(frozen=True)
class Item:
    file: str
    start: int
    length: int


@dataclass
class Layout:
    """The validated metadata: tensors by fqn, other items by fqn, and the nested key path of every fqn."""

    tensors: dict[str, TensorMeta]
    objects: dict[str, Item]
    paths: dict[str, tuple[str, ...]]


def _label(obj: Any) -> str:
    return str(getattr(type(obj), "_sam_probe_global", type(obj).__name__))


def _is(obj: Any, cls: str) -> bool:
    from ..placeholders import Placeholder

    return isinstance(obj, Placeholder) and _label(obj).rsplit(".", 1)[-1] == cls \
        and _label(obj).startswith(_DCP_MODULES)


def _fields(obj: Any, what: str) -> dict[str, Any]:
    """A dataclass placeholder's fields: its BUILD state (a dict, or ``(dict | None, slots dict)``)."""
    st = obj.state
    if type(st) is tuple and len(st) == 2 and (st[0] is None or type(st[0]) is dict) and type(st[1]) is dict:
        st = {**(st[0] or {}), **st[1]}
    _need(type(st) is dict and all(type(k) is str for k in st), f"a {what} has no fields")
    return st


def _int(v: Any, what: str, hi: int = 2**62) -> int:
    _need(type(v) is int and 0 <= v < hi, f"{what} is not an integer in [0, {hi})")
    return v


def _size(v: Any, what: str) -> tuple[int, ...]:
    from ..placeholders import Placeholder

    if isinstance(v, Placeholder) and _label(v) == "torch.Size":
        args = getattr(v, "args", None)
        v = args[0] if type(args) is tuple and len(args) == 1 else None
    _need(type(v) in (tuple, list) and len(v) <= MAX_NDIM, f"{what} is not a list of sizes")
    return tuple(_int(d, what, 2**48) for d in v)


def _dtype(props: Any, fqn: str) -> str:
    d: Any = None
    if _is(props, "TensorProperties"):
        st = props.state
        d = st[0] if type(st) is tuple and st else st.get("dtype") if type(st) is dict else None
    _need(isinstance(d, _Dtype), f"tensor {fqn[:80]} has no dtype sam-probe knows")
    return d.name


def _plain_name(name: Any) -> str:
    _need(type(name) is str and 0 < len(name) <= 255 and name not in (".", "..") and "/" not in name
          and "\\" not in name and "\0" not in name and not os.path.isabs(name),
          f"relative_path {str(name)[:80]!r} is not a plain file name in the folder")
    _need(name.endswith(SUFFIX), f"relative_path {name[:80]!r} is not a {SUFFIX} file")
    return name


def _covers(size: tuple[int, ...], chunks: list[tuple[tuple[int, ...], tuple[int, ...]]], fqn: str,
            budget: list[int]) -> None:
    """The chunks lie inside the tensor and tile it: no overlap, no gap (checked on the grid of their edges;
    ``budget[0]``: grid cells left for the whole folder)."""
    import torch

    numel = math.prod(size)
    for off, sz in chunks:
        _need(len(off) == len(size) and len(sz) == len(size), f"a chunk of {fqn[:80]} has the wrong rank")
        _need(all(o + s <= d for o, s, d in zip(off, sz, size)), f"a chunk of {fqn[:80]} lies outside the tensor")
    _need(sum(math.prod(sz) for _, sz in chunks) == numel, f"the chunks of {fqn[:80]} hold "
          f"{sum(math.prod(sz) for _, sz in chunks):,} entries, the tensor {numel:,}")
    if len(chunks) == 1 or numel == 0:
        return
    cuts = [sorted({0, d, *(o for off, _ in chunks for o in [off[i]]), *(off[i] + sz[i] for off, sz in chunks)})
            for i, d in enumerate(size)]
    cells = math.prod(len(c) - 1 for c in cuts)
    budget[0] -= cells
    _need(budget[0] >= 0, f"the chunks of {fqn[:80]} cut it into too many pieces (more than {MAX_CELLS:,} in all)")
    index = [{v: j for j, v in enumerate(c)} for c in cuts]
    grid = torch.zeros([len(c) - 1 for c in cuts], dtype=torch.int32)
    for off, sz in chunks:
        if math.prod(sz) == 0:
            continue
        sl = tuple(slice(index[i][off[i]], index[i][off[i] + sz[i]]) for i in range(len(size)))
        grid[sl] += 1
        _need(int(grid[sl].max()) == 1, f"chunks of {fqn[:80]} overlap")
    # every cell covered once is implied by equal totals and no overlap; checked anyway
    _need(bool((grid == 1).all()), f"the chunks of {fqn[:80]} leave a gap")


def layout_of(md: Any) -> Layout:
    """Validate the inert ``Metadata`` (module docstring); raise :class:`_Bad` naming the first problem."""
    _need(_is(md, "Metadata"), f".metadata holds a {_label(md)[:80]}, not DCP Metadata")
    f = _fields(md, "Metadata")
    sdm: Any = f.get("state_dict_metadata")
    storage: Any = f.get("storage_data")
    planner: Any = f.get("planner_data")
    _need(type(sdm) is dict and type(storage) is dict, "state_dict_metadata or storage_data is missing")
    _need(len(sdm) <= MAX_ITEMS and len(storage) <= MAX_ITEMS, f"more than {MAX_ITEMS:,} items")
    where: dict[tuple[str, tuple[int, ...] | None], Item] = {}
    for idx, info in storage.items():
        _need(_is(idx, "MetadataIndex") and _is(info, "_StorageInfo"), "a storage_data entry is not "
              "MetadataIndex -> _StorageInfo")
        i, s = _fields(idx, "MetadataIndex"), _fields(info, "_StorageInfo")
        fqn: Any = i.get("fqn")
        _need(type(fqn) is str and len(fqn) <= 4096, "a storage entry's fqn is not text")
        off = None if i.get("offset") is None else _size(i.get("offset"), f"the offset of {fqn[:80]}")
        _need(not s.get("transform_descriptors"), f"item {fqn[:80]} is stored transformed (compressed?), which "
              "sam-probe does not read")
        item = Item(_plain_name(s.get("relative_path")), _int(s.get("offset"), "an item offset"),
                    _int(s.get("length"), "an item length"))
        _need((fqn, off) not in where, f"two storage entries for {fqn[:80]}")
        where[(fqn, off)] = item
    tensors: dict[str, TensorMeta] = {}
    objects: dict[str, Item] = {}
    n_chunks, budget = 0, [MAX_CELLS]
    for fqn, meta in sdm.items():
        _need(type(fqn) is str and len(fqn) <= 4096, "a state_dict_metadata key is not text")
        if _is(meta, "BytesStorageMetadata"):
            found = where.get((fqn, None))
            _need(found is not None, f"item {fqn[:80]} has no storage entry")
            objects[fqn] = found  # type: ignore[assignment]
            continue
        _need(_is(meta, "TensorStorageMetadata"), f"{fqn[:80]} is described by a {_label(meta)[:80]}")
        m = _fields(meta, "TensorStorageMetadata")
        dtype = _dtype(m.get("properties"), fqn)
        size = _size(m.get("size"), f"the size of {fqn[:80]}")
        _need(math.prod(size) < 2**48, f"tensor {fqn[:80]} declares {math.prod(size):,} entries")
        raw: Any = m.get("chunks")
        _need(type(raw) is list, f"tensor {fqn[:80]} has no chunk list")
        n_chunks += len(raw)
        _need(n_chunks <= MAX_CHUNKS, f"more than {MAX_CHUNKS:,} chunks")
        pairs = []
        for c in raw:
            _need(_is(c, "ChunkStorageMetadata"), f"a chunk of {fqn[:80]} is a {_label(c)[:80]}")
            cf = _fields(c, "ChunkStorageMetadata")
            pairs.append((_size(cf.get("offsets"), "chunk offsets"), _size(cf.get("sizes"), "chunk sizes")))
        _covers(size, pairs, fqn, budget)
        itemsize = _itemsize(dtype)
        chunks = []
        for off, sz in pairs:
            at = where.get((fqn, off))
            _need(at is not None, f"a chunk of {fqn[:80]} at {list(off)} has no storage entry")
            assert at is not None
            need = math.prod(sz) * itemsize
            _need(need <= at.length, f"a chunk of {fqn[:80]} needs {need:,} bytes, its item holds {at.length:,}")
            chunks.append(Chunk(off, sz, at.file, at.start, at.length))
        tensors[fqn] = TensorMeta(dtype, size, tuple(chunks))
    paths: dict[str, tuple[str, ...]] = {}
    if type(planner) is dict:
        for fqn, path in planner.items():
            if type(fqn) is str and type(path) is tuple and 0 < len(path) <= 64 and all(type(p) is str for p in path) \
                    and ".".join(path) == fqn:
                paths[fqn] = path
    return Layout(tensors, objects, paths)


def _itemsize(dtype: str) -> int:
    import torch

    return torch.empty(0, dtype=getattr(torch, dtype)).element_size()


# ------------------------------------------------------------------ files
def _listing(folder: Path) -> list[Path]:
    """``.metadata`` and the ``.distcp`` files, each a regular file in the folder (not a link)."""
    found = [folder / METADATA]
    with os.scandir(folder) as it:
        for e in it:
            if e.name.endswith(SUFFIX):
                found.append(folder / e.name)
                if len(found) > MAX_FILES:
                    raise CheckpointError(f"{display(folder)}: more than {MAX_FILES:,} {SUFFIX} files; refused")
    found[1:] = sorted(found[1:])
    for f in found:
        if os.path.islink(f) or not f.is_file():
            raise CheckpointError(f"{display(folder)}: {printable(f.name)!r} is not a regular file inside the folder "
                                  "(a link, or not a file); refused")
    return found


def _is_dcp(path: Path) -> bool:
    if os.path.islink(path) or not path.is_dir() or not os.path.lexists(path / METADATA):
        return False
    with os.scandir(path) as it:
        return any(e.name.endswith(SUFFIX) for e in it)


def model_dir(path: Path) -> Path:
    """The DCP folder of a checkpoint folder: itself, or, for an Accelerate / Trainer FSDP checkpoint saved with
    ``SHARDED_STATE_DICT`` (``checkpoint-N/pytorch_model_fsdp_0/`` beside ``optimizer_0/`` and
    ``trainer_state.json``), its ``pytorch_model_fsdp_0`` folder (not a link)."""
    path = Path(path)
    if not _is_dcp(path) and _is_dcp(path / ACCELERATE_MODEL):
        return path / ACCELERATE_MODEL
    return path


def claims(path: Path) -> bool:
    """A folder holding ``.metadata`` and at least one ``.distcp`` file, or one holding such a folder named
    ``pytorch_model_fsdp_0`` (:func:`model_dir`)."""
    return _is_dcp(model_dir(path))


def files(folder: Path) -> list[Path]:
    return _listing(model_dir(folder))


def digest(folder: Path) -> str:
    """sha256 over the names and sha256s of ``.metadata`` and every ``.distcp`` file (remembered per file)."""
    from .torch_file import file_digest

    h = hashlib.sha256()
    for f in files(folder):
        h.update(f.name.encode("utf-8", "surrogateescape") + b"\0" + file_digest(f).encode() + b"\n")
    return h.hexdigest()


def _fail(folder: Path, why: str) -> CheckpointError:
    return CheckpointError(printable(f"{display(folder)}: not a consistent torch.distributed.checkpoint folder "
                                     f"({why}); copy the whole folder"))


def read_layout(folder: Path) -> Layout:
    """The validated metadata of a DCP folder, every item inside an existing file of it; one-line errors."""
    from ..formats import refused

    listed = {f.name for f in _listing(folder)}
    meta = folder / METADATA
    try:
        mf = map_file(meta)
        if mf.size > MAX_METADATA:
            raise RefusedFile(f"it is {mf.size:,} bytes, more than the {MAX_METADATA // 2**20} MiB sam-probe reads "
                              "of a .metadata", "limit")
        md = read_metadata(bytes(mf.data))
    except RefusedFile as exc:
        raise refused(meta, exc) from None
    try:
        lay = layout_of(md)
        spans: dict[str, list[tuple[int, int, str]]] = {}
        for fqn, t in lay.tensors.items():
            for c in t.chunks:
                spans.setdefault(c.file, []).append((c.start, c.start + c.length, fqn))
        for fqn, it in lay.objects.items():
            spans.setdefault(it.file, []).append((it.start, it.start + it.length, fqn))
        for name, items in spans.items():
            _need(name in listed, f"shard {name} is missing")
            try:
                size = (folder / name).stat().st_size
            except OSError:
                raise _Bad(f"shard {name} cannot be read") from None
            items.sort()
            last = max(items, key=lambda it: it[1])
            _need(last[1] <= size, f"an item of {last[2][:80]} runs past the end of {name} ({last[1]:,} > {size:,} "
                  "bytes)")
            for (_, end_a, a), (start_b, _, b) in zip(items, items[1:]):
                _need(end_a <= start_b, f"items {a[:60]} and {b[:60]} overlap in {name}")
    except _Bad as exc:
        raise _fail(folder, str(exc)) from None
    return lay


def _anon(view: memoryview) -> MappedFile:
    """A private anonymous mapping holding a copy of ``view`` (an item's bytes), for the torch archive reader."""
    n = len(view)
    mm = mmap.mmap(-1, max(n, 1))
    mm[:n] = view
    return MappedFile("<item>", n, mm)


def _item_object(buf: MappedFile) -> Any:
    """The object a DCP item (a ``torch.save`` archive) holds, its CRCs verified, read inertly."""
    from ..archive import TorchZip
    from ..safe_pickle import load_mapped

    if bytes(buf.data[:4]) != b"PK\x03\x04":
        raise RefusedFile("an item is not a torch.save archive")
    arc = TorchZip(buf, verify=True)
    obj, _ = load_mapped(buf, archive=arc, mmap=True)
    return obj


def _chunk_tensor(buf: MappedFile, dtype: str, c: Chunk, fqn: str) -> Any:
    import torch

    t = _item_object(buf)
    if not isinstance(t, torch.Tensor) or t.layout != torch.strided or t.dtype != getattr(torch, dtype) \
            or tuple(t.shape) != c.sizes:
        shape = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise RefusedFile(f"the item of {fqn[:80]} at {list(c.offsets)} holds {shape}, not a {dtype} tensor of "
                          f"shape {list(c.sizes)}")
    return t


def _region(c: Chunk, rows: tuple[int, int] | None = None) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """Where chunk ``c`` goes in the full tensor (or in rows [r0, r1) of it), and which part of it goes."""
    dst = [slice(o, o + s) for o, s in zip(c.offsets, c.sizes)]
    src = [slice(0, s) for s in c.sizes]
    if rows is not None:
        r0, r1 = rows
        lo, hi = max(r0, c.offsets[0]), min(r1, c.offsets[0] + c.sizes[0])
        dst[0] = slice(lo - r0, hi - r0)
        src[0] = slice(lo - c.offsets[0], hi - c.offsets[0])
    return tuple(dst), tuple(src)


# ------------------------------------------------------------------ choosing the model's entries
def _top(lay: Layout, fqn: str) -> tuple[str, bool]:
    """The state dict's top-level key of ``fqn`` and whether it was a nested dict there."""
    path = lay.paths.get(fqn)
    if path is not None:
        return path[0], len(path) > 1
    top = fqn.split(".", 1)[0]
    return top, top != fqn


def select(lay: Layout, key: str | None) -> tuple[dict[str, str], str]:
    """``({stored fqn: name in the state}, layout)``: the model's tensors (module docstring)."""
    names = list(lay.tensors)
    if key:
        pre = key + "."
        chosen = {f: f[len(pre):] for f in names if f.startswith(pre)}
        if not chosen:
            tops = sorted({_top(lay, f)[0] for f in names})[:12]
            raise CheckpointError(printable(f"--key {key}: no tensors under it (top-level keys: {', '.join(tops)})"))
        return chosen, f"dcp:{key}"
    nested = {_top(lay, f)[0] for f in names if _top(lay, f)[1]}
    for top in STATE_TOPS:
        if top in nested:
            pre = top + "."
            return {f: f[len(pre):] for f in names if _top(lay, f) == (top, True)}, f"dcp:{top}"
    chosen = {f: f for f in names if not (_top(lay, f)[1] and _top(lay, f)[0] in NON_MODEL_TOPS)
              and not (f in STEP_ITEMS and not lay.tensors[f].size)}
    return chosen, "dcp"


# ------------------------------------------------------------------ loading
def _saved_value(folder: Path, lay: Layout, fqn: str) -> Any:
    """A saved non-tensor item (or a one-entry tensor) by fqn, read inertly; ``None`` when absent or raw bytes."""
    from ..formats import refused

    item, t = lay.objects.get(fqn), lay.tensors.get(fqn)
    if item is None and (t is None or math.prod(t.size) != 1):
        return None
    file, start, length = (item.file, item.start, item.length) if item is not None else \
        (t.chunks[0].file, t.chunks[0].start, t.chunks[0].length)  # type: ignore[union-attr]
    try:
        mf = map_file(folder / file)
        with memoryview(mf.data) as view:
            buf = _anon(view[start:start + length])
        if item is None:
            return _chunk_tensor(buf, t.dtype, t.chunks[0], fqn).reshape(())  # type: ignore[union-attr]
        if bytes(buf.data[:4]) != b"PK\x03\x04":
            return None  # raw bytes (a BytesIO the trainer saved), not a pickled value
        return _item_object(buf)
    except RefusedFile as exc:
        raise refused(folder / file, exc) from None


def _read_step(folder: Path, lay: Layout, outer: Path | None = None) -> tuple[int | None, str]:
    """The saved step (a bytes item or a one-entry tensor), else (an Accelerate / Trainer ``checkpoint-N``
    folder ``outer`` around the DCP folder) its ``trainer_state.json`` global step or its name, else the
    folder name."""
    from ..steps import as_step, step_from_name

    for fqn in STEP_ITEMS:
        step = as_step(_saved_value(folder, lay, fqn))
        if step is not None:
            return step, f"content:{fqn}"
    if outer is not None and outer != folder:
        from .hf_folder import trainer_step

        step, source = trainer_step(outer)
        if step is not None:
            return step, source
        folder = outer
    step = step_from_name(folder.name)
    return (step, "filename") if step is not None else (None, "position")


def _read_lr(folder: Path, lay: Layout) -> dict[str, Any]:
    """``{'lr': ...}`` from the first optimizer parameter group saved beside the weights, if any."""
    for top in ("optimizer", "optim", "optimizers"):
        v = _saved_value(folder, lay, f"{top}.param_groups.0.lr")
        if type(v) in (int, float) and math.isfinite(v) and v > 0:
            return {"lr": float(v)}
    return {}


def _model_part(folder: Path, key: str | None) -> tuple[Layout, dict[str, str], str]:
    """The validated layout of a DCP folder, the stored names it analyses (``--key``, else the model part)
    with their names in the checkpoint, and the layout label; one-line errors."""
    lay = read_layout(folder)
    try:
        chosen, layout = select(lay, key)
    except CheckpointError as exc:
        raise CheckpointError(f"{display(folder)}: {exc}") from None
    if not chosen:
        raise CheckpointError(f"{display(folder)}: no tensors found besides optimizer and trainer state; point at "
                              "the weights with --key NAME")
    return lay, chosen, layout


def _extra_keys(lay: Layout, chosen: dict[str, str]) -> list[str]:
    """The top-level names of what the folder holds besides the analysed tensors (at most ``MAX_LISTED``)."""
    extra = sorted({_top(lay, f)[0] for f in [*lay.tensors, *lay.objects] if f not in chosen})
    if len(extra) > MAX_LISTED:
        extra = [*extra[:MAX_LISTED], f"... ({len(extra) - MAX_LISTED} more)"]
    return extra


def load(folder: Path, *, key: str | None = None, trust: bool = False):
    """A DCP folder as one :class:`~sam_probe.loading.state.Checkpoint` (module docstring).

    ``trust`` changes nothing: DCP items are plain tensors, always read by the restricted loader."""
    import torch

    from ..formats import refused
    from ..state import Checkpoint, check_tensors, count_nonfinite, strip_prefixes
    from ..verify import remember_sha256

    outer, folder = Path(folder), model_dir(folder)
    lay, chosen, layout = _model_part(folder, key)
    out = {f: torch.empty(lay.tensors[f].size, dtype=getattr(torch, lay.tensors[f].dtype)) for f in chosen}
    wanted: dict[str, list[tuple[int, str, Chunk]]] = {}
    for f in chosen:
        for c in lay.tensors[f].chunks:
            wanted.setdefault(c.file, []).append((c.start, f, c))
    for path in _listing(folder)[1:]:
        name = path.name
        try:
            mf = map_file(path)
            sha, at = hashlib.sha256(), 0
            with memoryview(mf.data) as view:
                for start, fqn, c in sorted(wanted.get(name, []), key=lambda w: w[0]):
                    sha.update(view[at:start])
                    buf = _anon(view[start:start + c.length])
                    with memoryview(buf.data) as copy:
                        sha.update(copy[:c.length])
                    at = start + c.length
                    dst, src = _region(c)
                    out[fqn][dst] = _chunk_tensor(buf, lay.tensors[fqn].dtype, c, fqn)[src]
                    del buf
                sha.update(view[at:])
            remember_sha256(mf, sha.hexdigest())
        except RefusedFile as exc:
            raise refused(path, exc) from None
    step, step_source = _read_step(folder, lay, outer)
    state = {chosen[f]: t for f, t in out.items()}
    check_tensors(folder, state)
    state, stripped = strip_prefixes(state)
    extra = _extra_keys(lay, chosen)
    return Checkpoint(
        path=str(outer), format="dcp", layout=layout, state=state, step=step, step_source=step_source,
        extra_keys=extra, hparams=_read_lr(folder, lay), model_spec=None, placeholders=[], stripped_prefixes=stripped,
        trusted=trust, source=SOURCE.name, digest=digest(folder),
        scanned={n: count_nonfinite(t) for n, t in state.items() if t.is_floating_point() or t.is_complex()})


def rank_rows(n: int, world: int, rank: int) -> tuple[int, int]:
    """Rows ``[r0, r1)`` of a dimension of ``n`` that ``torch.chunk(t, world, 0)[rank]`` holds (empty past the
    last chunk, as FSDP pads)."""
    step = -(-n // world) if n else 0
    r0 = min(n, rank * step)
    return r0, min(n, r0 + step)


def _rows_of(folder: Path, lay: Layout, name: str, rows: tuple[int, int] | None,
             maps: dict[str, MappedFile]) -> tuple[Any, int]:
    """Rows ``[r0, r1)`` of dimension 0 of stored tensor ``name`` (all of it when ``rows`` is ``None``) and the
    bytes of the items read for them: only the items whose chunks hold some of those rows, each copied and its
    CRCs checked (:func:`_chunk_tensor`); ``maps`` caches the mapped files."""
    import torch

    from ..formats import refused

    t = lay.tensors[name]
    r0, r1 = rows if rows is not None else (0, t.size[0] if t.size else 1)
    out = torch.empty((r1 - r0, *t.size[1:]) if rows is not None else t.size, dtype=getattr(torch, t.dtype))
    read = 0
    for c in sorted(t.chunks, key=lambda c: (c.file, c.start)):
        if 0 in c.sizes or (rows is not None and not (c.offsets[0] < r1 and c.offsets[0] + c.sizes[0] > r0)):
            continue
        path = folder / c.file
        try:
            mf = maps.get(c.file) or maps.setdefault(c.file, map_file(path))
            with memoryview(mf.data) as view:
                buf = _anon(view[c.start:c.start + c.length])
            read += c.length
            dst, src = _region(c, rows)
            out[dst] = _chunk_tensor(buf, t.dtype, c, name)[src]
            del buf
        except RefusedFile as exc:
            raise refused(path, exc) from None
    return out, read


def read_rows(folder: str | Path, names: list[str], r0: int, r1: int) -> dict[str, Any]:
    """Rows ``[r0, r1)`` of dimension 0 of the named tensors (stored fqns), reading only the items whose chunks
    hold some of those rows (each item's bytes copied and its CRCs checked; the rest of the folder is not
    read).  ``rank_rows`` gives one FSDP rank's rows."""
    folder = Path(folder)
    lay = read_layout(folder)
    for name in names:
        t = lay.tensors.get(name)
        if t is None:
            raise CheckpointError(printable(f"{display(folder)}: no tensor {name[:120]!r} in this checkpoint"))
        if not t.size or not 0 <= r0 <= r1 <= t.size[0]:
            raise CheckpointError(f"{display(folder)}: rows [{r0}, {r1}) are not rows of {name[:120]} (shape "
                                  f"{list(t.size)})")
    maps: dict[str, MappedFile] = {}
    return {name: _rows_of(folder, lay, name, (r0, r1), maps)[0] for name in names}


def load_lazy(folder: Path, *, key: str | None = None, trust: bool = False):
    """A DCP folder as a lazy :class:`~sam_probe.loading.state.Checkpoint` (``--shard-model``): its state holds
    meta tensors of the stored names, shapes and dtypes, and ``ck.lazy`` reads rows of them on demand.

    Verified here, before anything is read into memory: everything :func:`read_layout` checks (the inert
    ``.metadata``, the chunks tiling each tensor, every item inside a regular file of the folder, no overlaps,
    each chunk's bytes within its item) and the model part chosen as :func:`load` does; the step and lr items
    are read as :func:`load` reads them.  The digest keying results is the same sha256 :func:`load` gives, of
    all bytes of the folder, computed by every rank streaming over the mapped files (nothing kept; remembered,
    so keying the unit does not read them again).  Verified lazily, when a rank reads rows: the items holding
    them (each copied, its archive CRCs checked on the copy, read by the restricted loader, a dense tensor of
    its chunk's dtype and shape), and their non-finite entries (the caller scans the rows it gets).  A rank
    reads only the items whose chunks hold its rows (a folder FSDP saved over the same rows keeps one rank's
    rows in its own items); an item is copied whole and only the rows kept, so the transient peak is one
    item."""
    import torch

    from ..state import Checkpoint, LazyRows, strip_prefixes

    outer, folder = Path(folder), model_dir(folder)
    lay, chosen, layout = _model_part(folder, key)
    stored = {f: torch.empty(lay.tensors[f].size, dtype=getattr(torch, lay.tensors[f].dtype), device="meta")
              for f in chosen}
    maps: dict[str, MappedFile] = {}

    def read(name: str, r0: int | None, r1: int | None) -> Any:
        t = lay.tensors[name]
        if r0 is not None and (not t.size or not 0 <= r0 <= (r1 or 0) <= t.size[0]):
            raise CheckpointError(f"{display(folder)}: rows [{r0}, {r1}) are not rows of {name[:120]} (shape "
                                  f"{list(t.size)})")
        out, n = _rows_of(folder, lay, name, None if r0 is None else (r0, r1 or 0), maps)
        reader.bytes_read += n
        return out

    reader = LazyRows(read, stored)
    step, step_source = _read_step(folder, lay, outer)
    state, stripped = strip_prefixes({chosen[f]: t for f, t in stored.items()})
    extra = _extra_keys(lay, chosen)
    return Checkpoint(
        path=str(outer), format="dcp", layout=layout, state=state, step=step, step_source=step_source,
        extra_keys=extra, hparams=_read_lr(folder, lay), model_spec=None, placeholders=[], stripped_prefixes=stripped,
        trusted=trust, source=SOURCE.name, digest=digest(folder), scanned={}, lazy=reader)


SOURCE = Source(
    name="dcp", kind=FOLDER, order=30,
    summary="torch.distributed.checkpoint folder (.metadata + __R_N.distcp, FSDP / torchtitan / Accelerate): "
            "tensors assembled from every rank's chunks, the model part of a nested state dict",
    load=load, digest=digest, files=files, claims=claims, load_lazy=load_lazy,
    step="saved step / train_state.step item, else trainer_state.json (Accelerate / Trainer checkpoint-N/"
         "pytorch_model_fsdp_0/), else the step-N / global_stepN / checkpoint-N folder name",
)
