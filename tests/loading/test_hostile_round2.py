"""Hostile input, round 2 (loading side): sizes a file chooses, steps, code selectors, misleading advice, counts.

Every case is generated here (no binaries shipped).  Cases where memory is the point run in a child
process whose address space is capped (:mod:`capped`); no case asserts on wall time: work is bounded
by counts (modules built, labels, tensors), which the errors name.
"""
from __future__ import annotations

import json
import os
import struct
import zipfile

import pytest
import torch

from capped import run_capped
from sam_probe.errors import CheckpointError, SpecError
from sam_probe.loading.checkpoints import load_checkpoint

transformers = pytest.importorskip("transformers")
import hftiny  # noqa: E402


@pytest.fixture
def gpt2_folder(tmp_path):
    d = tmp_path / "g"
    hftiny.gpt2().save_pretrained(d)
    return d


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


BUILD = r"""
from sam_probe.errors import CheckpointError, SpecError
from sam_probe.loading import hf
from sam_probe.loading.bounded_build import Budget
from sam_probe.loading.checkpoints import load_checkpoint
out = []
for folder in ARGS["folders"]:
    ck = load_checkpoint(folder)
    try:
        hf.build_model(folder, budget=Budget.of(ck.state))
        out.append({"status": "built"})
    except (CheckpointError, SpecError) as exc:
        out.append({"status": "refused", "error": str(exc)})
print(json.dumps({"builds": out}))
"""

HOSTILE_CONFIGS = [
    ({"n_layer": 10000}, r"describes more than [\d,]+ modules for weights of \d+ tensors"),
    ({"n_layer": 10**9}, r"n_layer = 1,000,000,000 cannot match weights"),
    ({"num_labels": 1_000_000}, r"num_labels = 1,000,000 is outside"),
    ({"id2label": {str(i): f"L{i}" for i in range(40_000)}}, r"id2label has 40,000 entries"),
    ({"n_embd": 4096, "n_inner": 16384}, r"describes more than [\d,]+ parameters"),
    ({"n_positions": 2**31}, r"config and weights do not belong together"),
]


@pytest.fixture(scope="module")
def hostile_builds(tmp_path_factory) -> list[dict]:
    """Every :data:`HOSTILE_CONFIGS` folder built in one capped child (one torch and transformers import)."""
    root = tmp_path_factory.mktemp("hostile-configs")
    folders = []
    for i, (changes, _) in enumerate(HOSTILE_CONFIGS):
        d = root / f"g{i}"
        hftiny.gpt2().save_pretrained(d)
        _edit_config(d, **changes)
        folders.append(str(d))
    return run_capped(BUILD, folders=folders)["builds"]


@pytest.mark.parametrize("case", range(len(HOSTILE_CONFIGS)), ids=["-".join(c) for c, _ in HOSTILE_CONFIGS])
def test_configs_cannot_choose_sizes_the_weights_do_not_hold(hostile_builds, case):
    got, expected = hostile_builds[case], HOSTILE_CONFIGS[case][1]
    assert got["status"] == "refused" and "\n" not in got["error"]
    assert pytest.importorskip("re").search(expected, got["error"]), got["error"]


def test_zoo_models_a_checkpoint_describes_are_built_on_meta_first():
    got = run_capped(r"""
from sam_probe.errors import CheckpointError
from sam_probe.loading.bounded_build import Budget
from sam_probe.loading.models import build_model
state = {"net.0.weight": torch.zeros(6, 64), "net.0.bias": torch.zeros(6), "net.2.weight": torch.zeros(10, 6),
         "net.2.bias": torch.zeros(10)}
out = {}
for name, args in (("mlp", {"in_dim": 64, "hidden": [25000, 25000], "out_dim": 10}), ("resnet18", {"width": 2048}),
                   ("wrn", {"widen": 300}), ("wrn", {"depth": 6 * 200000 + 4}), ("mlp", {"hidden": [6]})):
    try:
        build_model(name, args, strict=True, budget=Budget.of(state))
        out[f"{name}{args}"] = "built"
    except CheckpointError as exc:
        out[f"{name}{args}"] = str(exc)
print(json.dumps(out))
""")
    built = [k for k, v in got.items() if v == "built"]
    assert built == ["mlp{'hidden': [6]}"], got
    assert all("do not belong together" in v for k, v in got.items() if v != "built")


def test_builtin_data_sizes_are_bounded():
    from sam_probe.loading.data import MAX_SYNTHETIC_VALUES, load_data

    with pytest.raises(SpecError, match="312,500,000 values"):  # issue 23: n=250000 d=1000 (3-10 GB before)
        load_data("synthetic-minor-major", options={"n": 250000, "d": 1000})
    with pytest.raises(SpecError, match="whole numbers"):
        load_data("synthetic-minor-major", options={"n": "9" * 5000})
    assert len(load_data("synthetic-minor-major", options={"n": 2**14, "d": 2**10 - 300})) == 2**14
    assert MAX_SYNTHETIC_VALUES == 2**24


def test_steps_that_do_not_fit_int64_are_not_steps(tmp_path, tiny_state):
    torch.save({"model": tiny_state, "step": 2**64}, tmp_path / "step_12.pt")
    torch.save({"model": tiny_state, "global_step": -3}, tmp_path / "b.pt")
    assert (load_checkpoint(tmp_path / "step_12.pt").step, load_checkpoint(tmp_path / "b.pt").step) == (12, None)
    long = tmp_path / ("step_" + "9" * 30 + ".pt")
    torch.save(tiny_state, long)
    assert load_checkpoint(long).step_source == "position"
    run = tmp_path / "run"
    hftiny.write_trainer_run(run, steps=(2,))
    (run / "checkpoint-2" / "trainer_state.json").write_text(json.dumps({"global_step": 2**70}))
    assert (load_checkpoint(run / "checkpoint-2").step, load_checkpoint(run / "checkpoint-2").step_source) == \
        (2, "filename")


def test_files_cannot_choose_implementations_and_the_hub_stays_offline(gpt2_folder, tmp_path, monkeypatch):
    from sam_probe.loading import hf

    _edit_config(gpt2_folder, attn_implementation="kernels-community/flash-attn",
                 _attn_implementation_internal="kernels-community/x", experts_implementation="grouped_mm",
                 quantization_config={"quant_method": "mxfp4"})
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    model = hf.build_model(gpt2_folder, expected_numel=load_checkpoint(gpt2_folder).n_params)
    assert model.config._attn_implementation in (None, "eager", "sdpa")
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    import huggingface_hub.constants as c

    assert c.HF_HUB_OFFLINE is True
    mine = hf.build_model(gpt2_folder, args={"attn_implementation": "eager"})  # the user's choice is theirs
    assert mine.config._attn_implementation == "eager"
    torch.save({"model": {"w": torch.zeros(2)}, "model_spec": {"name": "hf", "args": {
        "attn_implementation": "kernels-community/flash-attn", "n_layer": 1, "sub": {"_attn_implementation": "z"}}}},
        tmp_path / "ck.pt")
    assert load_checkpoint(tmp_path / "ck.pt").model_spec["args"] == {"n_layer": 1, "sub": {}}


def test_side_files_that_are_not_regular_files_are_named(gpt2_folder, tmp_path):
    with pytest.raises(CheckpointError, match="special file whose size the system does not report"):
        load_checkpoint("/proc/self/environ")
    (gpt2_folder / "config.json").unlink()
    os.mkfifo(gpt2_folder / "config.json")
    with pytest.raises(CheckpointError, match=r"config\.json is a FIFO") as ei:
        load_checkpoint(gpt2_folder)
    assert "\n" not in str(ei.value)


def test_a_shard_linked_from_outside_the_folder_is_refused(tmp_path):
    d = tmp_path / "h"
    hftiny.bert().save_pretrained(d, max_shard_size="1KB")
    shard = sorted(d.glob("model-*.safetensors"))[0]
    outside = tmp_path / "elsewhere.safetensors"
    os.replace(shard, outside)
    os.symlink(outside, shard)
    with pytest.raises(CheckpointError, match="not a regular file inside the folder"):
        load_checkpoint(d)


# ---------------------------------------------------------------- advice that would run a payload
def _zip_pickle(path, pkl: bytes):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/version", "3\n")
    return path


def _call(module: str, name: str, arg: str, newobj_ex: bool = False) -> bytes:
    s = arg.encode()
    text = b"X" + struct.pack("<I", len(s)) + s
    head = b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\n"
    if newobj_ex:  # cls, args, kwargs, NEWOBJ_EX (protocol 4)
        return b"\x80\x04c" + module.encode() + b"\n" + name.encode() + b"\n" + text + b"\x85}\x92."
    return head + text + b"\x85R."


ALIASES = [f"{m}.os.{f}" for m in ("posixpath", "uuid", "shutil", "tempfile", "glob", "pathlib", "subprocess",
                                   "torch.serialization", "torch.hub", "numpy.lib.utils", "logging", "platform",
                                   "zipfile", "tarfile", "ctypes.util")
           for f in ("system", "popen", "execv")]


@pytest.mark.parametrize("alias", ALIASES[:: 5] + ["importlib.import_module", "builtins.exec"])
@pytest.mark.parametrize("newobj_ex", [False, True])
def test_aliases_of_denied_callables_are_refused_without_trust_advice(tmp_path, alias, newobj_ex):
    marker = tmp_path / "ran"
    module, name = alias.rsplit(".", 1)
    path = _zip_pickle(tmp_path / "a.pt", _call(module, name, f"touch {marker}", newobj_ex))
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(path)
    msg = str(ei.value)
    assert "--trust-checkpoint" not in msg and "\n" not in msg and not marker.exists()
    assert "refused" in msg or "never runs" in msg, msg


def test_every_alias_is_classified_dangerous():
    from sam_probe.loading.placeholders import is_dangerous

    assert all(is_dangerous(a) for a in ALIASES)
    assert not any(is_dangerous(n) for n in ("collections.OrderedDict", "argparse.Namespace", "mymod.os_utils.Cfg"))


def test_trust_advice_only_for_files_naming_classes(tmp_path):
    fn = _zip_pickle(tmp_path / "f.pt", _call("mypkg.train", "make_model", "x", newobj_ex=True))
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(fn)
    assert "--trust-checkpoint" not in str(ei.value) and "calls mypkg.train.make_model" in str(ei.value)
    cls = _zip_pickle(tmp_path / "c.pt", _call("mypkg.train", "Model", "x", newobj_ex=True))
    with pytest.raises(CheckpointError, match="--trust-checkpoint"):
        load_checkpoint(cls)


# ---------------------------------------------------------------- counts
def test_safetensors_tensor_count_is_bounded(tmp_path, monkeypatch):
    from sam_probe.loading import safetensors_file

    monkeypatch.setattr(safetensors_file, "MAX_TENSORS", 1000)  # (the real cap, 2**17, checked the same way)
    MAX_TENSORS = safetensors_file.MAX_TENSORS
    n = 3_000
    header = json.dumps({f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(n)}).encode()
    p = tmp_path / "many.safetensors"
    p.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(CheckpointError, match=f"lists {n:,} tensors, more than the {MAX_TENSORS:,}"):
        load_checkpoint(p)


def test_data_files_with_many_fields_are_refused(tmp_path):
    from sam_probe.loading.data import load_data

    fields = {f"f{i}": torch.zeros(2) for i in range(2_000)}
    fields["input_ids"] = torch.zeros(2, 3, dtype=torch.long)
    torch.save(fields, tmp_path / "d.pt")
    with pytest.raises(SpecError, match="2,001 fields"):
        load_data(str(tmp_path / "d.pt"))
    torch.save({f"k{i}": i for i in range(20_000)}, tmp_path / "k.pt")
    with pytest.raises(SpecError, match=r"20,000 in all") as ei:
        load_data(str(tmp_path / "k.pt"))
    assert len(str(ei.value)) < 1000


def test_prefix_inference_and_mismatch_tables_are_linear(tiny_model):
    from sam_probe.loading.matching import KeyMismatchError, MAX_ROWS, match_state

    state = {f"junk.{i}.w": torch.zeros(1) for i in range(200_000)}
    with pytest.raises(KeyMismatchError) as ei:
        match_state(tiny_model, state)
    rows = ei.value.rows
    assert len(rows) <= 3 * (MAX_ROWS + 1) and rows[-1][1].startswith("... ")


def test_token_ids_outside_the_vocabulary_and_fields_a_forward_ignores_are_named():
    from sam_probe.loading.data import check_token_ids, from_tensors, unused_fields

    model = hftiny.gpt2()
    batch = hftiny.token_batch(labels="lm")
    check_token_ids(from_tensors(batch, None, "ok.pt"), model)
    bad = dict(batch, input_ids=batch["input_ids"].clone())
    bad["input_ids"][0, 0] = hftiny.VOCAB + 5
    with pytest.raises(SpecError, match=f"token id {hftiny.VOCAB + 5} is outside the model's vocabulary of "
                                        f"{hftiny.VOCAB} ids"):
        check_token_ids(from_tensors(bad, None, "bad.pt"), model)
    extra = from_tensors(dict(batch, pixel_typo=torch.zeros(10, 6)), None, "x.pt")
    assert unused_fields(extra, model) == ["pixel_typo"]
