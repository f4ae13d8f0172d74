"""Hostile checkpoint files, generated here, through the loader and the real CLI.

One test per class of attack: memory-unsafe numpy constructs, zip and memo bombs,
deep nesting, zero-stride / overlapping / too-small tensors, CRC corruption,
safetensors header lies, FIFOs, sockets and devices, non-UTF-8 file names,
bytes in hyper-parameters, and payloads that would run code.  Every file is put
through ``python -m sam_probe inspect DIR --json`` in one subprocess (and a few
through ``sharpness``), asserting: no signal, exit code 2 when anything is
refused, exactly one ``error:`` line per refused file on stderr, no marker file
created, and the subprocess timeout as the only time bound.

Hand-written pickle fragments are spliced into real ``torch.save`` output in
place of a marker string, so each file is a genuine checkpoint with one hostile
value inside (see :func:`splice`).
"""
from __future__ import annotations

import io
import json
import os
import shlex
import socket
import struct
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from sam_probe.errors import CheckpointError
from sam_probe.loading.checkpoints import load_checkpoint
from sam_probe.loading.numpy_safe import UnrebuiltNumpy
from sam_probe.loading.pickle_scan import MAX_OPS, MAX_PICKLE_BYTES
from sam_probe.loading.plaindata import MAX_DEPTH, MAX_NODES, plain
from sam_probe.loading.safe_pickle import safe_load

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 120  # the only time bound: generous, so a loaded CI machine cannot flake
MARKER = "@@hostile-value@@"


# --------------------------------------------------------------- pickle fragments (protocol 2 opcodes)
def G(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def S(s: str) -> bytes:
    b = s.encode("utf-8", "surrogatepass")
    return b"X" + struct.pack("<I", len(b)) + b


def I(n: int) -> bytes:  # noqa: E743 - an opcode builder
    return b"J" + struct.pack("<i", n)


def T(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def CALL(func: bytes, *args: bytes) -> bytes:
    return func + T(*args) + b"R"


def BUILD(obj: bytes, state: bytes) -> bytes:
    return obj + state + b"b"


def DICT(*pairs: tuple[bytes, bytes]) -> bytes:
    return b"}(" + b"".join(k + v for k, v in pairs) + b"u"


def LIST(*items: bytes) -> bytes:
    return b"](" + b"".join(items) + b"e"


def PUT(i: int) -> bytes:
    return b"r" + struct.pack("<I", i)


def GET(i: int) -> bytes:
    return b"j" + struct.pack("<I", i)


N, FALSE, TRUE = b"N", b"\x89", b"\x88"


def BYTES(b: bytes) -> bytes:
    return CALL(G("_codecs", "encode"), S(b.decode("latin1")), S("latin1"))


def DTYPE(code: str, state: bytes | None = None) -> bytes:
    d = CALL(G("numpy", "dtype"), S(code), FALSE, TRUE)
    return BUILD(d, state) if state is not None else d


def DSTATE(order: str = "|", names: bytes = N, fields: bytes = N, elsize: int = -1, flags: int = 0) -> bytes:
    return T(I(3), S(order), N, names, fields, I(elsize), I(-1), I(flags))


OBJECT_DTYPE = DTYPE("O", DSTATE(flags=63))


def splice(obj: dict, fragment: bytes, path: Path, legacy: bool = False) -> Path:
    """``torch.save(obj)`` with the string ``MARKER`` inside replaced by the opcodes ``fragment``."""
    raw = S(MARKER)
    if legacy:
        buf = io.BytesIO()
        torch.save(obj, buf, _use_new_zipfile_serialization=False)
        data = buf.getvalue()
        assert data.count(raw) == 1
        path.write_bytes(data.replace(raw, fragment))
        return path
    buf = io.BytesIO()
    torch.save(obj, buf)
    return rewrite_zip(buf.getvalue(), path, lambda name, d: d.replace(raw, fragment) if name.endswith("data.pkl")
                       else d)


def rewrite_zip(data: bytes, path: Path, change, deflate: tuple[str, ...] = ()) -> Path:
    """Copy a zip archive member by member, ``change(name, bytes)`` applied; members ending in ``deflate`` deflated."""
    with zipfile.ZipFile(io.BytesIO(data)) as zin, zipfile.ZipFile(path, "w") as zout:
        for info in zin.infolist():
            method = zipfile.ZIP_DEFLATED if info.filename.endswith(deflate) else zipfile.ZIP_STORED
            zout.writestr(info.filename, change(info.filename, zin.read(info)), compress_type=method)
    return path


# --------------------------------------------------------------- the corpus
@dataclass
class Expect:
    refused: bool
    phrase: str = ""  # a fragment of the error (refused) or of the JSON result (loaded)


def _base(tiny_runs) -> dict:
    """A real checkpoint written by ``sam-probe train`` (digits MLP), loaded by us, not by the code under test."""
    return torch.load(sorted(tiny_runs["sgd"].glob("*.pt"))[-1], weights_only=False)


M0 = 100_000  # memo indices of the fragments, far above torch's own


def _dag_lists(depth: int, width: int = 2) -> bytes:
    """(L_0, ..., L_depth), L_0 = [None], L_i = [L_{i-1}] * width: width ** depth values from a few bytes."""
    out = LIST(N) + PUT(M0)
    for i in range(1, depth + 1):
        out += b"](" + GET(M0 + i - 1) * width + b"e" + PUT(M0 + i)
    return b"(" + out + b"t"  # every level stays on the stack: one tuple of them all


def _dag_tuples(depth: int) -> bytes:
    """(T_0, ..., T_depth), T_0 = (None,), T_i = (T_{i-1}, T_{i-1}): hashing T_depth visits 2^depth tuples."""
    out = T(N) + PUT(M0)
    for i in range(1, depth + 1):
        out += GET(M0 + i - 1) + GET(M0 + i - 1) + b"\x86" + PUT(M0 + i)
    return b"(" + out + b"t"


def _colliding_ints(n: int) -> bytes:
    """``n`` distinct integers k * (2^61 - 1): all share one hash, as dict keys they make inserts quadratic."""
    return DICT(*[(b"\x8a\x0a" + ((k + 1) * (2**61 - 1)).to_bytes(10, "little", signed=True), N) for k in range(n)])


def _numpy_fragments() -> dict[str, bytes]:
    """numpy constructs that numpy's own unpickling turns into wild reads and writes."""
    recon = G("numpy._core.multiarray", "_reconstruct")
    return {
        # numpy.ndarray(shape, dtype('O'), buffer): object pointers read from raw bytes
        "object_from_bytes": CALL(G("numpy", "ndarray"), T(I(4)), OBJECT_DTYPE, BYTES(b"A" * 32)),
        # _reconstruct + __setstate__ with an object dtype and raw bytes for its data
        "reconstruct_object": BUILD(CALL(recon, G("numpy", "ndarray"), T(I(0)), BYTES(b"b")),
                                    T(I(1), T(I(4)), OBJECT_DTYPE, FALSE, BYTES(b"A" * 32))),
        # a void dtype whose state claims an object field
        "void_object_field": CALL(G("numpy._core.multiarray", "scalar"),
                                  DTYPE("V8", DSTATE(names=T(S("a")), fields=DICT((S("a"), T(OBJECT_DTYPE, I(0)))),
                                                     elsize=8, flags=63)), BYTES(b"A" * 8)),
        # a field offset far past the item size
        "void_offset_past_item": CALL(G("numpy._core.multiarray", "scalar"),
                                      DTYPE("V8", DSTATE(names=T(S("a")), fields=DICT((S("a"), T(DTYPE("<f8"), I(4096)))),
                                                         elsize=8)), BYTES(b"A" * 8)),
        # a plain dtype whose data is shorter than its shape
        "short_data": BUILD(CALL(recon, G("numpy", "ndarray"), T(I(0)), BYTES(b"b")),
                            T(I(1), T(I(1000)), DTYPE("f8", DSTATE("<")), FALSE, BYTES(b"\x00" * 8))),
    }


def _safetensors(path: Path, header: dict | str, data: bytes) -> Path:
    h = (header if isinstance(header, str) else json.dumps(header)).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return path


def _zip_bomb(original: bytes, path: Path, inflated: int) -> Path:
    """``original`` (a torch zip) with its data.pkl replaced by ``inflated`` bytes of opcodes, deflated."""
    with zipfile.ZipFile(io.BytesIO(original)) as zin, \
            zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zout:
        for info in zin.infolist():
            if not info.filename.endswith("data.pkl"):
                zout.writestr(info.filename, zin.read(info), compress_type=zipfile.ZIP_STORED)
                continue
            with zout.open(info.filename, "w") as fh:  # streamed: never the whole pickle in memory
                fh.write(b"\x80\x02](")
                chunk = b"N" * 2**20
                for _ in range(inflated // len(chunk) + 1):
                    fh.write(chunk)
                fh.write(b"e.")
    return path


def _crc_corrupt(base: dict, path: Path) -> tuple[Path, str]:
    """A torch zip whose largest tensor record has 64 bytes overwritten with finite garbage."""
    torch.save(base, path)
    with zipfile.ZipFile(path) as zf:
        info = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
        raw = bytearray(path.read_bytes())
        n_name, n_extra = struct.unpack_from("<HH", raw, info.header_offset + 26)
        start = info.header_offset + 30 + n_name + n_extra + 64
    raw[start:start + 64] = np.ones(16, dtype=np.float32).tobytes()
    path.write_bytes(bytes(raw))
    return path, info.filename


class Payload:
    """An object whose unpickling would run ``touch MARKER`` (os.system)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_runs):
    """``(directory, {file name: Expect}, marker)``: every hostile file of this module, plus controls."""
    d = tmp_path_factory.mktemp("hostile")
    marker = d.parent / "PWNED"
    base = _base(tiny_runs)
    expect: dict[str, Expect] = {}

    def spliced(name: str, fragment: bytes, refused: bool, phrase: str = "", legacy: bool = False,
                front: bool = False):
        """The hostile value in the hyper-parameters, or (``front``) as the first key, before any tensor."""
        obj = {"hostile": MARKER, **base} if front else {**base, "hparams": {**base["hparams"], "hostile": MARKER}}
        splice(obj, fragment, d / name, legacy=legacy)
        expect[name] = Expect(refused, phrase)

    # controls: a real checkpoint, one with legit numpy values, one with its pickle deflated
    torch.save(base, d / "control.pt")
    expect["control.pt"] = Expect(False, '"step": 20')
    torch.save({**base, "hparams": {**base["hparams"], "lr": np.float64(0.25), "width": np.int64(7),
                                    "betas": np.array([0.9, 0.999])}}, d / "control_numpy.pt")
    expect["control_numpy.pt"] = Expect(False, '"betas": [')
    buf = io.BytesIO()
    torch.save(base, buf)
    rewrite_zip(buf.getvalue(), d / "control_deflated.pt", lambda n, b: b, deflate=("data.pkl",))
    expect["control_deflated.pt"] = Expect(False, '"step": 20')

    # 1. memory-unsafe numpy constructs: rebuilt as inert placeholders, the file loads
    for key, frag in _numpy_fragments().items():
        spliced(f"numpy_{key}.pt", frag, False, "not rebuilt")
    spliced("numpy_object_legacy.pt", _numpy_fragments()["object_from_bytes"], False, "not rebuilt", legacy=True)

    # 2. bombs and deep nesting
    _zip_bomb(buf.getvalue(), d / "zip_bomb.pt", MAX_PICKLE_BYTES + 2**20)
    expect["zip_bomb.pt"] = Expect(True, "zip bomb")
    spliced("memo_bomb_binary.pt", _dag_lists(40), True, "memo bomb")
    spliced("memo_bomb_wide.pt", _dag_lists(6, width=1000), True, "memo bomb")
    spliced("hash_bomb_tuple_key.pt", DICT((_dag_tuples(60), N)), True, "memo bomb")
    spliced("hash_flood.pt", _colliding_ints(5000), True, "hash-collision")
    spliced("many_opcodes.pt", b"](" + b"N" * (MAX_OPS + 10) + b"e", True, "opcodes")
    spliced("shared_dag_ok.pt", _dag_lists(18), False, "more items>")
    spliced("deep_lists.pt", b"]" * 200_000 + b"a" * 199_999, False, f"deeper than {MAX_DEPTH} levels")
    spliced("deep_tuples.pt", N + b"\x85" * 200_000, True, "nests tuples")

    # 3. tensors: zero stride, overlapping, storage too small, claimed size larger than the record
    torch.save({**base, "model": {**base["model"], "net.0.bias": torch.zeros(1).expand(2**20, 2**20)}},
               d / "stride0.pt")
    expect["stride0.pt"] = Expect(True, "zero stride")
    torch.save({**base, "model": {**base["model"], "net.0.bias": torch.arange(16.0).as_strided((5, 5), (2, 1))}},
               d / "overlap.pt")
    expect["overlap.pt"] = Expect(True, "overlapping entries")
    numel = base["model"]["net.0.weight"].numel()  # storage '0' once 'hostile' is the first key

    def storage(n: int) -> bytes:
        return T(S("storage"), G("torch", "FloatStorage"), S("0"), S("cpu"), I(n)) + b"Q"

    def tensor(n: int, size: int) -> bytes:
        return CALL(G("torch._utils", "_rebuild_tensor_v2"), storage(n), I(0), T(I(size)), T(I(1)), FALSE,
                    CALL(G("collections", "OrderedDict")))

    spliced("storage_too_small.pt", tensor(numel, numel * 100), True, "more bytes than its storage holds",
            front=True)
    spliced("storage_claim_past_record.pt", tensor(numel * 100, numel * 100), True, "but its pickle claims",
            front=True)

    # torch's own allow-listed constructors, bounded: allocation by size, iteration of a tensor, uninitialised data
    spliced("alloc_bytearray.pt", CALL(G("builtins", "bytearray"), I(2**31 - 1)), True, "allocation bomb")
    spliced("alloc_set_of_tensor.pt", CALL(G("builtins", "set"), tensor(numel, numel)), True, "set from",
            front=True)
    spliced("alloc_nested_tensor.pt", CALL(G("torch._utils", "_rebuild_nested_tensor"), N, N, N, N), True,
            "nested tensors")
    spliced("alloc_uninitialised.pt", LIST(CALL(G("torch", "FloatTensor"), I(4)), CALL(G("torch", "DoubleTensor"),
                                                                                        I(1))),
            False, "its data is not in the file")

    # 4. corruption: a tensor record overwritten with finite garbage
    _, member = _crc_corrupt(base, d / "crc_corrupt.pt")
    expect["crc_corrupt.pt"] = Expect(True, f"corrupt: member {member} fails its CRC; re-save or re-copy it")

    # 5. safetensors headers that lie about the data
    w = np.arange(4, dtype=np.float32).tobytes()
    entry = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
    lies = {
        "st_gap": ({"a": {**entry, "data_offsets": [8, 24]}}, b"\x00" * 8 + w, "gap"),
        "st_overlap": ({"a": entry, "b": {**entry, "data_offsets": [8, 24]}}, w + w[:8], "overlap"),
        "st_out_of_range": ({"a": {**entry, "data_offsets": [0, 16]}, "b": {**entry, "data_offsets": [16, 32]}},
                            w, "cover"),
        "st_shape_lie": ({"a": {**entry, "shape": [4, 4]}}, w, "needs 64 bytes"),
        "st_deep_header": ('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}", b"", "nests too deeply"),
        "st_duplicate_key": ('{"a": %s, "a": %s}' % (json.dumps(entry), json.dumps(entry)), w, "duplicate"),
    }
    for name, (header, data, phrase) in lies.items():
        _safetensors(d / f"{name}.safetensors", header, data)
        expect[f"{name}.safetensors"] = Expect(True, phrase)

    # 6. files that are not files, and names that are not UTF-8
    os.mkfifo(d / "fifo.pt")
    expect["fifo.pt"] = Expect(True, "is a FIFO")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(d / "sock.pt"))
    expect["sock.pt"] = Expect(True, "socket")
    odd = os.fsdecode(os.fsencode(str(d)) + b"/ckpt_\xff.pt")
    with open(odd, "wb") as fh:
        torch.save(base, fh)
    expect[Path(odd).name] = Expect(False, '"step": 20')

    # 7. bytes in hyper-parameters, code-running payloads
    torch.save({**base, "hparams": {**base["hparams"], "token": b"\x00\xff" * 40, "short": b"ab"}},
               d / "bytes_hparams.pt")
    expect["bytes_hparams.pt"] = Expect(False, '"token": "<bytes 80>"')
    torch.save({**base, "evil": Payload(marker)}, d / "evil_os_system.pt")
    expect["evil_os_system.pt"] = Expect(True, "will not execute")
    torch.save({**base, "evil": Payload(marker)}, d / "evil_legacy.pt", _use_new_zipfile_serialization=False)
    expect["evil_legacy.pt"] = Expect(True, "will not execute")
    torch.save({**base, "evil": Payload(marker)}, d / "evil_protocol4.pt", pickle_protocol=4)
    expect["evil_protocol4.pt"] = Expect(True, "will not execute")
    assert not marker.exists()
    yield d, expect, marker
    sock.close()


def _cli(*args, timeout: int = TIMEOUT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "80"}
    return subprocess.run([sys.executable, "-m", "sam_probe", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT, errors="backslashreplace")


@pytest.fixture(scope="module")
def inspected(corpus):
    """One ``inspect DIR --json`` over the whole corpus: ``(result, {name: error line}, {name: JSON entry})``."""
    d, expect, marker = corpus
    res = _cli("inspect", d, "--json")
    errors: dict[str, str] = {}
    for line in res.stderr.splitlines():
        assert line.startswith("error: "), line
        names = [n for n in expect if n in line.replace("\\xff", "\udcff")]
        assert len(names) == 1, line
        assert names[0] not in errors, f"two lines for {names[0]}"
        errors[names[0]] = line
    entries = {Path(e["path"]).name: e for e in json.loads(res.stdout)["checkpoints"]}
    assert not marker.exists()
    return res, errors, entries


def _check(inspected, corpus, prefix: str) -> list[str]:
    res, errors, entries = inspected
    _, expect, _ = corpus
    names = [n for n in expect if n.startswith(prefix)]
    assert names
    assert res.returncode == 2  # refused files are errors; never a signal (negative code)
    for name in names:
        exp = expect[name]
        if exp.refused:
            assert name in errors, f"{name} was not refused"
            assert exp.phrase in errors[name], errors[name]
            assert "error" in entries[name]
        else:
            assert name not in errors, errors.get(name)
            assert exp.phrase in json.dumps(entries[name]), (name, entries[name])
    return names


# --------------------------------------------------------------- the tests, one per class
def test_every_file_is_accounted_for_in_one_inspect_run(inspected, corpus):
    res, errors, entries = inspected
    _, expect, marker = corpus
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert set(entries) == set(expect)
    assert set(errors) == {n for n, e in expect.items() if e.refused}
    for name, line in errors.items():
        assert "--trust-checkpoint" not in line or "if you wrote this file yourself" in line
    assert not marker.exists()
    _check(inspected, corpus, "control")


def test_memory_unsafe_numpy_constructs_become_placeholders(inspected, corpus):
    names = _check(inspected, corpus, "numpy_")
    d, _, _ = corpus
    for name in names:
        ck = load_checkpoint(d / name)
        assert ck.hparams["hostile"].startswith("<numpy ") and "not rebuilt" in ck.hparams["hostile"]
        assert any("not rebuilt" in n for n in ck.placeholders)
        obj, _ = safe_load(str(d / name))
        assert isinstance(obj["hparams"]["hostile"], UnrebuiltNumpy), name
        json.dumps(plain(obj), allow_nan=False)


def test_legit_numpy_values_are_rebuilt_exactly(corpus):
    d, _, _ = corpus
    ck = load_checkpoint(d / "control_numpy.pt")
    assert ck.hparams["lr"] == 0.25 and type(ck.hparams["lr"]) is float
    assert ck.hparams["width"] == 7 and type(ck.hparams["width"]) is int
    assert ck.hparams["betas"] == [0.9, 0.999]
    obj, names = safe_load(str(d / "control_numpy.pt"))
    arr = obj["hparams"]["betas"]
    assert isinstance(arr, np.ndarray) and arr.dtype == np.float64 and arr.flags.owndata and arr.flags.writeable
    assert type(obj["hparams"]["lr"]) is np.float64 and names == []


def test_bombs_and_deep_nesting(inspected, corpus):
    _check(inspected, corpus, "zip_bomb")
    _check(inspected, corpus, "memo_bomb")
    _check(inspected, corpus, "hash_")
    _check(inspected, corpus, "many_opcodes")
    _check(inspected, corpus, "deep_")
    _check(inspected, corpus, "shared_dag_ok")
    d, _, _ = corpus
    ck = load_checkpoint(d / "shared_dag_ok.pt")  # 2^18 values reachable: a bounded copy is shown
    text = json.dumps(ck.hparams)
    assert "more items>" in text and len(text) < 50 * MAX_NODES
    assert "deeper than" in json.dumps(load_checkpoint(d / "deep_lists.pt").hparams)


def test_torch_allowlisted_constructors_are_bounded(inspected, corpus):
    _check(inspected, corpus, "alloc_")
    _, _, entries = inspected
    shown = entries["alloc_uninitialised.pt"]["hparams"]["hostile"]
    assert all(isinstance(v, str) and "not rebuilt" in v for v in shown)  # never the uninitialised bytes


def test_zero_stride_overlapping_and_too_small_tensors(inspected, corpus):
    _check(inspected, corpus, "stride0")
    _check(inspected, corpus, "overlap")
    _check(inspected, corpus, "storage_")


def test_nonfinite_scan_counts_storage_not_expansion():
    from sam_probe.loading.checkpoints import Checkpoint

    t = torch.full((1,), float("nan")).expand(2**20, 2**20)  # 2^40 entries, one stored
    ck = Checkpoint("x", "torch-zip", "state_dict", {"w": t, "ok": torch.ones(3)})
    assert ck.nonfinite() == {"w": 1}


def test_crc_corruption_of_a_tensor_record(inspected, corpus):
    _check(inspected, corpus, "crc_")
    d, _, _ = corpus
    with pytest.raises(CheckpointError, match="fails its CRC"):
        load_checkpoint(d / "crc_corrupt.pt")


def test_safetensors_header_lies(inspected, corpus):
    names = _check(inspected, corpus, "st_")
    _, errors, _ = inspected
    assert all("safetensors" in errors[n] for n in names)


def test_fifo_socket_and_device_are_refused_without_blocking(inspected, corpus):
    _check(inspected, corpus, "fifo")
    _check(inspected, corpus, "sock")
    res = _cli("inspect", "/dev/zero", "--json")
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: /dev/zero: is a character device"), res.stderr


def test_non_utf8_file_name_loads(inspected, corpus):
    _check(inspected, corpus, "ckpt_")


def test_bytes_in_hparams_are_shown_safely(inspected, corpus):
    _check(inspected, corpus, "bytes_hparams")
    _, _, entries = inspected
    assert entries["bytes_hparams.pt"]["hparams"]["short"] == "<bytes 2: 6162>"


def test_code_running_payloads_are_refused_without_trust_advice(inspected, corpus):
    names = _check(inspected, corpus, "evil_")
    _, errors, _ = inspected
    _, _, marker = corpus
    for name in names:
        assert "nothing was executed" in errors[name] and "--trust-checkpoint" not in errors[name]
    assert not marker.exists()


def test_sharpness_cli_on_hostile_files(corpus, tmp_path):
    """The real analysis command: loadable files are analysed, refused ones are one line each."""
    d, expect, marker = corpus
    run = tmp_path / "run"
    run.mkdir()
    chosen = ["control.pt", "numpy_object_from_bytes.pt", "bytes_hparams.pt", "crc_corrupt.pt", "zip_bomb.pt",
              "memo_bomb_binary.pt", "stride0.pt", "evil_os_system.pt"]
    for name in chosen:
        os.link(d / name, run / name)
    res = _cli("sharpness", run, "--model", "mlp", "--data", "digits", "--max-samples", "64", "--top-k", "1",
               "--no-store", "--json")
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    refused = [n for n in chosen if expect[n].refused]
    assert len(lines) == len(refused) and all(line.startswith("error: ") for line in lines), res.stderr
    for name in refused:
        assert sum(name in line for line in lines) == 1
    done = {Path(r["path"]).name for r in json.loads(res.stdout)["results"]}
    assert done == {n for n in chosen if not expect[n].refused}
    assert not marker.exists()
