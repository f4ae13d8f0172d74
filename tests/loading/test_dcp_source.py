"""The torch.distributed.checkpoint source: folders written by the real writer (one process and 4 ranks), read
inertly, assembled exactly; rows of one FSDP rank; hostile metadata and shards refused before anything runs."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from clitools import run_cli
from sam_probe.errors import CheckpointError
from sam_probe.loading import sources
from sam_probe.loading.checkpoints import file_sha256, load_checkpoint
from sam_probe.loading.sources import dcp as D

ROOT = Path(__file__).resolve().parents[2]
MLP_ARGS = {"in_dim": 64, "hidden": [6], "out_dim": 10}


def save(state: dict, folder: Path) -> Path:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=folder, no_dist=True)
    return folder


def model_and_optimizer(seed: int = 0):
    from sam_probe.loading.models import build_model

    torch.manual_seed(seed)
    m = build_model("mlp", dict(MLP_ARGS))
    opt = torch.optim.Adam(m.parameters())
    m(torch.randn(4, 64)).sum().backward()
    opt.step()
    return m, opt


def titan_like(folder: Path, step: int, seed: int = 0) -> tuple[Path, dict]:
    """A torchtitan-style nested checkpoint: model, optimizer, train_state with its step (an int, or a tensor as
    torchtitan's TrainState saves it) and raw bytes (a BytesIO, stored unpickled: never read)."""
    import io

    m, opt = model_and_optimizer(seed)
    sd = {k: v.detach().clone() for k, v in m.state_dict().items()}
    train = {"step": step if seed == 0 else torch.tensor(step, dtype=torch.int32),
             "global_avg_losses": io.BytesIO(b"\x80\x04cos\nsystem\n.")}
    save({"model": sd, "optimizer": opt.state_dict(), "train_state": train}, folder)
    return folder, sd


WRITER = r'''
import os, sys, warnings
import torch, torch.distributed as dist, torch.multiprocessing as mp
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import distribute_tensor, Replicate, Shard

def work(rank, world, out, port, src):  # forked: the imports above are shared
    warnings.simplefilter("ignore")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (2, 2))
    full = torch.load(src)
    place = {"a": [Shard(0), Shard(1)], "b": [Shard(0), Replicate()], "c": [Replicate(), Replicate()],
             "d": [Shard(0), Shard(0)]}
    sd = {"model": {k: distribute_tensor(v, mesh, place[k]) for k, v in full.items()},
          "optim": {"state": {"a": {"exp_avg": distribute_tensor(full["a"] * 2, mesh, place["a"])}}}, "step": 9}
    dcp.save(sd, checkpoint_id=out)
    # FSDP2 as trainers use it: fully_shard, then get_state_dict's (model, optimizer) pair saved nested
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
    if rank == 0:
        torch.save(m.state_dict(), src + ".fsdp.pt")
    flat = init_device_mesh("cpu", (world,))
    for part in (m[0], m[2], m):
        fully_shard(part, mesh=flat)
    opt = torch.optim.AdamW(m.parameters(), lr=0.0)  # a step that leaves the weights as they were
    m(torch.randn(2, 5)).sum().backward()
    opt.step()
    msd, osd = get_state_dict(m, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=os.path.join(os.path.dirname(out), "fsdp", "step-7"))
    dist.destroy_process_group()

if __name__ == "__main__":
    mp.start_processes(work, args=(4, sys.argv[1], int(sys.argv[2]), sys.argv[3]), nprocs=4, start_method="fork")
'''


@pytest.fixture(scope="module")
def ranks4(tmp_path_factory) -> tuple[Path, dict]:
    """A checkpoint written by 4 ranks (a 2 x 2 mesh): chunks of rows, of columns, replicated, uneven; and beside
    it ``fsdp/step-7``, an FSDP2 model and AdamW state written by the same 4 ranks."""
    root = tmp_path_factory.mktemp("dcp4")
    g = torch.Generator().manual_seed(1)
    full = {"a": torch.randn(5, 3, generator=g), "b": torch.randn(7, generator=g), "c": torch.randn(2, 2, generator=g),
            "d": torch.randn(9, 2, generator=g).double()}
    torch.save(full, root / "full.pt")
    out = root / "step-300"
    port = 20000 + os.getpid() % 20000
    subprocess.run([sys.executable, "-c", WRITER, str(out), str(port), str(root / "full.pt")], check=True, cwd=ROOT, timeout=120,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    return out, full


def test_a_flat_state_dict_loads_bit_for_bit_with_a_stable_digest(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {"w": torch.randn(4, 3, generator=g), "b": torch.arange(5.0).half(), "n.x": torch.ones(2, dtype=torch.int64),
          "bf": torch.randn(3, generator=g).bfloat16()}
    folder = save({**sd, "step": 7}, tmp_path / "ckpt")
    assert sources.of(folder).name == "dcp" and sources.discover(folder) == [folder]
    import builtins

    real_import, imported = builtins.__import__, []

    def spy(name, *args, **kw):
        imported.append(name)
        return real_import(name, *args, **kw)

    builtins.__import__ = spy
    try:
        ck = load_checkpoint(folder)
    finally:
        builtins.__import__ = real_import
    assert not [n for n in imported if n.startswith(("torch.distributed", "pathlib"))]  # DCP's classes stay inert
    assert (ck.source, ck.layout, ck.format, ck.step, ck.step_source) == ("dcp", "dcp", "dcp", 7, "content:step")
    assert set(ck.state) == set(sd)
    for k, v in sd.items():
        assert ck.state[k].dtype == v.dtype and torch.equal(ck.state[k], v), k
    assert ck.digest == file_sha256(folder) == D.digest(folder) == load_checkpoint(folder).digest
    assert [f.name for f in sources.checkpoint_files(folder)] == [".metadata", "__0_0.distcp"]
    assert ck.nonfinite() == {} and ck.placeholders == []
    with open(folder / "__0_0.distcp", "r+b") as fh:  # one bit of a weight flipped: a CRC error, not a misread
        data = bytearray(fh.read())
        at = data.rindex(sd["w"].numpy().tobytes())
        data[at] ^= 1
        fh.seek(0)
        fh.write(data)
    from sam_probe.loading import verify

    verify.forget()
    with pytest.raises(CheckpointError, match="fails its CRC"):
        load_checkpoint(folder)


def test_a_run_of_torchtitan_folders_is_discovered_and_analysed_end_to_end(tmp_path):
    run = tmp_path / "checkpoint"
    _, sd100 = titan_like(run / "step-100", 100, seed=0)
    _, sd200 = titan_like(run / "step-200", 200, seed=1)
    assert sources.discover(run) == [run / "step-100", run / "step-200"]
    ck = load_checkpoint(run / "step-200")
    assert (ck.layout, ck.step, ck.step_source) == ("dcp:model", 200, "content:train_state.step")  # a tensor
    assert load_checkpoint(run / "step-100").step_source == "content:train_state.step"  # an int
    assert ck.extra_keys == ["optimizer", "train_state"] and ck.hparams == {"lr": 1e-3}  # Adam's default
    assert set(ck.state) == set(sd200) and all(torch.equal(ck.state[k], v) for k, v in sd200.items())
    torch.save(sd100, tmp_path / "same.pt")
    args = ["--model", "mlp", "--model-arg", "in_dim=64", "--model-arg", "hidden=6", "--model-arg", "out_dim=10",
            "--data", "digits", "--max-samples", "40", "-k", "1", "--json", "--no-store", "--no-plot", "-q"]
    res = run_cli("sharpness", run, tmp_path / "same.pt", *args)  # the same weights as a .pt file beside them
    assert res.code == 0, res.stderr
    results = res.json()["results"]
    dcp100, dcp200, pt = sorted(results, key=lambda r: r["path"].endswith(".pt"))
    assert (dcp100["step"], dcp200["step"]) == (100, 200) and dcp100["source"]["layout"] == "dcp:model"
    assert dcp100["eigenvalues"] == pytest.approx(pt["eigenvalues"], rel=1e-6)
    assert (dcp100["eta"], pt["eta"]) == (1e-3, None)  # the saved optimizer's learning rate
    assert dcp200["eigenvalues"] != pytest.approx(pt["eigenvalues"], rel=1e-3)
    shown = run_cli("inspect", run / "step-100", "--json")
    assert shown.code == 0 and "dcp" in shown.stdout and "100" in shown.stdout, shown.stderr


def test_the_step_comes_from_the_folder_name_when_none_was_saved(tmp_path):
    folder = save({"model": {"w": torch.ones(2)}, "optim": {"state": {"w": {"m": torch.zeros(2)}}}},
                  tmp_path / "global_step40")
    ck = load_checkpoint(folder)
    assert (ck.step, ck.step_source, list(ck.state), ck.layout) == (40, "filename", ["w"], "dcp:model")
    assert list(load_checkpoint(folder, key="optim").state) == ["state.w.m"]
    with pytest.raises(CheckpointError, match="--key nope: no tensors"):
        load_checkpoint(folder, key="nope")
    # torchtitan's flattened layout: the model's own names at the top, optimizer and trainer state nested
    m, opt = model_and_optimizer()
    sd = {k: v.detach().clone() for k, v in m.state_dict().items()}
    flat = save({**sd, "optimizer": opt.state_dict(), "lr_scheduler": {"last_epoch": torch.tensor(3)},
                 "train_state": {"step": torch.tensor(12)}}, tmp_path / "flat")
    ck = load_checkpoint(flat)
    assert (ck.layout, ck.step, ck.hparams) == ("dcp", 12, {"lr": 1e-3}) and set(ck.state) == set(sd)
    assert all(torch.equal(ck.state[k], v) for k, v in sd.items())
    only_optimizer = save({"optimizer": opt.state_dict()}, tmp_path / "optimizer_0")  # Accelerate's optimizer folder
    with pytest.raises(CheckpointError, match="no tensors found besides optimizer"):
        load_checkpoint(only_optimizer)


def test_four_ranks_are_assembled_exactly_and_one_rank_reads_only_its_rows(ranks4, monkeypatch):
    folder, full = ranks4
    ck = load_checkpoint(folder)
    assert (ck.layout, ck.step) == ("dcp:model", 9) and set(ck.state) == set(full)
    for k, v in full.items():
        assert ck.state[k].dtype == v.dtype and torch.equal(ck.state[k], v), k
    assert len({c.file for c in D.read_layout(folder).tensors["model.a"].chunks}) == 4  # really 4 shards
    fsdp = folder.parent / "fsdp"
    assert sources.discover(fsdp) == [fsdp / "step-7"]
    ck, want = load_checkpoint(fsdp / "step-7"), torch.load(folder.parent / "full.pt.fsdp.pt")
    assert (ck.layout, ck.step, ck.extra_keys) == ("dcp:model", 7, ["optim"]) and set(ck.state) == set(want)
    assert all(torch.equal(ck.state[k], v) for k, v in want.items())
    assert len(D.read_layout(fsdp / "step-7").tensors["model.0.weight"].chunks) == 4  # 7 rows: 2, 2, 2, 1
    opened: list[tuple[int, int]] = []
    real = D._anon
    monkeypatch.setattr(D, "_anon", lambda view: opened.append(len(view)) or real(view))
    names = ["model.a", "model.b", "model.d", "optim.state.a.exp_avg"]
    for world in (1, 2, 3, 4):
        for rank in range(world):
            rows = {n: D.rank_rows(full[n.split(".")[-1] if n.startswith("model") else "a"].shape[0], world, rank)
                    for n in names}
            for n in names:
                got = D.read_rows(folder, [n], *rows[n])[n]
                t = full["a"] * 2 if n.startswith("optim") else full[n.split(".")[-1]]
                parts = torch.chunk(t, world, 0)
                want = parts[rank] if rank < len(parts) else t[:0]
                assert got.dtype == want.dtype and torch.equal(got, want), (n, world, rank)
    opened.clear()
    D.read_rows(folder, ["model.d"], 0, 2)  # rows 0-1 of d live in one item of one rank
    assert len(opened) == 1
    with pytest.raises(CheckpointError, match="not rows of"):
        D.read_rows(folder, ["model.a"], 4, 9)


# ------------------------------------------------------------------ hostile folders
def _meta(folder: Path):
    with open(folder / ".metadata", "rb") as fh:
        return pickle.load(fh)  # the test's own file, written by the real writer


def _put(folder: Path, md) -> None:
    with open(folder / ".metadata", "wb") as fh:
        pickle.dump(md, fh)


class _Call:
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return self.fn, (self.arg,)


def _two_tensors(tmp_path: Path, name: str) -> Path:
    """A one-process folder of two 4 x 3 tensors, whose metadata the hostile cases rewrite (e.g. w's chunks made
    of rows 0-1 from w's own item and rows from v's item, as if two ranks had written them)."""
    return save({"w": torch.arange(12.0).reshape(4, 3), "v": torch.arange(12.0).reshape(4, 3) + 100},
                tmp_path / name)


def test_hostile_metadata_is_refused_before_anything_runs(tmp_path):
    import builtins

    marker = tmp_path / "ran"
    for i, payload in enumerate([_Call(os.system, f"touch {marker}"), _Call(builtins.eval, "1"),
                                 _Call(subprocess.getoutput, f"touch {marker}")]):
        folder = save({"w": torch.ones(2)}, tmp_path / f"evil{i}")
        md = _meta(folder)
        md.storage_meta = payload
        _put(folder, md)
        with pytest.raises(CheckpointError, match="refused|never names") as ei:
            load_checkpoint(folder)
        assert "\n" not in str(ei.value) and not marker.exists()
    # a stored item (the step) whose pickle calls os.system: the restricted loader refuses it
    folder = save({"w": torch.ones(2), "step": _Call(os.system, f"touch {marker}")}, tmp_path / "evil-item")
    with pytest.raises(CheckpointError, match="evil-item.__0_0.distcp: refused: its pickle references (os|posix).system") as ei:
        load_checkpoint(folder)
    assert not marker.exists()
    res = run_cli("inspect", tmp_path / "evil0")
    assert res.code == 2 and "refused" in res.stderr and not marker.exists()
    # a reduce to a class that is not DCP's (not a code-running one either): refused, nothing imported
    folder = save({"w": torch.ones(2)}, tmp_path / "foreign")
    md = _meta(folder)
    md.storage_meta = _Call(torch.nn.Linear, 3)
    _put(folder, md)
    with pytest.raises(CheckpointError, match="never names"):
        load_checkpoint(folder)


@pytest.mark.parametrize("case, match", [
    ("parent", "not a plain file name"), ("absolute", "not a plain file name"), ("link", "not a regular file"),
    ("outside-link", "not a regular file"), ("bytes", "needs 4,800 bytes"), ("shape", "holds \\[4, 3\\]"),
    ("overlap", "overlap"), ("gap", "hold 9 entries"), ("outside", "outside the tensor"),
    ("missing-chunk", "has no storage entry"), ("missing-shard", "is missing"), ("truncated", "past the end"),
    ("huge", "needs"), ("items-overlap", "overlap in"), ("dtype", "no dtype"), ("not-metadata", "not DCP Metadata"),
    ("cut", "malformed or truncated"), ("garbage-item", "not a torch.save archive"),
    ("metadata-item", "not a .distcp file"), ("newline", "no storage entry"),
])
def test_hostile_folders_are_one_line_errors(tmp_path, case, match):
    folder = _two_tensors(tmp_path, case)
    md = _meta(folder)
    sdm, storage = md.state_dict_metadata, md.storage_data
    info = {k.fqn: (k, v) for k, v in storage.items()}
    w = sdm["w"]
    if case in ("parent", "absolute", "link"):
        target = {"parent": "../x.distcp", "absolute": str(tmp_path / "x.distcp"), "link": "x.distcp"}[case]
        (tmp_path / "x.distcp").write_bytes((folder / "__0_0.distcp").read_bytes())
        if case == "link":  # a shard named in the metadata that is a link leading out of the folder
            os.symlink(tmp_path / "x.distcp", folder / "x.distcp")
        info["w"][1].relative_path = target
    elif case == "outside-link":
        os.replace(folder / "__0_0.distcp", tmp_path / "moved.distcp")
        os.symlink(tmp_path / "moved.distcp", folder / "__0_0.distcp")
    elif case == "bytes":  # sizes whose bytes the item cannot hold
        w.size = torch.Size([400, 3])
        w.chunks[0].sizes = torch.Size([400, 3])
    elif case == "shape":  # same byte count, another shape
        w.size = torch.Size([3, 4])
        w.chunks[0].sizes = torch.Size([3, 4])
    elif case in ("overlap", "gap", "outside", "missing-chunk"):
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex

        k, v = info["v"]
        off, size = {"overlap": ([1, 0], [2, 3]), "gap": ([3, 0], [1, 3]), "outside": ([2, 0], [3, 3]),
                     "missing-chunk": ([2, 0], [2, 3])}[case]
        w.chunks = [ChunkStorageMetadata(offsets=torch.Size([0, 0]), sizes=torch.Size([2, 3])),
                    ChunkStorageMetadata(offsets=torch.Size(off), sizes=torch.Size(size))]
        k0, v0 = info["w"]
        del storage[k0]
        storage[MetadataIndex("w", torch.Size([0, 0]), 0)] = v0
        if case != "missing-chunk":
            storage[MetadataIndex("w", torch.Size(off), 1)] = v
        del storage[k]
        del sdm["v"]
    elif case == "missing-shard":
        info["w"][1].relative_path = "__1_0.distcp"
    elif case == "truncated":
        data = (folder / "__0_0.distcp").read_bytes()
        (folder / "__0_0.distcp").write_bytes(data[:len(data) - 100])
    elif case == "huge":  # 2^47 declared entries: refused from the metadata, nothing allocated
        w.size = torch.Size([2**40, 2**7])
        w.chunks[0].sizes = torch.Size([2**40, 2**7])
    elif case == "items-overlap":
        info["v"][1].offset = info["w"][1].offset + 10
    elif case == "dtype":
        w.properties.dtype = "float32"  # a name, not a dtype
    elif case == "not-metadata":
        md = {"state_dict_metadata": {}}
    elif case == "metadata-item":  # an item inside .metadata itself
        info["w"][1].relative_path = ".metadata"
    elif case == "newline":  # a name that would break the error line
        sdm["w\nx"] = sdm.pop("w")
    elif case == "garbage-item":
        at = info["w"][1].offset
        with open(folder / "__0_0.distcp", "r+b") as fh:
            fh.seek(at)
            fh.write(b"XXXX")
    if case == "cut":
        raw = (folder / ".metadata").read_bytes()
        (folder / ".metadata").write_bytes(raw[: len(raw) // 2])
    elif case not in ("outside-link", "truncated", "garbage-item"):
        _put(folder, md)
    with pytest.raises(CheckpointError, match=match) as ei:
        load_checkpoint(folder)
    assert "\n" not in str(ei.value)
    res = run_cli("inspect", folder)
    assert res.code == 2 and res.stderr.count("\n") <= 1, res.stderr


def test_damaged_metadata_is_an_error_line_or_a_consistent_load(tmp_path):
    """Every truncation and 200 random byte changes of a real .metadata: a load that equals the original or a
    one-line CheckpointError -- never another exception, never anything run."""
    import random

    sd = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4, dtype=torch.int64)}
    folder = save({**sd, "step": 5}, tmp_path / "ok")
    raw = (folder / ".metadata").read_bytes()
    rng = random.Random(0)
    variants = [raw[:n] for n in range(0, len(raw), 9)]
    for _ in range(200):
        b = bytearray(raw)
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        variants.append(bytes(b))
    loaded = 0
    for v in variants:
        (folder / ".metadata").write_bytes(v)
        try:
            ck = load_checkpoint(folder)
        except CheckpointError as exc:
            assert "\n" not in str(exc)
            continue
        loaded += 1
        for k, t in ck.state.items():  # a changed name or step may load; the tensors are never misread
            if k in sd:
                assert torch.equal(t, sd[k])
    assert 0 < loaded < len(variants)


def test_an_accelerate_trainer_fsdp_run_is_discovered_with_trainer_steps(tmp_path):
    """Accelerate / Trainer with FSDP ``SHARDED_STATE_DICT``: ``checkpoint-N/pytorch_model_fsdp_0/`` (the model as
    ``{"model": ...}``) beside ``optimizer_0/`` and ``trainer_state.json``; the checkpoint is ``checkpoint-N``."""
    import json

    run = tmp_path / "out"
    sds = {}
    for i, step in enumerate((20, 40)):
        m, opt = model_and_optimizer(seed=i)
        sds[step] = {k: v.detach().clone() for k, v in m.state_dict().items()}
        ckdir = run / f"checkpoint-{step // 2}"  # names that differ from the global step: the content wins
        save({"model": sds[step]}, ckdir / "pytorch_model_fsdp_0")
        save({"optimizer": opt.state_dict()}, ckdir / "optimizer_0")
        (ckdir / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    assert sources.discover(run) == [run / "checkpoint-10", run / "checkpoint-20"]
    ck = load_checkpoint(run / "checkpoint-20")
    assert (ck.path, ck.step, ck.step_source, ck.layout) == (str(run / "checkpoint-20"), 40,
                                                             "content:trainer_state.global_step", "dcp:model")
    assert set(ck.state) == set(sds[40]) and all(torch.equal(ck.state[k], v) for k, v in sds[40].items())
    assert sources.digest(run / "checkpoint-20") == sources.digest(run / "checkpoint-20" / "pytorch_model_fsdp_0")
    (run / "checkpoint-20" / "trainer_state.json").unlink()
    assert load_checkpoint(run / "checkpoint-20").step == 20  # the checkpoint-N name, not pytorch_model_fsdp_0's 0
    link = tmp_path / "linked"
    link.mkdir()
    (link / "pytorch_model_fsdp_0").symlink_to(run / "checkpoint-10" / "pytorch_model_fsdp_0")
    assert not sources.get("dcp").claims(link)  # a link to a DCP folder elsewhere is not read through
