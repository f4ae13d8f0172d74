"""Reading one checkpoint: formats, layouts, prefixes, steps, hyper-parameters, bad input."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from sam_probe.errors import CheckpointError
from sam_probe.loading.checkpoints import (
    STATE_KEYS,
    detect_format,
    find_state,
    load_checkpoint,
    step_from_name,
    strip_prefixes,
)
from writers import LAYOUTS, save_in_layout

HP = {"lr": 0.1, "width": 4, "opt": "sam"}

# layout -> (format, layout name, step source, prefixes stripped, hparams saved, extra keys)
EXPECTED = {
    "plain": ("torch-zip", "state_dict", None, [], False, []),
    "model-key": ("torch-zip", "key:model", "content:step", [], True, ["step", "hparams"]),
    "lightning": ("torch-zip", "lightning", "content:global_step", [], True,
                  ["epoch", "global_step", "pytorch-lightning_version", "optimizer_states", "lr_schedulers",
                   "hyper_parameters", "callbacks", "loops"]),
    "ddp": ("torch-zip", "key:state_dict", "content:iteration", ["module."], False, ["iteration"]),
    "compiled": ("torch-zip", "key:model_state_dict", "content:step", ["_orig_mod."], False, ["step"]),
    "ddp-compiled": ("torch-zip", "key:net", "content:step", ["module.", "_orig_mod."], False, ["step"]),
    "safetensors": ("safetensors", "state_dict", "content:step", [], True, []),
    "namespace": ("torch-zip", "key:model", "content:step", [], True, ["args", "step"]),
    "legacy": ("torch-legacy", "key:model", "content:step", [], False, ["step"]),
}


def _one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert msg and "\n" not in msg and "Traceback" not in msg
    return msg


def test_expected_table_covers_every_layout():
    assert set(EXPECTED) == set(LAYOUTS)


# ------------------------------------------------------------------ layouts
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_loads_same_tensors(tmp_path, tiny_state, layout):
    path = save_in_layout(tiny_state, tmp_path / "ck.bin", layout, step=300, hparams=HP)
    fmt, lay, source, stripped, has_hp, extra = EXPECTED[layout]
    assert detect_format(path) == fmt
    ck = load_checkpoint(path)
    assert (ck.format, ck.layout, ck.stripped_prefixes) == (fmt, lay, stripped)
    assert ck.extra_keys == extra
    names = set(tiny_state) if layout != "lightning" else {"model." + k for k in tiny_state}
    assert set(ck.state) == names
    for k, v in tiny_state.items():
        got = ck.state[k if layout != "lightning" else "model." + k]
        assert got.dtype == v.dtype and torch.equal(got, v)
    if source is None:  # the plain layout has no step: the file name has none either
        assert (ck.step, ck.step_source) == (None, "position")
    else:
        assert (ck.step, ck.step_source) == (300, source)
    assert ck.hparams == (HP if has_hp else {})
    assert ck.n_params == sum(v.numel() for v in tiny_state.values() if v.is_floating_point())
    assert ck.nonfinite() == {}
    assert not ck.trusted


@pytest.mark.parametrize("layout", [x for x in LAYOUTS if x != "lightning"])
def test_layout_without_step_falls_back_to_position(tmp_path, tiny_state, layout):
    ck = load_checkpoint(save_in_layout(tiny_state, tmp_path / "weights.pt", layout))
    assert (ck.step, ck.step_source) == (None, "position")


def test_lightning_without_global_step_uses_epoch(tmp_path, tiny_state):
    ck = load_checkpoint(save_in_layout(tiny_state, tmp_path / "last.ckpt", "lightning"))
    assert (ck.step, ck.step_source) == (0, "content:epoch")


@pytest.mark.parametrize("key", STATE_KEYS)
def test_each_state_key_is_detected(tmp_path, tiny_state, key):
    path = tmp_path / "ck.pt"
    torch.save({key: tiny_state, "epoch": 2, "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}}, path)
    ck = load_checkpoint(path)
    assert ck.layout == f"key:{key}" and set(ck.state) == set(tiny_state)
    assert ck.extra_keys == ["epoch", "optimizer"]
    assert (ck.step, ck.step_source) == (2, "content:epoch")


@pytest.mark.parametrize("outer,inner", [("ema", "model"), ("ema", "state_dict"), ("model", "module"),
                                         ("state_dict", "net")])
def test_one_level_nesting(tmp_path, tiny_state, outer, inner):
    path = tmp_path / "ck.pt"
    torch.save({outer: {inner: tiny_state, "decay": 0.999}, "step": 7}, path)
    ck = load_checkpoint(path)
    assert ck.layout == f"key:{outer}.{inner}" and set(ck.state) == set(tiny_state)
    assert ck.step == 7 and ck.extra_keys == ["step"]


def test_explicit_dotted_key(tmp_path, tiny_state):
    other = {k: torch.zeros_like(v) for k, v in tiny_state.items()}
    path = tmp_path / "ck.pt"
    torch.save({"model": other, "a": {"b": {"module." + k: v for k, v in tiny_state.items()}, "c": 1}}, path)
    assert torch.equal(load_checkpoint(path).state["fc1.weight"], other["fc1.weight"])  # auto: 'model'
    ck = load_checkpoint(path, key="a.b")
    assert ck.layout == "key:a.b" and ck.stripped_prefixes == ["module."]
    assert torch.equal(ck.state["fc1.weight"], tiny_state["fc1.weight"])
    with pytest.raises(CheckpointError, match=r"--key a\.x: no entry 'x' \(found: b, c\)") as ei:
        load_checkpoint(path, key="a.x")
    assert str(path) in _one_line(ei.value)
    with pytest.raises(CheckpointError, match="holds no tensors"):
        load_checkpoint(path, key="a.c")
    with pytest.raises(CheckpointError, match="no entry"):
        load_checkpoint(path, key="a.c.d")


def test_key_selects_ema_over_model(tmp_path, tiny_state):
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in tiny_state.items()}
    path = tmp_path / "ck.pt"
    torch.save({"model": tiny_state, "ema": {"model": ema}}, path)
    assert load_checkpoint(path).layout == "key:model"
    ck = load_checkpoint(path, key="ema.model")
    assert torch.equal(ck.state["fc2.bias"], ema["fc2.bias"])


def test_whole_module_pickle_loads_only_when_trusted(tmp_path, tiny_model):
    path = tmp_path / "model.pt"
    torch.save(tiny_model, path)
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(path)
    _one_line(ei.value)
    ck = load_checkpoint(path, trust=True)
    assert ck.layout == "module" and ck.trusted and set(ck.state) == set(tiny_model.state_dict())


def test_tensor_step_beside_nested_state(tmp_path, tiny_state):
    path = tmp_path / "ck.pt"
    torch.save({"model": tiny_state, "step": torch.tensor(5)}, path)
    ck = load_checkpoint(path)
    assert ck.layout == "key:model" and set(ck.state) == set(tiny_state)


def test_tensor_step_with_more_extras(tmp_path, tiny_state):
    path = tmp_path / "ck.pt"
    torch.save({"model": tiny_state, "step": torch.tensor(5), "epoch": 1, "optimizer": {}}, path)
    ck = load_checkpoint(path)
    assert ck.layout == "key:model" and set(ck.state) == set(tiny_state)
    assert (ck.step, ck.step_source) == (5, "content:step")


# ------------------------------------------------------------------ formats
@pytest.mark.parametrize("name", ["weights.bin", "x.ckpt", "noext", "model.pth", "st_looks_torch.pt"])
def test_format_from_content_not_extension(tmp_path, tiny_state, name):
    path = tmp_path / name
    if name.startswith("st_"):
        save_file(tiny_state, str(path))
        expect = "safetensors"
    else:
        torch.save(tiny_state, path)
        expect = "torch-zip"
    assert detect_format(path) == expect
    ck = load_checkpoint(path)
    assert ck.format == expect and set(ck.state) == set(tiny_state)


def test_legacy_format_detected(tmp_path, tiny_state):
    path = tmp_path / "old.pt"
    torch.save({"state_dict": tiny_state, "global_step": 99}, path, _use_new_zipfile_serialization=False)
    ck = load_checkpoint(path)
    assert ck.format == "torch-legacy" and (ck.step, ck.step_source) == (99, "content:global_step")
    assert torch.equal(ck.state["bn.running_var"], tiny_state["bn.running_var"])


def test_safetensors_metadata(tmp_path, tiny_state):
    path = tmp_path / "model.safetensors"
    save_file(tiny_state, str(path), metadata={"step": "1500", "hparams": json.dumps({"lr": 0.3}),
                                               "model_spec": json.dumps({"name": "mlp", "args": {"width": 4}})})
    ck = load_checkpoint(path)
    assert ck.format == "safetensors" and ck.layout == "state_dict"
    assert (ck.step, ck.step_source) == (1500, "content:step")
    assert ck.hparams == {"lr": 0.3}
    assert ck.model_spec == {"name": "mlp", "args": {"width": 4}}
    assert ck.extra_keys == [] and ck.placeholders == []


@pytest.mark.parametrize("meta,expected", [
    ({"global_step": "42"}, (42, "content:global_step")),
    ({"step": "not-a-number"}, (77, "filename")),
    ({}, (77, "filename")),
    ({"hparams": "{broken"}, (77, "filename")),
])
def test_safetensors_metadata_step_or_filename(tmp_path, tiny_state, meta, expected):
    path = tmp_path / "step_77.safetensors"
    save_file(tiny_state, str(path), metadata=meta or None)
    ck = load_checkpoint(path)
    assert (ck.step, ck.step_source) == expected
    assert ck.hparams == {}


# ------------------------------------------------------------------ prefixes
PREFIXES = ["module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module.", "module.module.",
            "_orig_mod.module._orig_mod.", "module._orig_mod.module._orig_mod."]


@pytest.mark.parametrize("prefix", PREFIXES)
def test_prefixes_stripped_repeatedly_in_any_order(tmp_path, tiny_state, prefix):
    path = tmp_path / "ck.pt"
    torch.save({"model": {prefix + k: v for k, v in tiny_state.items()}}, path)
    ck = load_checkpoint(path)
    assert set(ck.state) == set(tiny_state)
    assert "".join(ck.stripped_prefixes) == prefix


def test_orig_mod_inside_another_prefix():
    """torch.compile inside a LightningModule: 'model._orig_mod.fc1.weight'."""
    state = {"model._orig_mod.fc1.weight": torch.ones(1), "model._orig_mod.bn.running_mean": torch.ones(1)}
    out, stripped = strip_prefixes(state)
    assert set(out) == {"model.fc1.weight", "model.bn.running_mean"}
    assert stripped == ["*._orig_mod."]


def test_prefix_not_shared_by_all_names_is_kept():
    state = {"module.a": torch.ones(1), "b": torch.ones(1)}
    out, stripped = strip_prefixes(state)
    assert set(out) == {"module.a", "b"} and stripped == []


def test_strip_prefixes_empty_state():
    assert strip_prefixes({}) == ({}, [])


# ------------------------------------------------------------------ steps
@pytest.mark.parametrize("key", ["step", "global_step", "iteration", "epoch"])
@pytest.mark.parametrize("value", [123, np.int64(123), np.int32(123), np.uint16(123), 123.0, np.float64(123.0),
                                   "123"], ids=lambda v: type(v).__name__)
def test_step_from_content(tmp_path, tiny_state, key, value):
    path = tmp_path / "step_999.pt"
    torch.save({"model": tiny_state, key: value, "optimizer": {}}, path)
    ck = load_checkpoint(path)
    assert (ck.step, ck.step_source) == (123, f"content:{key}")
    assert type(ck.step) is int


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_numpy_step_in_both_formats(tmp_path, tiny_state, fmt):
    path = tmp_path / "ck.pt"
    torch.save({"model": tiny_state, "global_step": np.int64(2**40)}, path,
               _use_new_zipfile_serialization=fmt == "zip")
    ck = load_checkpoint(path)
    assert (ck.step, ck.step_source) == (2**40, "content:global_step")
    assert ck.placeholders == []


def test_step_key_priority(tmp_path, tiny_state):
    path = tmp_path / "ck.pt"
    torch.save({"epoch": 3, "iteration": 50, "global_step": 1200, "model": tiny_state}, path)
    assert load_checkpoint(path).step_source == "content:global_step"
    torch.save({"epoch": 3, "iteration": 50, "model": tiny_state}, path)
    assert load_checkpoint(path).step_source == "content:iteration"


@pytest.mark.parametrize("bad", [None, True, 1.5, "abc", [1]], ids=repr)
def test_non_integer_step_values_fall_through(tmp_path, tiny_state, bad):
    path = tmp_path / "ckpt_172.pth"
    torch.save({"model": tiny_state, "step": bad, "epoch": 4}, path)
    assert load_checkpoint(path).step == 4
    torch.save({"model": tiny_state, "step": bad}, path)
    ck = load_checkpoint(path)
    assert (ck.step, ck.step_source) == (172, "filename")


@pytest.mark.parametrize("name,step", [
    ("step_000172.pt", 172), ("epoch=3-step=1200.ckpt", 1200), ("ckpt_172.pth", 172),
    ("run-step1500.safetensors", 1500), ("model_iter_80.bin", 80), ("iteration-33.pt", 33),
    ("checkpoint-500", 500), ("epoch=7.ckpt", 7), ("last.ckpt", None), ("model.safetensors", None),
])
def test_step_from_name(name, step):
    assert step_from_name(name) == step
    assert step_from_name(f"/some/dir_9/{name}") == step


@pytest.mark.parametrize("name,step", [("step_000172.pt", 172), ("epoch=3-step=1200.ckpt", 1200),
                                       ("ckpt_172.pth", 172)])
def test_step_from_file_name_when_content_has_none(tmp_path, tiny_state, name, step):
    ck = load_checkpoint(save_in_layout(tiny_state, tmp_path / name, "plain"))
    assert (ck.step, ck.step_source) == (step, "filename")


def test_content_step_beats_file_name(tmp_path, tiny_state):
    ck = load_checkpoint(save_in_layout(tiny_state, tmp_path / "step_000172.pt", "model-key", step=5))
    assert (ck.step, ck.step_source) == (5, "content:step")


# ------------------------------------------------------------------ hparams and extras
@pytest.mark.parametrize("key", ["hparams", "hyper_parameters", "hyperparameters", "args", "config", "cfg", "opt"])
def test_hparams_keys(tmp_path, tiny_state, key):
    path = tmp_path / "ck.pt"
    torch.save({"model": tiny_state, key: {"lr": np.float64(0.5), "depth": np.int64(3), "arr": np.arange(3),
                                           "ok": np.bool_(True), "name": "x"}}, path)
    hp = load_checkpoint(path).hparams
    assert hp == {"lr": 0.5, "depth": 3, "arr": [0, 1, 2], "ok": True, "name": "x"}
    assert isinstance(hp["lr"], float) and type(hp["depth"]) is int and type(hp["ok"]) is bool
    json.dumps(hp)


def test_namespace_hparams(tmp_path, tiny_state):
    ck = load_checkpoint(save_in_layout(tiny_state, tmp_path / "ck.pt", "namespace", step=1,
                                        hparams={"lr": 0.2, "rho": 0.05, "model": "cnn"}))
    assert ck.hparams == {"lr": 0.2, "rho": 0.05, "model": "cnn"}
    assert ck.placeholders == ["argparse.Namespace"]


def test_namespace_hparams_legacy(tmp_path, tiny_state):
    path = tmp_path / "ck.pt"
    torch.save({"net": tiny_state, "args": argparse.Namespace(lr=0.3, seed=np.int64(4)), "epoch": 9}, path,
               _use_new_zipfile_serialization=False)
    ck = load_checkpoint(path)
    assert ck.hparams == {"lr": 0.3, "seed": 4} and ck.step == 9 and ck.layout == "key:net"


def test_hparams_merge_and_nonfinite_floats(tmp_path, tiny_state):
    path = tmp_path / "ck.pt"
    torch.save({"model": tiny_state, "hparams": {"lr": 0.1, "clip": float("inf")}, "config": {"width": 8},
                "args": [1, 2]}, path)
    hp = load_checkpoint(path).hparams
    assert hp == {"lr": 0.1, "clip": "inf", "width": 8}
    json.dumps(hp, allow_nan=False)


def test_model_spec_from_content(tmp_path, tiny_state):
    path = tmp_path / "ck.pt"
    torch.save({"model": tiny_state, "model_spec": {"name": "mlp", "args": {"width": np.int64(4)}}}, path)
    assert load_checkpoint(path).model_spec == {"name": "mlp", "args": {"width": 4}}
    torch.save({"model": tiny_state, "model_spec": "mlp"}, path)
    assert load_checkpoint(path).model_spec is None


def test_nonfinite_counts(tmp_path, tiny_state):
    state = dict(tiny_state)
    state["fc1.weight"] = state["fc1.weight"].clone()
    state["fc1.weight"][0, 0] = float("nan")
    state["fc1.weight"][1, :2] = float("inf")
    state["fc2.bias"] = torch.tensor([float("-inf"), 1.0])
    state["half"] = torch.tensor([float("nan")] * 3, dtype=torch.float16)
    state["ints"] = torch.tensor([1, 2, 3])
    ck = load_checkpoint(save_in_layout(state, tmp_path / "ck.pt", "model-key", step=1))
    assert ck.nonfinite() == {"fc1.weight": 3, "fc2.bias": 1, "half": 3}
    assert ck.n_params == sum(v.numel() for v in state.values() if v.is_floating_point())


def test_sha256(tmp_path, tiny_state):
    path = save_in_layout(tiny_state, tmp_path / "ck.pt", "plain")
    assert load_checkpoint(path).sha256() == hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------ bad input
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_archive(tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), str(path))
    assert detect_format(path) == "torchscript"
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(path)
    msg = _one_line(ei.value)
    assert "TorchScript" in msg and "torch.jit.load" in msg and "state_dict" in msg


@pytest.mark.parametrize("layout", ["plain", "legacy", "safetensors", "lightning"])
@pytest.mark.parametrize("frac", [0.5, 0.1, 0.97])
def test_truncated_file(tmp_path, tiny_state, layout, frac):
    big = {**tiny_state, "big": torch.randn(64, 64, generator=torch.Generator().manual_seed(0))}
    full = save_in_layout(big, tmp_path / "full.pt", layout, step=3)
    data = full.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: int(len(data) * frac)])
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(cut)
    msg = _one_line(ei.value)
    assert str(cut) in msg


def test_zip_cut_in_half_says_truncated(tmp_path, tiny_state):
    big = {**tiny_state, "big": torch.randn(64, 64, generator=torch.Generator().manual_seed(0))}
    data = save_in_layout(big, tmp_path / "full.pt", "plain").read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(cut)


def test_zip_cut_early_says_truncated(tmp_path, tiny_state):
    big = {**tiny_state, "big": torch.randn(64, 64, generator=torch.Generator().manual_seed(0))}
    data = save_in_layout(big, tmp_path / "full.pt", "plain").read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 10])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(cut)


def _rand(n: int, seed: int) -> bytes:
    rng = random.Random(seed)
    return bytes(rng.randrange(256) for _ in range(n))


@pytest.mark.parametrize("content,what", [
    (b"", "empty file"),
    (b"hello world\nthis is a text file\n", "not a checkpoint"),
    (b"\x89HDF\r\n\x1a\n" + _rand(200, 1), "not a checkpoint"),
    (_rand(2000, 0), "not a checkpoint"),
    (b"\x80", "not a checkpoint"),
    (b"\x80\x02" + _rand(2000, 2), ""),            # looks like a legacy pickle
    (b"PK\x03\x04" + _rand(2000, 3), "truncated or corrupt"),  # looks like a zip
    (b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": 1" + _rand(40, 4), "safetensors"),  # looks like safetensors
], ids=["empty", "text", "hdf5", "random", "one-byte", "fake-legacy", "fake-zip", "fake-safetensors"])
def test_not_a_checkpoint(tmp_path, content, what):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(path)
    msg = _one_line(ei.value)
    assert what in msg and str(path) in msg


@pytest.mark.parametrize("obj,what", [
    ({"a": 1, "b": [1, 2]}, "top-level keys: a, b"),
    ({}, "no tensors"),
    ([1, 2, 3], "holds a list"),
    ({"model": {"w": 1}, "step": 3}, "top-level keys: model, step"),
    (torch.tensor(1.0), "holds a Tensor"),
])
@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_pickle_without_tensors(tmp_path, obj, what, fmt):
    path = tmp_path / "nothing.pt"
    torch.save(obj, path, _use_new_zipfile_serialization=fmt == "zip")
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(path)
    msg = _one_line(ei.value)
    assert what in msg and str(path) in msg


def test_safetensors_without_tensors(tmp_path):
    path = tmp_path / "empty.safetensors"
    save_file({}, str(path))
    with pytest.raises(CheckpointError, match="no tensors"):
        load_checkpoint(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="is a directory"):
        load_checkpoint(tmp_path)


def test_find_state_on_non_dicts(tiny_model):
    state, layout = find_state(tiny_model)
    assert layout == "module" and set(state) == set(tiny_model.state_dict())
    with pytest.raises(CheckpointError, match="holds a int"):
        find_state(5)


# ------------------------------------------------------------------ bounded metadata, geometry, non-finite scan
def test_plain_is_bounded_and_json_able():
    from sam_probe.loading import plaindata
    from sam_probe.loading.plaindata import MAX_DEPTH, MAX_NODES, plain

    deep: list = []
    for _ in range(200_000):  # repr() of this raises RecursionError
        deep = [deep]
    shared = [0]
    for _ in range(60):  # 2^60 values when expanded
        shared = [shared, shared]
    cyclic: dict = {"a": 1}
    cyclic["self"] = cyclic
    out = plain({"bytes": b"\x00\xff" * 100, "short": b"ab", "big": 2**5000, "surrogate": "x\udcff",
                 "long": "y" * 100_000, "nan": float("nan"), "arr": np.arange(6).reshape(2, 3),
                 "big_arr": np.zeros((100, 100)), "obj_arr": np.array([{}, 1], object), "t1": torch.tensor(2.5),
                 "t": torch.ones(3), "set": {1}, (1, 2): "tuple key", "cx": 1j,
                 "deep": deep, "cyclic": cyclic, "shared": shared})  # the budget is shared: bombs last
    text = json.dumps(out, allow_nan=False)
    assert len(text) < 60 * MAX_NODES
    assert f"deeper than {MAX_DEPTH} levels" in json.dumps(out["deep"])
    assert out["bytes"] == "<bytes 200>" and out["short"] == "<bytes 2: 6162>"
    assert out["big"] == "<int of 5001 bits>" and out["nan"] == "nan"
    assert out["surrogate"] == "x\\udcff" and len(out["long"]) < plaindata.MAX_STR + 40
    assert out["arr"] == [[0, 1, 2], [3, 4, 5]] and out["big_arr"] == "<array (100, 100) float64>"
    assert out["obj_arr"].startswith("<array (2,) object")
    assert out["t1"] == 2.5 and out["t"] == "<tensor (3,) float32>" and out["set"] == [1] and out["<tuple>"] == "tuple key"
    assert out["cx"] == "1j" and "more items>" in json.dumps(out["shared"])


@pytest.mark.parametrize("make,problem", [
    (lambda: torch.ones(3, 4), None),
    (lambda: torch.ones(3, 4).t(), None),
    (lambda: torch.ones(6, 6)[::2, 1:4], None),  # gaps are fine
    (lambda: torch.ones(1, 5).expand(1, 5), None),  # a zero stride on a dimension of size 1
    (lambda: torch.ones(1).expand(4), "zero stride"),
    (lambda: torch.arange(10.0).as_strided((3, 3), (2, 1)), "overlapping"),
    (lambda: torch.ones(2, 2).to_sparse(), "not a dense"),
    (lambda: torch.ones(2, device="meta"), "meta"),
])
def test_overlap_problem(make, problem):
    from sam_probe.loading.checkpoints import overlap_problem

    got = overlap_problem(make())
    assert (got is None) if problem is None else (problem in got)


def test_nonfinite_scan_in_chunks_matches_full_count(monkeypatch):
    from sam_probe.loading import state as state_module
    from sam_probe.loading.checkpoints import Checkpoint

    g = torch.Generator().manual_seed(0)
    base = torch.randn(300, 70, generator=g)
    base[torch.rand(300, 70, generator=g) < 0.05] = float("nan")
    base[torch.rand(300, 70, generator=g) < 0.02] = float("-inf")
    state = {"c": base, "t": base.t(), "s": base[::3, 5:50], "z": torch.empty(0, 3), "x": base[7, 3]}
    expected = {k: int((~torch.isfinite(v)).sum()) for k, v in state.items()}
    monkeypatch.setattr(state_module, "_SCAN_CHUNK", 97)  # many chunks, ragged last one
    got = Checkpoint("x", "torch-zip", "state_dict", state).nonfinite()
    assert got == {k: n for k, n in expected.items() if n}


def test_fifo_and_device_are_refused_without_blocking(tmp_path):
    from sam_probe.loading.checkpoints import file_sha256

    fifo = tmp_path / "ck.pt"
    os.mkfifo(fifo)
    for call in (load_checkpoint, file_sha256, detect_format):
        with pytest.raises(CheckpointError, match="is a FIFO"):
            call(fifo)
    with pytest.raises(CheckpointError, match="is a character device"):
        load_checkpoint("/dev/zero")


def test_non_utf8_file_name(tmp_path, tiny_state):
    name = os.fsdecode(os.fsencode(str(tmp_path)) + b"/step_\xff7.pt")
    with open(name, "wb") as fh:
        torch.save({"model": tiny_state, "step": 7}, fh)
    ck = load_checkpoint(name)
    assert ck.step == 7 and set(ck.state) == set(tiny_state) and ck.path == name
    torch.save({"model": tiny_state, "step": torch.zeros(1).expand(5)}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(os.fsdecode(os.fsencode(str(tmp_path)) + b"/x.pt"))
    _one_line(ei.value)


def test_safetensors_with_unaligned_data_and_header_order(tmp_path):
    import struct

    a = np.arange(3, dtype=np.float64)
    b = np.arange(2, dtype=np.float32)
    header = json.dumps({"z": {"dtype": "F64", "shape": [3], "data_offsets": [0, 24]},
                         "a": {"dtype": "F32", "shape": [2], "data_offsets": [24, 32]}}).encode() + b" "
    assert (8 + len(header)) % 8  # the data section starts unaligned
    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + a.tobytes() + b.tobytes())
    ck = load_checkpoint(path)
    assert list(ck.state) == ["z", "a"]
    assert ck.state["z"].tolist() == a.tolist() and ck.state["a"].tolist() == b.tolist()
