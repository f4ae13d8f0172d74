"""Seeded fuzzing of the results reader and of Hugging Face folders, in a memory-capped child process.

The corpus is generated here from a fixed seed: real result units written by the store, then byte
mutations and structural ones (attributes of every dtype and shape, links, external storage, vlen data,
datasets where groups belong, deep nesting, huge declared sizes, names with escapes); real
``save_pretrained`` folders of a tiny GPT-2 and BERT, then mutated ``config.json`` values (huge and
negative counts, wrong types, deep nesting, selectors), shard indexes and weight bytes.  One child
process (``RLIMIT_AS``: its size after imports plus 1.5 GiB) reads every results folder with
``iter_units`` and loads every HF folder and builds its model within the weights' budget, logging each
case before and after.  Asserted: the child exits normally, every unit is read or skipped with a
one-line reason, every folder loads and builds or ends in one line (``CheckpointError``/``SpecError``),
and no payload ran.  The corpus is sized to take well under a minute.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

SEED = 2323
N_RESULTS = 160
N_FOLDERS = 40
ROOT = Path(__file__).resolve().parents[2]

CHILD = r"""
import json, os, resource, sys
import torch
torch.set_num_threads(1)
from sam_probe import store
from sam_probe.errors import CheckpointError, SpecError
from sam_probe.loading import hf
from sam_probe.loading.bounded_build import Budget
from sam_probe.loading.checkpoints import load_checkpoint
import transformers  # imported before the cap, as a user's process would have it
results, folders, log = sys.argv[1], sys.argv[2], sys.argv[3]
vm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmSize")) * 1024
cap = vm + 3 * 2**29
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
with open(log, "w") as out:
    def note(**kw):
        out.write(json.dumps(kw) + "\n")
        out.flush()
    for name in sorted(os.listdir(results)):
        note(start=name)
        skipped, read = [], []
        try:
            for unit, res, meta in store.iter_units(os.path.join(results, name),
                                                    on_skip=lambda n, why: skipped.append(why)):
                json.dumps([unit, list(res), sorted(meta)], default=str)
                read.append(unit)
            bad = [w for w in skipped if not w or "\n" in w]
            status = "ok" if not bad else "multi-line: " + repr(bad[0])[:200]
        except OSError as exc:  # a merged file that is not HDF5 at all: report says so in one line
            status = "refused" if name.endswith(".h5") else f"escaped OSError: {str(exc)[:300]}"
        except BaseException as exc:
            status = f"escaped {type(exc).__name__}: {str(exc)[:300]}"
        note(done=name, status=status, read=len(read), skipped=len(skipped))
    for name in sorted(os.listdir(folders)):
        note(start=name)
        try:
            ck = load_checkpoint(os.path.join(folders, name))
            hf.build_model(ck.path, budget=Budget.of(ck.state))
            status = "ok"
        except (CheckpointError, SpecError) as exc:
            status = "refused" if str(exc) and "\n" not in str(exc) else "multi-line: " + repr(str(exc))[:300]
        except BaseException as exc:
            status = f"escaped {type(exc).__name__}: {str(exc)[:300]}"
        note(done=name, status=status)
"""


# ---------------------------------------------------------------- results files
def _good_unit(path: Path, rng: random.Random) -> None:
    from sam_probe import store

    result = {"path": "ck.pt", "step": rng.randrange(100), "eigenvalues": [rng.random() for _ in range(3)],
              "per_layer": [{"name": f"l{i}", "v": rng.random()} for i in range(3)],
              "codes": np.arange(rng.randrange(1, 5000), dtype=np.uint8), "names": ["a", "b\x1b]0;x\x07"]}
    store.write_unit(path, result, {"analysis": "sharpness", "config": {"k": 1, "nested": {"a": [1, 2]}},
                                    "step": result["step"]})


def _structural(rng: random.Random, f: h5py.File, secret: Path) -> None:
    g = f["result"]
    kind = rng.randrange(14)
    name = rng.choice(["v", "%2Fx", "\x1b]8;;x", "000001", "__kind__"])
    if name in g:
        del g[name]
    if kind == 0:
        g.attrs.create(name, np.zeros(rng.choice([1, 10, 5000])))
    elif kind == 1:
        g.attrs[name] = "x" * rng.choice([1, 70000])
    elif kind == 2:
        g.attrs.create(name, np.zeros(3, dtype=[("a", "i4"), ("b", "f8")]))
    elif kind == 3:
        g[name] = h5py.SoftLink(rng.choice(["/result", "/nowhere", "/result/per_layer"]))
    elif kind == 4:
        g[name] = h5py.ExternalLink(str(secret), "/x")
    elif kind == 5:
        g.create_dataset(name, shape=(64,), dtype="u1", external=[(str(secret), 0, 64)])
    elif kind == 6:
        g.create_dataset(name, shape=(rng.choice([2**20, 2**30]),), dtype="f8", chunks=(2**16,),
                         compression="gzip", fillvalue=0.0)
    elif kind == 7:
        g.create_dataset(name, data=np.array(["y" * rng.randrange(1, 5000)] * rng.randrange(1, 50), dtype=object),
                         dtype=h5py.string_dtype())
    elif kind == 8:
        g.attrs["__kind__"] = rng.choice(["list", "dict", "weird"])
    elif kind == 9:
        sub = g
        for _ in range(rng.choice([5, 40])):
            sub = sub.create_group("d")
    elif kind == 10:
        f.attrs[rng.choice(["config", "model_spec", "command"])] = rng.choice(
            ["[" * 5000 + "]" * 5000, '{"a": ' * 100 + "1" + "}" * 100, "not json", "\x1b]0;t\x07"])
    elif kind == 11:
        del f["result"]
        f.create_dataset("result", data=np.zeros(rng.randrange(1, 9)))
    elif kind == 12:
        g.create_dataset(name, data=np.array([g.ref] * 2, dtype=h5py.ref_dtype))
    else:
        g.create_dataset(name, data=np.zeros((rng.randrange(1, 4),) * rng.randrange(1, 5)))


def _mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.choice((1, 2, 8, 32))):
        if len(b) < 2:
            break
        i = rng.randrange(1, len(b))
        kind = rng.randrange(4)
        if kind == 0:
            b[i] ^= 1 << rng.randrange(8)
        elif kind == 1:
            b[i:i + 8] = rng.choice([b"\xff" * 8, b"\x00" * 8, (2**40).to_bytes(8, "little")])
        elif kind == 2:
            del b[i:]
        else:
            b[i] = rng.randrange(256)
    return bytes(b)


def _results_corpus(root: Path, rng: random.Random, secret: Path) -> None:
    for i in range(N_RESULTS):
        d = root / f"r{i:04d}"
        d.mkdir()
        _good_unit(d / "good.h5", rng)
        target = d / "case.h5"
        _good_unit(target, rng)
        if rng.random() < 0.5:
            with h5py.File(target, "a") as f:
                for _ in range(rng.randrange(1, 3)):
                    _structural(rng, f, secret)
        else:
            target.write_bytes(_mutate_bytes(rng, target.read_bytes()))
        if rng.random() < 0.15:  # a merged file of both
            from sam_probe import store

            store.merge(d, root / f"r{i:04d}m.h5")
            if rng.random() < 0.5:
                p = root / f"r{i:04d}m.h5"
                p.write_bytes(_mutate_bytes(rng, p.read_bytes()))


# ---------------------------------------------------------------- Hugging Face folders
CONFIG_VALUES = [10**9, 10**6, 2**70, -5, 0, 1.5, "x", None, [1] * 3, {"a": 1}, True, "kernels-community/flash-attn"]


def _folders_corpus(root: Path, rng: random.Random) -> None:
    import hftiny

    bases = {"gpt2": hftiny.gpt2(), "bert": hftiny.bert()}
    for i in range(N_FOLDERS):
        kind = rng.choice(list(bases))
        d = root / f"h{i:03d}"
        bases[kind].save_pretrained(d, max_shard_size=rng.choice(["1KB", "10MB"]))
        cfg = json.loads((d / "config.json").read_text())
        what = rng.randrange(5)
        if what <= 1:
            for _ in range(rng.randrange(1, 4)):
                key = rng.choice([*cfg, "num_labels", "attn_implementation", "id2label", "quantization_config"])
                cfg[key] = rng.choice(CONFIG_VALUES)
            (d / "config.json").write_text(json.dumps(cfg))
        elif what == 2:
            (d / "config.json").write_text("[" * rng.choice([10, 100000]) + "]" * 10)
        elif what == 3:
            idx = d / "model.safetensors.index.json"
            if idx.exists():
                wm = json.loads(idx.read_text())
                key = rng.choice(list(wm["weight_map"]))
                wm["weight_map"][key] = rng.choice(["../../etc/passwd", "missing.safetensors", "", "/abs"])
                idx.write_text(json.dumps(wm))
        else:
            w = rng.choice(sorted(d.glob("*.safetensors")))
            w.write_bytes(_mutate_bytes(rng, w.read_bytes()))


def test_fuzz_results_files_and_hf_folders(tmp_path):
    pytest.importorskip("transformers")
    sys.path.insert(0, str(ROOT / "tests"))
    rng = random.Random(SEED)
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\x01" * 64)
    results, folders = tmp_path / "results", tmp_path / "folders"
    results.mkdir()
    folders.mkdir()
    torch.manual_seed(SEED)
    _results_corpus(results, rng, secret)
    _folders_corpus(folders, rng)
    log = tmp_path / "log.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", CHILD, str(results), str(folders), str(log)], capture_output=True,
                         text=True, timeout=600, env=env, cwd=ROOT)
    events = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    last = next((e["start"] for e in reversed(events) if "start" in e), None)
    assert res.returncode == 0, f"child died (rc {res.returncode}) on {last}: {res.stderr[-2000:]}"
    done = {e["done"]: e for e in events if "done" in e}
    assert len(done) == len(os.listdir(results)) + N_FOLDERS
    bad = {n: e["status"] for n, e in done.items() if e["status"] not in ("ok", "refused")}
    assert not bad, bad
    units = [e for n, e in done.items() if n.startswith("r") and not n.endswith(".h5")]
    assert all(e["read"] + e["skipped"] >= 1 for e in units)
    assert sum(e["read"] >= 1 for e in units) == len(units)  # the good unit beside every case is always read
    assert sum(e["skipped"] for e in units) > N_RESULTS // 4  # the corpus reaches refusals
    hf_status = [e["status"] for n, e in done.items() if n.startswith("h")]
    assert hf_status.count("ok") >= 3 and hf_status.count("refused") >= 10, hf_status
