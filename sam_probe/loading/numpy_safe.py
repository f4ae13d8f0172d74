"""numpy arrays and scalars in a checkpoint's pickle, rebuilt only through a validated path.

Checkpoints pickle numpy values beside their tensors (``np.float64(0.1)`` learning
rates, ``np.int64`` steps, small arrays in hyper-parameters).  numpy's own
unpickling (``_reconstruct`` + ``ndarray.__setstate__``, ``dtype.__setstate__``,
``scalar``) trusts its input: an object dtype over raw bytes, or a void dtype
whose state claims object fields or offsets past its item size, reads and writes
arbitrary memory.  So the pickle's numpy globals name the *recorders* below
instead; they only remember their arguments and state, and
the loader then builds with :func:`rebuild`, after unpickling, exactly

- a dtype from a fixed list of plain codes (bool, signed/unsigned integers of
  1-8 bytes, float16/32/64, complex64/128) with byte order ``<``, ``>``, ``=`` or
  ``|`` and no sub-array, field names or fields;
- an array of such a dtype whose raw data has exactly ``prod(shape) x itemsize``
  bytes (at most ``MAX_NDIM`` dimensions), copied into a fresh array;
- a scalar of such a dtype from exactly ``itemsize`` bytes.

Booleans are normalised to 0/1.  Anything else (object, void, structured,
string, datetime or user dtypes, subclasses, direct ``ndarray(...)`` calls)
becomes an :class:`UnrebuiltNumpy` placeholder whose ``note`` says why; no
pickle data ever reaches ``dtype.__setstate__`` or ``ndarray.__setstate__``.
The loader replaces the recorders in the unpickled object with :func:`rebuild`
(one pass over the object graph, :mod:`.objgraph`).
"""
from __future__ import annotations

import math
from typing import Any

from .placeholders import Placeholder

PLAIN_CODES = frozenset({"b1", "i1", "u1", "i2", "u2", "i4", "u4", "i8", "u8", "f2", "f4", "f8", "c8", "c16"})
BYTE_ORDERS = frozenset({"<", ">", "=", "|"})
MAX_NDIM = 32
_made = [0]  # recorders created so far


class _Recorder(Placeholder):
    """Records the arguments and state a pickle gives a numpy global; builds nothing itself."""

    def __new__(cls, *args: Any, **kwargs: Any):
        _made[0] += 1
        return super().__new__(cls, *args, **kwargs)


class NpDtype(_Recorder):
    _sam_probe_global = "numpy.dtype"


class NpReconstruct(_Recorder):
    _sam_probe_global = "numpy.core.multiarray._reconstruct"


class NpScalar(_Recorder):
    _sam_probe_global = "numpy.core.multiarray.scalar"


class NpNdarray(_Recorder):
    """``numpy.ndarray`` itself: the subtype argument of ``_reconstruct``, or a direct call."""

    _sam_probe_global = "numpy.ndarray"


RECORDERS: list[tuple[type, str]] = [
    (NpReconstruct, "numpy.core.multiarray._reconstruct"), (NpReconstruct, "numpy._core.multiarray._reconstruct"),
    (NpScalar, "numpy.core.multiarray.scalar"), (NpScalar, "numpy._core.multiarray.scalar"),
    (NpDtype, "numpy.dtype"), (NpNdarray, "numpy.ndarray"),
]


class UnrebuiltNumpy(Placeholder):
    """A numpy value that was not rebuilt; ``note`` says what it was and why."""

    _sam_probe_global = "numpy"

    def __repr__(self) -> str:
        return f"<{self.note}>"

    @property
    def note(self) -> str:
        return self.args[0] if self.args else "numpy value not rebuilt"

    def plain(self) -> Any:
        return f"<{self.note}>"


class _Refuse(Exception):
    pass


def _raw(data: Any) -> bytes:
    if type(data) in (bytes, bytearray):
        return bytes(data)
    if type(data) is str:  # py2 pickles read with encoding='latin1'
        try:
            return data.encode("latin1")
        except UnicodeEncodeError:
            pass
    raise _Refuse(f"its raw data is a {type(data).__name__}, not bytes")


def _dtype(rec: Any):
    """The plain numpy dtype an :class:`NpDtype` recorder describes."""
    import numpy as np

    if type(rec) is not NpDtype or not rec.args or type(rec.args[0]) is not str:
        raise _Refuse("its dtype is not a plain numpy dtype")
    code = rec.args[0]
    if code not in PLAIN_CODES:
        raise _Refuse(f"dtype {code[:16]!r} is not a plain numeric or bool type")
    dt = np.dtype(code)
    state = rec.state
    if state is None:
        return dt
    if type(state) is not tuple or len(state) < 5 or any(s is not None for s in state[2:5]):
        raise _Refuse(f"dtype {code!r} carries sub-array or field state")
    order = state[1]
    if type(order) is not str or order not in BYTE_ORDERS:
        raise _Refuse(f"dtype {code!r} has an invalid byte order")
    return dt.newbyteorder(order) if order in "<>" and dt.itemsize > 1 else dt


def _shape(shape: Any) -> tuple[int, ...]:
    if type(shape) is not tuple or len(shape) > MAX_NDIM or not all(type(d) is int and 0 <= d < 2**62 for d in shape):
        raise _Refuse("its shape is not a tuple of non-negative integers")
    return shape


def _array(rec: NpReconstruct):
    import numpy as np

    args, state = rec.args, rec.state
    if len(args) < 1 or args[0] is not NpNdarray:
        raise _Refuse("it is not a plain numpy.ndarray (a subclass or another type)")
    if type(state) is not tuple or len(state) not in (4, 5):
        raise _Refuse("its state is not (version, shape, dtype, is_fortran, data)")
    shape, rec_dtype, fortran, data = state[-4:]
    shape = _shape(shape)
    dt = _dtype(rec_dtype)
    raw = _raw(data)
    count = math.prod(shape)
    if len(raw) != count * dt.itemsize:
        raise _Refuse(f"its data has {len(raw)} bytes, not {count} x {dt.itemsize} for shape {shape}")
    view = np.frombuffer(raw, dtype=np.uint8 if dt.kind == "b" else dt, count=count)
    view = view.reshape(shape, order="F" if fortran is True else "C")
    return view != 0 if dt.kind == "b" else view.copy(order="K")  # a fresh array that owns its data


def _scalar(rec: NpScalar):
    import numpy as np

    if len(rec.args) != 2:
        raise _Refuse("it is not scalar(dtype, data)")
    dt = _dtype(rec.args[0])
    raw = _raw(rec.args[1])
    if len(raw) != dt.itemsize:
        raise _Refuse(f"its data has {len(raw)} bytes, not {dt.itemsize}")
    if dt.kind == "b":
        return np.bool_(raw != b"\x00")
    return np.frombuffer(raw, dtype=dt, count=1)[0]


_BUILDERS = {NpReconstruct: ("array", _array), NpScalar: ("scalar", _scalar), NpDtype: ("dtype", _dtype),
             NpNdarray: ("array", None)}


def rebuild(rec: _Recorder) -> Any:
    """The validated numpy value of one recorder, or an :class:`UnrebuiltNumpy` saying why not."""
    what, build = _BUILDERS[type(rec)]
    if build is None:
        return UnrebuiltNumpy(f"numpy {what} not rebuilt: numpy.ndarray(...) is called directly in the pickle")
    try:
        return build(rec)
    except _Refuse as exc:
        return UnrebuiltNumpy(f"numpy {what} not rebuilt: {exc}")
    except (ValueError, TypeError, MemoryError, OverflowError) as exc:
        return UnrebuiltNumpy(f"numpy {what} not rebuilt: {type(exc).__name__}")


def is_recorder(obj: Any) -> bool:
    return isinstance(obj, _Recorder)


def made() -> int:
    """How many recorders have been created so far (nothing to resolve while it is unchanged)."""
    return _made[0]
