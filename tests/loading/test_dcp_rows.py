"""``--shard-model`` on a torch.distributed.checkpoint folder: each rank reads only its rows.

A lazy DCP checkpoint holds meta tensors (the stored names, shapes and dtypes) and reads rows on demand; its
rows equal the eager load's FSDP chunks for 1 to 4 ranks, and a damaged item is a one-line error when a rank
reads it.  One 2-rank ``sharpness --shard-model`` run over a run of three folders (saved, as 2 FSDP ranks would,
in row chunks): the good one equals the one-process result and each rank read only the items of its rows; a
NaN and a damaged item that only rank 1 reads are the same one-line errors as the one-process run's.
"""
from __future__ import annotations

import dataclasses
import json
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch

from sam_probe.core.meta_init import row_range, rows_of
from sam_probe.errors import CheckpointError
from sam_probe.loading.checkpoints import load_checkpoint
from sam_probe.loading.sources import dcp as D

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
MLP_ARGS = {"in_dim": 64, "hidden": [5], "out_dim": 10}


def save_in_rows(state: dict, folder: Path, parts: int = 2) -> Path:
    """``dcp.save(state, no_dist=True)`` with every tensor of 2 or more rows saved as ``parts`` chunks of rows (the
    items ``parts`` FSDP ranks write), 0-d and one-row tensors whole."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
    from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

    class RowPlanner(DefaultSavePlanner):
        def create_local_plan(self):
            plan = super().create_local_plan()
            items = []
            for it in plan.items:
                t = self.state_dict.get(it.index.fqn) if it.type == WriteItemType.TENSOR else None
                if t is None or t.dim() == 0 or t.shape[0] < 2:
                    items.append(it)
                    continue
                for c in torch.chunk(torch.arange(t.shape[0]), parts):
                    off = torch.Size((int(c[0]),) + (0,) * (t.dim() - 1))
                    size = torch.Size((len(c), *t.shape[1:]))
                    items.append(WriteItem(index=MetadataIndex(it.index.fqn, off), type=WriteItemType.SHARD,
                                           tensor_data=TensorWriteData(ChunkStorageMetadata(off, size),
                                                                       it.tensor_data.properties, t.shape)))
            self.plan = dataclasses.replace(plan, items=items)
            return self.plan

        def resolve_data(self, item):
            if item.type != WriteItemType.SHARD:
                return super().resolve_data(item)
            o, s = item.tensor_data.chunk.offsets[0], item.tensor_data.chunk.sizes[0]
            return self.state_dict[item.index.fqn][o:o + s].contiguous()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=folder, no_dist=True, planner=RowPlanner())
    return folder


def damage(folder: Path, values: torch.Tensor) -> None:
    """Flip one byte of ``values``' stored bytes (inside one item: its CRC no longer matches)."""
    raw = values.contiguous().numpy().tobytes()
    for f in folder.glob("*.distcp"):
        data = bytearray(f.read_bytes())
        at = data.find(raw)
        if at >= 0:
            data[at + len(raw) // 2] ^= 0x40
            f.write_bytes(bytes(data))
            return
    raise AssertionError("values not found")


def mlp_state(seed: int = 0) -> dict:
    from sam_probe.loading.models import build_model

    torch.manual_seed(seed)
    return {k: v.detach().clone() for k, v in build_model("mlp", dict(MLP_ARGS)).state_dict().items()}


def test_lazy_rows_equal_the_eager_chunks_and_a_damaged_item_is_an_error_when_read(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {"w": torch.randn(7, 3, generator=g), "b": torch.randn(5, generator=g).double(), "s": torch.tensor(2.5),
          "one": torch.randn(1, 4, generator=g), "n": torch.arange(6, dtype=torch.int64)}
    for name, folder in (("rows", save_in_rows(sd, tmp_path / "rows", parts=3)),
                         ("whole", save_in_rows(sd, tmp_path / "whole", parts=1))):
        eager = load_checkpoint(folder)
        lazy = load_checkpoint(folder, lazy=True)
        assert lazy.lazy is not None and eager.lazy is None and lazy.nonfinite() == {}
        assert {n: (t.shape, t.dtype) for n, t in lazy.state.items()} == \
            {n: (t.shape, t.dtype) for n, t in eager.state.items()}
        assert all(t.is_meta for t in lazy.state.values())
        assert (lazy.digest, lazy.step, lazy.layout, lazy.n_params) == \
            (eager.digest, eager.step, eager.layout, eager.n_params)
        for world in range(1, 5):
            for rank in range(world):
                for n, t in lazy.state.items():
                    got = lazy.lazy.rows(t, *row_range(t.shape[0] if t.dim() else 1, world, rank))
                    assert torch.equal(got, rows_of(eager.state[n], world, rank)), (name, n, world, rank)
        assert all(torch.equal(lazy.lazy.rows(t), eager.state[n]) for n, t in lazy.state.items())
    # in row chunks, rank 1 of 2 opens only the items of its rows
    lazy = load_checkpoint(tmp_path / "rows", lazy=True)
    t = lazy.state["w"]
    lazy.lazy.rows(t, *row_range(7, 2, 1))  # rows 4-6: the chunks of rows 3-5 and 6
    lay = D.read_layout(tmp_path / "rows")
    assert lazy.lazy.bytes_read == sum(c.length for c in lay.tensors["w"].chunks[1:])
    assert lazy.lazy.bytes_kept == 3 * 3 * 4
    # a damaged item: found when (and only when) a rank reads it, as one line naming the file
    damage(tmp_path / "rows", sd["w"][6:])  # the item of row 6
    lazy = load_checkpoint(tmp_path / "rows", lazy=True)  # the layout is intact
    t = lazy.state["w"]
    assert torch.equal(lazy.lazy.rows(t, 0, 4), sd["w"][:4])  # rank 0 of 2 does not read that item
    with pytest.raises(CheckpointError) as ei:
        lazy.lazy.rows(t, 4, 7)
    assert "\n" not in str(ei.value) and ".distcp" in str(ei.value)
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "rows")  # the eager load reads every item


def test_two_ranks_read_only_their_rows_of_a_dcp_folder(tmp_path):
    """``sharpness --shard-model`` over 2 ranks on a run of DCP folders equals the one-process run; the good
    folder's note says how many bytes each rank read; errors only rank 1 meets are rank 0's line too."""
    from clitools import run_cli
    from test_distributed import close, run_ranks

    sd = mlp_state()
    run = tmp_path / "run"
    save_in_rows(sd, run / "step-1")
    nan = {k: v.clone() for k, v in sd.items()}
    w = next(k for k, v in nan.items() if v.dim() == 2)
    nan[w][-1, 0] = float("nan")  # a row only rank 1 holds
    save_in_rows(nan, run / "step-2")
    save_in_rows(mlp_state(1), run / "step-3")
    damage(run / "step-3", mlp_state(1)[w][-1])
    args = ["sharpness", str(run), "--model", "mlp", "--model-arg", "in_dim=64", "--model-arg", "hidden=5",
            "--model-arg", "out_dim=10", "--data", "digits", "--max-samples", "30", "--dtype", "float64",
            "--top-k", "1", "--tol", "1e-7", "--rho", "0.05", "--json", "--no-plot", "--no-store"]
    one = run_cli(*args)
    procs = run_ranks([sys.executable, "-m", "sam_probe", *args, "--shard-model"], 2, timeout=300)
    assert [p.returncode for p in procs] == [one.code] * 2, procs[0].stderr[-2000:] + procs[1].stderr[-2000:]
    assert procs[1].stdout == ""
    a, b = one.json(), json.loads(procs[0].stdout)
    good_a, good_b = a["results"][0], b["results"][0]
    assert len(a["results"]) == len(b["results"]) == 1 and good_b["step"] == 1
    for key in ("loss", "eigenvalues", "sam_sharpness"):
        close(good_a[key], good_b[key], rel=1e-7, path=key)
    errors = re.findall(r"^error: .*$", procs[0].stderr, re.M)
    assert errors == re.findall(r"^error: .*$", one.stderr, re.M)  # the same lines as one process gives
    assert any("step-2" in e and "non-finite weights in" in e and w in e for e in errors), procs[0].stderr[-3000:]
    assert any("step-3" in e and ".distcp" in e and "CRC" in e for e in errors), procs[0].stderr[-3000:]
    # each rank kept only its rows and read only the items holding them
    note = re.search(r"bytes of weights kept per rank: ([\d,]+), ([\d,]+) of ([\d,]+); bytes of stored items read "
                     r"per rank: ([\d,]+), ([\d,]+)", procs[0].stderr.replace("\n", " "))
    assert note, procs[0].stderr[-3000:]
    k0, k1, total, r0, r1 = (int(x.replace(",", "")) for x in note.groups())
    assert k0 + k1 == total == sum(t.numel() * 4 for t in sd.values()) and 0 < k1 < k0
    items = sum(c.length for t in D.read_layout(run / "step-1").tensors.values() for c in t.chunks)
    assert r0 + r1 == items and 0 < r1 < r0 < items
