"""The never-run-a-pickle guarantee and inert placeholders for unknown globals.

Every malicious checkpoint here would create a marker file if it were unpickled
normally; loading it must refuse (CheckpointError naming the refusal) or turn
the callable into an inert placeholder -- and in both cases the file must not
exist afterwards.  Both torch zip and legacy formats are exercised.
"""
from __future__ import annotations

import argparse
import builtins
import hashlib
import importlib
import os
import pickle
import shlex
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from sam_probe.errors import CheckpointError
from sam_probe.loading.checkpoints import detect_format, load_checkpoint
from sam_probe.loading.safe_pickle import (
    Placeholder,
    RefusedFile,
    UnsafePickleError,
    globals_in_pickle,
    is_dangerous,
    make_placeholder,
    python3_name,
    safe_load,
)

FORMATS = {"zip": True, "legacy": False}  # value: _use_new_zipfile_serialization


def _save(obj, path, fmt: str) -> None:
    torch.save(obj, path, _use_new_zipfile_serialization=FORMATS[fmt])
    assert detect_format(path) == {"zip": "torch-zip", "legacy": "torch-legacy"}[fmt]


def _weights() -> dict[str, torch.Tensor]:
    return {"fc.weight": torch.arange(6.0).reshape(2, 3), "fc.bias": torch.ones(2)}


# --------------------------------------------------------------- attack vectors
def _write_marker(path: str) -> str:
    """A plain module-level function that writes a file (what a pickle could call)."""
    with open(path, "w") as fh:
        fh.write("pwned")
    return path


class ViaOsSystem:
    def __init__(self, marker): self.marker = marker
    def __reduce__(self): return (os.system, (f"touch {shlex.quote(self.marker)}",))


class ViaSubprocessCall:
    def __init__(self, marker): self.marker = marker
    def __reduce__(self): return (subprocess.call, (["touch", self.marker],))


class ViaSubprocessPopen:
    def __init__(self, marker): self.marker = marker
    def __reduce__(self): return (subprocess.Popen, (["touch", self.marker],))


class ViaEval:
    def __init__(self, marker): self.marker = marker
    def __reduce__(self): return (builtins.eval, (f"open({self.marker!r}, 'w').close()",))


class ViaExec:
    def __init__(self, marker): self.marker = marker
    def __reduce__(self): return (builtins.exec, (f"open({self.marker!r}, 'w').close()",))


class ViaIoOpen:
    # builtins.open is io.open: pickle writes it as the global ``io.open``
    def __init__(self, marker): self.marker = marker
    def __reduce__(self): return (builtins.open, (self.marker, "w"))


class ViaLocalFunction:
    """A local class whose __reduce__ calls a (non-blocked) function that writes a file."""
    def __init__(self, marker): self.marker = marker
    def __reduce__(self): return (_write_marker, (self.marker,))


class ViaNumpySave:
    def __init__(self, marker): self.marker = marker
    def __reduce__(self): return (np.save, (self.marker, np.zeros(3)))


class ViaTorchSave:
    def __init__(self, marker): self.marker = marker
    def __reduce__(self): return (torch.save, ({"x": 1}, self.marker))


REFUSED = {  # vector -> fragment of the global named in the refusal
    ViaOsSystem: "system",
    ViaSubprocessCall: "subprocess.call",
    ViaSubprocessPopen: "subprocess.Popen",
    ViaEval: "eval",
    ViaExec: "exec",
    ViaIoOpen: "open",
}
INERT = (ViaLocalFunction, ViaNumpySave, ViaTorchSave)


@pytest.mark.parametrize("vector", [*REFUSED, *INERT], ids=lambda c: c.__name__)
def test_control_payloads_are_live_when_fully_unpickled(tmp_path, vector):
    """Control: each payload really does create its file under an ordinary unpickle."""
    marker = str(tmp_path / "marker.npy")
    path = tmp_path / "evil.pt"
    torch.save({"model": _weights(), "evil": vector(marker)}, path)
    obj = torch.load(path, weights_only=False)
    if isinstance(obj["evil"], subprocess.Popen):
        obj["evil"].wait()
    elif hasattr(obj["evil"], "close"):
        obj["evil"].close()
    assert os.path.exists(marker)


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("vector", list(REFUSED), ids=lambda c: c.__name__)
def test_code_running_globals_are_refused(tmp_path, fmt, vector):
    marker = str(tmp_path / "marker")
    path = tmp_path / f"evil_{fmt}.pt"
    _save({"model": _weights(), "step": 3, "evil": vector(marker)}, path, fmt)
    assert not os.path.exists(marker)
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(path)
    msg = str(ei.value)
    assert "refused" in msg and REFUSED[vector] in msg and "\n" not in msg
    # a file written to run code is not met with advice to trust it
    assert "will not execute" in msg and "nothing was executed" in msg and "--trust-checkpoint" not in msg
    assert not os.path.exists(marker)
    # the low-level loader raises its own error, never returns the payload
    with pytest.raises(UnsafePickleError):
        safe_load(str(path))
    assert not os.path.exists(marker)


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("vector", INERT, ids=lambda c: c.__name__)
def test_other_file_writing_callables_become_inert_placeholders(tmp_path, fmt, vector):
    marker = str(tmp_path / "marker.npy")
    path = tmp_path / f"evil_{fmt}.pt"
    _save({"model": _weights(), "evil": vector(marker)}, path, fmt)
    ck = load_checkpoint(path)
    assert not os.path.exists(marker)
    assert ck.placeholders and "evil" in ck.extra_keys
    obj, names = safe_load(str(path))
    assert not os.path.exists(marker)
    ph = obj["evil"]
    assert isinstance(ph, Placeholder)
    assert marker in ph.args  # the arguments were recorded, not used
    assert names == ck.placeholders


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_builtins_open_global_is_refused(tmp_path, fmt, monkeypatch):
    """A pickle naming ``builtins.open`` (``__builtin__.open`` at protocol 2) itself."""
    marker = str(tmp_path / "marker")
    real_open = builtins.open

    def fake_open(*args, **kwargs):
        return real_open(*args, **kwargs)

    fake_open.__module__ = "builtins"
    fake_open.__qualname__ = fake_open.__name__ = "open"

    class ViaBuiltinsOpen:
        def __reduce__(self):
            return (fake_open, (marker, "w"))

    path = tmp_path / f"open_{fmt}.pt"
    with monkeypatch.context() as mp:
        mp.setattr(builtins, "open", fake_open)
        torch.save({"model": _weights(), "evil": ViaBuiltinsOpen()}, path,
                   _use_new_zipfile_serialization=FORMATS[fmt])
    assert builtins.open is real_open
    raw = path.read_bytes()
    assert b"open" in raw and (b"builtin" in raw)
    with pytest.raises(CheckpointError, match="refused.*builtins.open"):
        load_checkpoint(path)
    assert not os.path.exists(marker)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_attack_nested_deep_in_optimizer_state_still_refused(tmp_path, fmt):
    marker = str(tmp_path / "marker")
    path = tmp_path / "deep.pt"
    _save({"model": _weights(),
           "optimizer": {"state": {0: {"momentum_buffer": torch.zeros(2)}},
                         "param_groups": [{"lr": 0.1, "hook": [ViaOsSystem(marker)]}]}}, path, fmt)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)
    assert not os.path.exists(marker)


def test_plain_pickle_module_attack_is_not_executed(tmp_path):
    """A raw ``pickle.dumps`` payload (not torch framing) is not executed either."""
    marker = str(tmp_path / "marker")
    path = tmp_path / "raw.pt"
    path.write_bytes(pickle.dumps({"w": ViaOsSystem(marker)}, protocol=2))
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert not os.path.exists(marker)


# --------------------------------------------------------------- benign extras
CONFIG_MODULE = textwrap.dedent('''
    import os
    _IMPORT_MARKER = os.environ.get("SAM_PROBE_TEST_IMPORT_MARKER")
    if _IMPORT_MARKER:
        open(_IMPORT_MARKER, "a").close()   # importing this module leaves a trace

    class TrainConfig:
        def __init__(self, lr, width, depth=2):
            self.lr = lr
            self.width = width
            self.depth = depth

    class Slotted:
        __slots__ = ("a",)
        def __init__(self):
            self.a = 1

    def writer(path):
        open(path, "w").close()

    class Evil:
        def __init__(self, path):
            self.path = path
        def __reduce__(self):
            return (writer, (self.path,))
''')


@pytest.fixture
def config_module(tmp_path, monkeypatch):
    """A user module ``samprobe_tmpcfg_<n>`` in tmp that the test can hide after pickling."""
    name = "samprobe_tmpcfg_" + hashlib.sha1(str(tmp_path).encode()).hexdigest()[:10]
    src = tmp_path / "src"
    src.mkdir()
    (src / f"{name}.py").write_text(CONFIG_MODULE)
    import_marker = tmp_path / "imported"
    monkeypatch.setenv("SAM_PROBE_TEST_IMPORT_MARKER", str(import_marker))
    monkeypatch.syspath_prepend(str(src))
    mod = importlib.import_module(name)
    assert import_marker.exists()
    import_marker.unlink()
    yield mod, src / f"{name}.py", import_marker
    sys.modules.pop(name, None)


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("hide", ["delete-file", "keep-file-on-path"])
def test_custom_config_classes_become_placeholders_never_imported(tmp_path, fmt, hide, config_module):
    mod, mod_file, import_marker = config_module
    marker = tmp_path / "marker"
    path = tmp_path / f"cfg_{fmt}.pt"
    _save({"model": _weights(), "step": 12, "config": mod.TrainConfig(0.05, 16),
           "slot": mod.Slotted(), "evil": mod.Evil(str(marker))}, path, fmt)
    sys.modules.pop(mod.__name__)
    if hide == "delete-file":
        mod_file.unlink()
    # with the file still importable, loading must still not import it
    ck = load_checkpoint(path)
    assert mod.__name__ not in sys.modules
    assert not import_marker.exists()
    assert not marker.exists()
    assert set(ck.state) == {"fc.weight", "fc.bias"}
    assert torch.equal(ck.state["fc.bias"], torch.ones(2))
    assert ck.step == 12 and ck.step_source == "content:step"
    assert ck.hparams == {"lr": 0.05, "width": 16, "depth": 2}
    assert set(ck.placeholders) == {f"{mod.__name__}.{n}" for n in ("TrainConfig", "Slotted", "writer")}
    obj, _ = safe_load(str(path))
    cfg = obj["config"]
    assert isinstance(cfg, Placeholder) and type(cfg).__module__ == mod.__name__
    assert type(cfg).__qualname__ == "TrainConfig" and repr(cfg) == f"<unloaded {mod.__name__}.TrainConfig>"
    assert cfg.plain() == {"lr": 0.05, "width": 16, "depth": 2}
    assert isinstance(obj["evil"], Placeholder) and obj["evil"].args == (str(marker),)
    assert not marker.exists() and mod.__name__ not in sys.modules and not import_marker.exists()


def test_trust_loads_real_objects_of_benign_file(tmp_path, config_module):
    mod, _, _ = config_module
    path = tmp_path / "cfg.pt"
    torch.save({"model": _weights(), "config": mod.TrainConfig(0.1, 8)}, path)
    ck = load_checkpoint(path, trust=True)
    assert ck.trusted and ck.placeholders == []
    obj, names = safe_load(str(path), trust=True)
    assert isinstance(obj["config"], mod.TrainConfig) and names == []


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_namespace_and_numpy_hparams(tmp_path, fmt):
    path = tmp_path / "ns.pt"
    _save({"model": _weights(), "step": np.int64(40),
           "args": argparse.Namespace(lr=0.1, width=np.int64(7), wd=np.float32(0.5), name="sam", nest=[1, 2]),
           "stats": np.arange(4, dtype=np.float32), "flag": np.bool_(True)}, path, fmt)
    ck = load_checkpoint(path)
    assert ck.step == 40 and ck.step_source == "content:step"
    assert ck.placeholders == ["argparse.Namespace"]  # numpy is data-only and allowed, not a placeholder
    assert ck.hparams == {"lr": 0.1, "width": 7, "wd": 0.5, "name": "sam", "nest": [1, 2]}
    assert type(ck.hparams["width"]) is int
    obj, _ = safe_load(str(path))
    assert isinstance(obj["stats"], np.ndarray) and obj["stats"].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert obj["flag"] == True  # noqa: E712 - numpy bool


def test_placeholders_do_not_leak_into_torch_safe_globals(tmp_path):
    before = list(torch.serialization.get_safe_globals())
    path = tmp_path / "ns.pt"
    torch.save({"model": _weights(), "args": argparse.Namespace(a=1)}, path)
    load_checkpoint(path)
    # torch registers some of its own classes lazily (e.g. DTensor specs on first import), in any order;
    # nothing else may be added
    added = [g for g in torch.serialization.get_safe_globals() if g not in before]
    assert all(getattr(g, "__module__", "").startswith("torch.") for g in added), added
    assert not any(isinstance(g, type) and issubclass(g, Placeholder) for g in added)
    # and a later plain weights_only torch.load still rejects the class
    with pytest.raises(Exception, match="argparse.Namespace"):
        torch.load(path, weights_only=True)


# --------------------------------------------------------------- helpers
@pytest.mark.parametrize("name,dangerous", [
    ("posix.system", True), ("os.system", True), ("nt.system", True), ("subprocess.Popen", True),
    ("builtins.eval", True), ("builtins.exec", True), ("builtins.open", True), ("__builtin__.open", True),
    ("__builtin__.getattr", True), ("eval", True), ("io.open", True), ("shutil.rmtree", True),
    ("importlib.import_module", True), ("runpy.run_path", True), ("pickle.loads", True),
    ("builtins.set", False), ("collections.OrderedDict", False), ("argparse.Namespace", False),
    ("numpy.core.multiarray.scalar", False), ("mypkg.config.TrainConfig", False), ("print", False),
])
def test_is_dangerous(name, dangerous):
    assert is_dangerous(name) is dangerous


def test_python3_name():
    assert python3_name("__builtin__.open") == "builtins.open"
    assert python3_name("copy_reg._reconstructor") == "copyreg._reconstructor"
    assert python3_name("eval") == "builtins.eval"
    assert python3_name("argparse.Namespace") == "argparse.Namespace"


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_globals_in_pickle_reads_without_running(tmp_path, protocol):
    marker = tmp_path / "marker"
    data = pickle.dumps({"a": argparse.Namespace(x=1), "b": ViaOsSystem(str(marker)),
                         "c": [ViaSubprocessCall(str(marker))]}, protocol=protocol)
    names = {python3_name(n) for n in globals_in_pickle(data)}
    assert {"argparse.Namespace", "subprocess.call"} <= names
    assert any(n.endswith(".system") for n in names)
    assert isinstance(globals_in_pickle(b"\x80\x04garbage"), set)  # partial scan, never raises
    assert not marker.exists()


def test_make_placeholder_is_inert():
    cls = make_placeholder("some.pkg.Thing")
    assert cls.__module__ == "some.pkg" and cls.__qualname__ == "Thing" and issubclass(cls, Placeholder)
    obj = cls(1, 2, k=3)
    assert obj.args == (1, 2) and obj.state == {"k": 3}
    obj.__setstate__(({"a": 1}, None))
    assert obj.plain() == {"a": 1}
    assert cls().plain() is None and cls(5).plain() == [5]
    assert "some.pkg" not in sys.modules
    # a placeholder for a function name is a class: "calling" it only records arguments
    fn = make_placeholder("os.system")
    assert fn("rm -rf /").args == ("rm -rf /",)



# --------------------------------------------------------------- legit objects through the guarded allow-list
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_builtin_and_torch_values_beside_the_weights_load_exactly(tmp_path, fmt):
    """set / Counter / bytearray / torch.Size / complex / Parameters (with state) pickled as torch does."""
    from collections import Counter, OrderedDict

    p = torch.nn.Parameter(torch.arange(3.0))
    p.tag = "w"  # a Parameter with Python state: _rebuild_parameter_with_state
    extras = {"s": {1, 2, 3}, "c": Counter(a=2, b=1), "b": bytearray(b"\x00ab"), "size": torch.Size([2, 3]),
              "cx": 1 + 2j, "od": OrderedDict(x=1), "p": p, "half": torch.ones(2, dtype=torch.float16)}
    path = tmp_path / "extras.pt"
    _save({"model": _weights(), **extras}, path, fmt)
    obj, names = safe_load(str(path))
    assert names == []
    for k, v in extras.items():
        assert type(obj[k]) is type(v), k
        if isinstance(v, torch.Tensor):
            assert torch.equal(obj[k], v)
        else:
            assert obj[k] == v, k
    assert obj["p"].tag == "w"


def test_scan_reports_exact_globals_and_ends(tmp_path):
    from sam_probe.loading.pickle_scan import scan_pickle

    a = pickle.dumps(argparse.Namespace(x=1), protocol=2)
    b = pickle.dumps({1: {2}}, protocol=2)
    first = scan_pickle(a + b)
    assert first.end == len(a) and first.globals == {"argparse.Namespace"}
    second = scan_pickle(a + b, first.end)
    assert second.end == len(a) + len(b) and second.globals == {"builtins.set"}  # py2 '__builtin__' mapped


@pytest.mark.parametrize("data,kind,words", [
    (b"\x80\x02]" + b"N" * 50 + b".", "limit", "opcodes"),
    (b"\x80\x04\x95" + b"\x00" * 8 + b"N.", "foreign", "opcode"),  # protocol 4 framing: not read
    (b"\x80\x02h\x05.", "corrupt", "memo entry it never stored"),
    (b"\x80\x02a.", "corrupt", "pops more values"),
    (b"\x80\x02]", "corrupt", "truncated"),
])
def test_scan_bounds_and_malformed_pickles(tmp_path, monkeypatch, data, kind, words):
    from sam_probe.loading import pickle_scan
    from sam_probe.loading.safe_pickle import _scan

    monkeypatch.setattr(pickle_scan, "MAX_OPS", 20)
    with pytest.raises(RefusedFile) as ei:
        _scan(data)
    assert ei.value.kind == kind and words in str(ei.value)


def test_memo_fanout_counts_shared_values(monkeypatch):
    from sam_probe.loading import pickle_scan

    # L_0 = [None] (size 2), L_i = [L_{i-1}, L_{i-1}] (size 1 + 2 size(L_{i-1}) = 3 2^i - 1): all in one tuple
    levels = b"](Neq\x00" + b"".join(b"](h%ch%ceq%c" % (i - 1, i - 1, i) for i in range(1, 11))
    data = b"\x80\x02(" + levels + b"t."
    scan = pickle_scan.scan_pickle(data)
    assert scan.fanout == sum(2 * (3 * 2**j - 1) for j in range(10))  # L_j fetched twice for L_{j+1}
    monkeypatch.setattr(pickle_scan, "MAX_FANOUT", scan.fanout - 1)
    with pytest.raises(RefusedFile, match="memo bomb"):
        pickle_scan.scan_pickle(data)


def test_zip_crc_is_checked_even_when_trusted(tmp_path):
    path = tmp_path / "ck.pt"
    torch.save({"model": {"w": torch.arange(64.0)}}, path)
    raw = bytearray(path.read_bytes())
    i = raw.index(torch.arange(64.0).numpy().tobytes()[:16])
    raw[i + 8:i + 12] = b"\x00\x00\x80\x7f"  # one float becomes inf
    path.write_bytes(bytes(raw))
    for trust in (False, True):
        with pytest.raises(CheckpointError, match="fails its CRC"):
            load_checkpoint(path, trust=trust)


def test_copy_instead_of_mapping(tmp_path):
    path = tmp_path / "ck.pt"
    torch.save({"w": torch.arange(6.0)}, path)
    mapped, _ = safe_load(str(path))
    copied, _ = safe_load(str(path), mmap=False)
    assert torch.equal(mapped["w"], copied["w"])
    assert copied["w"].untyped_storage().data_ptr() != mapped["w"].untyped_storage().data_ptr()


def _same(ours, full, where: str = "") -> int:
    """Compare what the safe loader built with a full unpickle of the same (trusted) file; count values."""
    if isinstance(ours, Placeholder):
        return 1
    if isinstance(ours, torch.Tensor):
        assert isinstance(full, torch.Tensor) and ours.dtype == full.dtype and torch.equal(ours, full), where
        return 1
    if isinstance(ours, dict):
        assert type(ours) is type(full) and list(ours) == list(full), where
        return sum(_same(ours[k], full[k], f"{where}.{k}") for k in ours)
    if isinstance(ours, (list, tuple)):
        assert type(ours) is type(full) and len(ours) == len(full), where
        return sum(_same(a, b, f"{where}[{i}]") for i, (a, b) in enumerate(zip(ours, full)))
    if isinstance(ours, np.ndarray):
        assert np.array_equal(ours, full), where
        return 1
    assert type(ours) is type(full) and (ours == full or (ours != ours and full != full)), where
    return 1


def test_shipped_sample_runs_load_exactly_as_a_full_unpickle():
    """Independent reference: every shipped checkpoint, value by value, against torch.load(weights_only=False)."""
    from pathlib import Path

    files = sorted((Path(__file__).resolve().parents[2] / "sample_runs").glob("*/*.pt"))
    assert len(files) > 50
    compared = sum(_same(safe_load(str(f))[0], torch.load(f, weights_only=False)) for f in files)
    assert compared > 20 * len(files)


def test_torch_allow_list_is_restored_after_every_load(tmp_path):
    from torch import _weights_only_unpickler as wou

    original = wou._get_allowed_globals
    good, bad = tmp_path / "good.pt", tmp_path / "bad.pt"
    torch.save({"model": _weights(), "s": {1}}, good)
    torch.save({"model": _weights(), "w": torch.zeros(1).expand(3)}, bad)
    safe_load(str(good))
    with pytest.raises(RefusedFile, match="zero stride"):
        safe_load(str(bad))
    assert wou._get_allowed_globals is original
    assert torch.load(good, weights_only=True)["s"] == {1}  # torch's own loads see torch's own table
