"""Seeded fuzzing of the checkpoint loader in a memory-capped child process.

The corpus is generated here, from a fixed seed: real checkpoints written in
the test (torch zip, legacy torch, safetensors) under random byte and record
mutations, and random programs of pickle opcodes (calls, builds, memo
references, storage references, numpy and code-running globals) inside
otherwise valid files.  One child process loads them all with its address space
capped (``RLIMIT_AS``: what it maps after importing torch plus 1.5 GiB) and
logs each file before and after loading it.  Asserted: the child exits
normally (no signal, nothing escapes), every file ends in a valid load or a
one-line ``CheckpointError``, loaded metadata is JSON-able, and no payload ran
(no marker file).  The subprocess timeout is the only time bound.
"""
from __future__ import annotations

import io
import json
import math
import os
import pickle
import pickletools
import random
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save as save_safetensors

pytestmark = pytest.mark.slow  # seeded fuzzing in a child process (pytest -m "not slow" skips it)

SEED = 1234
N_MUTANTS = 1000
N_PROGRAMS = 800
ROOT = Path(__file__).resolve().parents[2]

CHILD = r"""
import json, os, resource, sys
import torch
torch.set_num_threads(1)
from sam_probe.errors import CheckpointError
from sam_probe.loading.checkpoints import load_checkpoint

files, log = sys.argv[1], sys.argv[2]
vm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmSize")) * 1024
cap = vm + 3 * 2**29
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
with open(log, "w") as out:
    for name in sorted(os.listdir(files)):
        out.write(json.dumps({"start": name}) + "\n")
        out.flush()
        try:
            ck = load_checkpoint(os.path.join(files, name))
            json.dumps({"h": ck.hparams, "x": ck.extra_keys, "p": ck.placeholders, "s": ck.model_spec,
                        "n": ck.nonfinite(), "k": list(ck.state)}, allow_nan=False)
            status = "ok"
        except CheckpointError as exc:
            status = "refused" if str(exc) and "\n" not in str(exc) else "multi-line: " + repr(str(exc))[:300]
        except BaseException as exc:
            status = f"escaped {type(exc).__name__}: {str(exc)[:300]}"
        out.write(json.dumps({"done": name, "status": status}) + "\n")
        out.flush()
"""


# --------------------------------------------------------------- real checkpoints
def _bases() -> dict[str, bytes]:
    g = torch.Generator().manual_seed(SEED)
    state = {"fc.weight": torch.randn(8, 8, generator=g), "fc.bias": torch.zeros(8),
             "bn.num_batches_tracked": torch.tensor(3), "half": torch.randn(4, generator=g).half()}
    extras = {"step": np.int64(40), "hparams": {"lr": np.float64(0.1), "betas": np.array([0.9, 0.999]),
                                               "name": "sam", "layers": [4, 4], "nested": {"a": (1, 2.5, None)}},
              "optimizer": {"state": {0: {"momentum_buffer": torch.ones(8)}}, "param_groups": [{"lr": 0.1}]}}
    out = {}
    for name, legacy in (("zip", False), ("legacy", True)):
        buf = io.BytesIO()
        torch.save({"model": state, **extras}, buf, _use_new_zipfile_serialization=not legacy)
        out[name] = _stable_legacy(buf.getvalue()) if legacy else buf.getvalue()
    out["safetensors"] = save_safetensors(state, metadata={"step": "12", "hparams": json.dumps({"lr": 0.1})})
    for name, legacy in (("marked-zip", False), ("marked-legacy", True)):
        buf = io.BytesIO()
        torch.save({"model": state, "hparams": {"lr": 0.1, "value": MARKER}}, buf,
                   _use_new_zipfile_serialization=not legacy)
        out[name] = _stable_legacy(buf.getvalue()) if legacy else buf.getvalue()
    return out


INTERESTING = [struct.pack("<q", v) for v in (0, -1, 2**31 - 1, 2**32, 2**62, -(2**63))] + [b"\xff" * 8, b"\x00" * 8]


def _mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 4, 16))):
        if not b:
            break
        kind = rng.randrange(7)
        i = rng.randrange(len(b))
        if kind == 0:
            b[i] ^= 1 << rng.randrange(8)
        elif kind == 1:
            b[i:i + 8] = rng.choice(INTERESTING)
        elif kind == 2:
            b[i:i + 1] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
        elif kind == 3:
            del b[i:i + rng.randrange(1, 64)]
        elif kind == 4:
            del b[rng.randrange(len(b) + 1):]
        elif kind == 5:
            j = rng.randrange(len(b) + 1)
            b[j:j] = b[i:i + rng.randrange(1, 256)]
        else:
            b[i] = rng.randrange(256)
    return bytes(b)


def _rezip(data: bytes, change) -> bytes:
    """The zip archive ``data`` rewritten member by member through ``change(name, bytes)`` (same bytes every run)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as zin, zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            zout.writestr(zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0)),
                          change(info.filename, zin.read(info)))
    return out.getvalue()


def _stable_legacy(data: bytes) -> bytes:
    """A legacy torch file with its storage keys (memory addresses, new every run) renamed 0, 1, ..."""
    f = io.BytesIO(data)
    for _ in range(4):  # magic number, protocol, system information, the object: read past, never run
        for _ in pickletools.genops(f):
            pass
    keys = [arg for op, arg, _ in pickletools.genops(f) if op.name == "BINUNICODE"]
    for i, key in enumerate(keys):
        data = data.replace(_s(key), _s(str(i).rjust(len(key), "0")))
    return data


def _mutant(rng: random.Random, bases: dict[str, bytes]) -> bytes:
    fmt = rng.choice(("zip", "zip", "legacy", "safetensors", "marked-zip"))
    data = bases[fmt]
    if fmt.endswith("zip") and rng.random() < 0.6:  # mutate one record and keep the CRCs right: reaches the unpickler
        target = rng.choice(("data.pkl", "data.pkl", "data/", "byteorder"))
        return _rezip(data, lambda n, d: _mutate_bytes(rng, d) if target in n else d)
    if fmt == "safetensors" and rng.random() < 0.5:  # keep the header length right, change the header's numbers
        (n,) = struct.unpack_from("<Q", data)
        header = data[8:8 + n].decode()
        digits = [i for i, c in enumerate(header) if c.isdigit()]
        for i in rng.sample(digits, min(len(digits), rng.randrange(1, 4))):
            header = header[:i] + str(rng.randrange(10)) + header[i + 1:]
        h = header.encode()
        return struct.pack("<Q", len(h)) + h + data[8 + n:]
    return _mutate_bytes(rng, data)


# --------------------------------------------------------------- random pickle programs
def _s(s: str) -> bytes:
    b = s.encode("utf-8", "surrogatepass")
    return b"X" + struct.pack("<I", len(b)) + b


def _g(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


GLOBALS = [("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"), ("torch", "FloatStorage"),
           ("torch._utils", "_rebuild_parameter"), ("numpy._core.multiarray", "_reconstruct"), ("numpy", "dtype"),
           ("numpy", "ndarray"), ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"), ("builtins", "set"),
           ("builtins", "bytearray"), ("torch", "Size"), ("argparse", "Namespace"), ("mypkg.cfg", "Config"),
           ("torch", "FloatTensor"), ("collections", "Counter"), ("torch._utils", "_rebuild_device_tensor_from_cpu_tensor"),
           ("torch._tensor", "_rebuild_from_type_v2"), ("builtins", "complex"), ("torch", "device")]


def _num(n: int) -> bytes:
    return b"J" + struct.pack("<i", n)


def _payloads(marker: str) -> list[bytes]:
    """Calls that would create ``marker`` if anything ran them."""
    return [_g("posix", "system") + b"(" + _s(f"touch {marker}") + b"tR",
            _g("builtins", "eval") + b"(" + _s(f"open({marker!r}, 'w')") + b"tR",
            _g("subprocess", "call") + b"(](" + _s("touch") + _s(marker) + b"etR",
            _g("builtins", "getattr") + b"(" + _g("os", "system") + _s("x") + b"tR"]


def _scalar(rng: random.Random) -> bytes:
    return rng.choice([b"N", b"\x88", b"\x89", b"K" + bytes([rng.randrange(256)]),
                       _num(rng.randrange(-2**31, 2**31)),
                       b"G" + struct.pack(">d", rng.choice([0.5, -1.0, math.inf, math.nan, 1e308])),
                       _s(rng.choice(["storage", "cpu", "0", "1", "f8", "O", "V8", "<", "|", "latin1", "a"])),
                       b"\x8a" + bytes([n := rng.randrange(12)]) + bytes(rng.randrange(256) for _ in range(n)),
                       b"U" + bytes([3]) + b"abc"])


def _numpy_value(rng: random.Random) -> bytes:
    """numpy's pickle forms (scalar, ndarray(...), _reconstruct + BUILD) with random dtypes, shapes and data."""
    code = rng.choice(["f8", "i8", "b1", "O", "O", "O", "V8", "V8", "u1", "c16", "<f8", "S4", "U2", "f16", "M8"])
    if rng.random() < 0.5:  # the state numpy itself writes: a byte order only
        names, fields, elsize, flags, order = b"N", b"N", -1, 63 if code == "O" else 0, "|"
    else:
        names = rng.choice([b"N", b"(" + _s("a") + b"t"])
        fields = rng.choice([b"N", b"}" + _s("a") + b"(" + _g("numpy", "dtype") + b"(" + _s(rng.choice(["O", "f8"]))
                             + b"\x89\x88tR" + _num(rng.choice([0, 8, 4096])) + b"ts"])
        elsize, flags = rng.choice([-1, 0, 8]), rng.choice([0, 63])
        order = rng.choice(["<", ">", "|", "=", "!"])
    dtype = (_g("numpy", "dtype") + b"(" + _s(code) + b"\x89\x88tR" + b"(" + _num(3) + _s(order) + b"N" + names
             + fields + _num(elsize) + _num(-1) + _num(flags) + b"tb")
    raw = bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 8, 16, 32, 32])))
    data = _g("_codecs", "encode") + b"(" + _s(raw.decode("latin1")) + _s("latin1") + b"tR"
    shape = b"(" + b"".join(_num(rng.randrange(5)) for _ in range(rng.randrange(3))) + b"t"
    r = rng.random()
    if r < 0.3:
        return _g("numpy._core.multiarray", "scalar") + b"(" + dtype + data + b"tR"
    if r < 0.6:  # numpy.ndarray(shape, dtype, buffer): with an object dtype, pointers read from raw bytes
        return _g("numpy", "ndarray") + b"(" + shape + dtype + data + b"tR"
    return (_g("numpy._core.multiarray", "_reconstruct") + b"(" + _g("numpy", "ndarray") + b"(" + _num(0) + b"t"
            + data + b"tR" + b"(" + _num(1) + shape + dtype + rng.choice([b"\x88", b"\x89"]) + data + b"tb")


def _storage(rng: random.Random) -> bytes:
    """A storage reference: mostly one of the real records of the base checkpoints, sometimes a lie."""
    key, kind, numel = rng.choice([("0", "FloatStorage", 64), ("1", "FloatStorage", 8), ("2", "LongStorage", 1),
                                   ("3", "HalfStorage", 4)])
    if rng.random() < 0.3:
        key, kind, numel = (rng.choice(["0", "1", "x"]), rng.choice(["FloatStorage", "LongStorage"]),
                            rng.choice([0, 1, 65, 2**20, 2**31 - 1]))
    return b"(" + _s("storage") + _g("torch", kind) + _s(key) + _s("cpu") + _num(numel) + b"tQ"


def _tensor(rng: random.Random, storage: bytes, sizes, strides) -> bytes:
    size = b"(" + b"".join(_num(n) for n in sizes) + b"t"
    stride = b"(" + b"".join(_num(n) for n in strides) + b"t"
    return (_g("torch._utils", "_rebuild_tensor_v2") + b"(" + storage + _num(rng.choice([0, 0, 1, 63])) + size
            + stride + b"\x89" + _g("collections", "OrderedDict") + b")R" + b"tR")


def _bomb(rng: random.Random) -> bytes:
    """One value shared 2^depth times over, or lists or tuples nested thousands deep."""
    kind = rng.randrange(3)
    if kind == 0:
        base = 10**6
        out = b"](Ne" + b"r" + struct.pack("<I", base)
        for i in range(1, rng.randrange(20, 40)):
            out += b"](" + (b"j" + struct.pack("<I", base + i - 1)) * 2 + b"er" + struct.pack("<I", base + i)
        return b"(" + out + b"t"
    n = rng.choice([2000, 100_000])
    return b"]" * n + b"a" * (n - 1) if kind == 1 else b"N" + b"\x85" * n


def _unit(rng: random.Random) -> bytes:
    """Any one value: a scalar, a container, a numpy value, a call with random arguments, a tensor, a bomb."""
    r = rng.random()
    if r < 0.005:
        return _bomb(rng)
    if r < 0.12:
        return _numpy_value(rng)
    if r < 0.55:
        return _scalar(rng)
    if r < 0.7:
        return rng.choice([b"]", b"}", b")", b"\x8f"])
    if r < 0.92:
        mod, name = rng.choice(GLOBALS)
        call = _g(mod, name) + b"(" + b"".join(_scalar(rng) for _ in range(rng.randrange(4))) + b"tR"
        if rng.random() < 0.3:
            call += b"(" + b"".join(_scalar(rng) for _ in range(rng.randrange(9))) + b"tb"
        return call
    if r < 0.96:
        return _storage(rng)
    return _tensor(rng, _storage(rng), [rng.choice([1, 2, 4, 8, 2**20]) for _ in range(rng.randrange(3))],
                   [rng.choice([0, 1, 2, 4, 8]) for _ in range(rng.randrange(3))])


def _leaf(rng: random.Random) -> bytes:
    """Mostly values that load: scalars, numpy values (plain and hostile), tensors over real records."""
    r = rng.random()
    if r < 0.35:
        return _scalar(rng)
    if r < 0.75:
        return _numpy_value(rng)
    if r < 0.85:
        key, numel = rng.choice([("0", 64), ("1", 8)])
        storage = b"(" + _s("storage") + _g("torch", "FloatStorage") + _s(key) + _s("cpu") + _num(numel) + b"tQ"
        return _tensor(rng, storage, [rng.choice([1, 2, 4, 8])], [1])
    return _unit(rng)


def _tree(rng: random.Random, marker: str, depth: int = 0) -> bytes:
    """A well-formed value: nested lists, dicts, tuples and objects of a user's class around leaves."""
    r = rng.random()
    if depth < 4 and r < 0.35:
        items = [_tree(rng, marker, depth + 1) for _ in range(rng.randrange(5))]
        kind = rng.randrange(3)
        if kind == 0:
            return b"](" + b"".join(items) + b"e"
        if kind == 1:
            return b"}(" + b"".join(_s(f"k{i}") + v for i, v in enumerate(items)) + b"u"
        return b"(" + b"".join(items) + b"t"
    if depth < 4 and r < 0.45:  # NEWOBJ, then BUILD with a dict
        return _g("mypkg.cfg", "Config") + b")\x81}(" + _s("a") + _tree(rng, marker, depth + 1) + b"ub"
    if r < 0.46:
        return rng.choice(_payloads(marker))
    return _leaf(rng)


def _program(rng: random.Random, marker: str) -> bytes:
    """A random value: a well-formed tree, or opcodes that keep the stack discipline (mostly); one value."""
    if rng.random() < 0.5:
        return _tree(rng, marker)
    out = [b"("]  # everything inside one tuple: the fragment leaves exactly one value
    frames = [0]  # values above each open MARK
    memo: list[int] = []
    n_ops = rng.randrange(3, 60)
    payload_at = rng.randrange(n_ops) if rng.random() < 0.2 else -1
    for step in range(n_ops):
        top = frames[-1]
        ops = ["unit"] * 8 + ["mark"]
        ops += ["put", "tuple1"] * (top >= 1) + ["tuple2", "append", "reduce", "build"] * (top >= 2)
        ops += ["setitem", "tuple3"] * (top >= 3) + ["get"] * bool(memo) + ["close"] * (len(frames) > 1)
        op = rng.choice(ops) if rng.random() > 0.015 else "noise"
        if step == payload_at:
            out.append(rng.choice(_payloads(marker)))
            frames[-1] += 1
        elif op == "unit":
            out.append(_unit(rng))
            frames[-1] += 1
        elif op == "mark":
            out.append(b"(")
            frames.append(0)
        elif op == "put":
            memo.append(rng.randrange(8))
            out.append(b"q" + bytes([memo[-1]]))
        elif op == "get":
            out.append(b"h" + bytes([rng.choice(memo)]))
            frames[-1] += 1
        elif op.startswith("tuple"):
            n = int(op[-1])
            out.append(b"\x84\x85\x86\x87"[n:n + 1])
            frames[-1] -= n - 1
        elif op in ("append", "reduce", "build", "setitem"):
            out.append({"append": b"a", "reduce": b"R", "build": b"b", "setitem": b"s"}[op])
            frames[-1] -= 2 if op == "setitem" else 1
        elif op == "close":
            frames.pop()
            closer = rng.choice([b"t", b"e", b"u"] if frames[-1] >= 1 else [b"t"])
            out.append(closer)
            frames[-1] += closer == b"t"
        else:
            out.append(bytes([rng.randrange(256)]))
    out.append(b"t" * len(frames))
    return b"".join(out)


LEGACY_PREFIX = (pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + pickle.dumps(1001, protocol=2)
                 + pickle.dumps({"protocol_version": 1001, "little_endian": True}, protocol=2))


MARKER = "@@fuzz@@"


def _embed(rng: random.Random, program: bytes, bases: dict[str, bytes]) -> bytes:
    """The program as a hyper-parameter of a real checkpoint (zip or legacy), or as a whole pickle."""
    r = rng.random()
    if r < 0.75:
        fmt = "zip" if r < 0.5 else "legacy"
        raw = _s(MARKER)
        if fmt == "legacy":
            return bases["marked-legacy"].replace(raw, program)
        return _rezip(bases["marked-zip"], lambda n, d: d.replace(raw, program) if n.endswith("data.pkl") else d)
    whole = b"\x80\x02" + program + b"."
    if r < 0.9:
        return _rezip(bases["zip"], lambda n, d: whole if n.endswith("data.pkl") else d)
    return LEGACY_PREFIX + whole + pickle.dumps(["0"], protocol=2) + struct.pack("<q", 4) + b"\x00" * 16


def test_fuzz_loader_never_crashes_runs_code_or_exceeds_memory(tmp_path):
    rng = random.Random(SEED)
    files = tmp_path / "files"
    files.mkdir()
    marker = tmp_path / "PWNED"
    bases = _bases()
    for i in range(N_MUTANTS):
        (files / f"m{i:04d}.pt").write_bytes(_mutant(rng, bases))
    for i in range(N_PROGRAMS):
        (files / f"p{i:04d}.pt").write_bytes(_embed(rng, _program(rng, str(marker)), bases))
    log = tmp_path / "log.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", CHILD, str(files), str(log)], capture_output=True, text=True,
                         timeout=300, env=env, cwd=ROOT)
    events = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    last = next((e["start"] for e in reversed(events) if "start" in e), None)
    assert res.returncode == 0, f"child died (rc {res.returncode}) on {last}: {res.stderr[-2000:]}"
    status = {e["done"]: e["status"] for e in events if "done" in e}
    assert len(status) == N_MUTANTS + N_PROGRAMS
    bad = {name: s for name, s in status.items() if s not in ("ok", "refused")}
    assert not bad, bad
    assert not marker.exists()
    counts = {s: sum(v == s for v in status.values()) for s in ("ok", "refused")}
    assert counts["ok"] > 20 and counts["refused"] > 200, counts  # the corpus reaches both outcomes
