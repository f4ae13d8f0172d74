"""``ratios``, ``overlap``, ``interpolate`` and ``gradnorm`` under ``--shard-model`` (FSDP2, 2 gloo ranks) equal
one process (float64).

One spawn of 2 ranks (this file run as a script with torchrun's environment: tests/test_distributed.py's
``run_ranks``) computes, for an MLP, a BatchNorm CNN in eval mode and a tiny GPT-2 LM: the ratio unit (codes
and IRE mask gathered to rank 0 in one process's order), the gradient norms and the loss along a path between
two states (CNN: BatchNorm buffers interpolated too), plus the IRE flat mask of a synthetic float32 gradient
full of ties; the test recomputes them on one process.  A second spawn runs ``overlap --shard-model`` through
the CLI (its ratio units first) and compares the stored units' bytes with a one-process run.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sam_probe import distributed

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_distributed import close, run_ranks  # noqa: E402
from test_sharded import cases, local_part  # noqa: E402

pytestmark = pytest.mark.slow  # gloo ranks as processes

NAMES = ("mlp", "cnn", "gpt2")
RATIO_OPTS = {"rho": 0.05, "variant": "l2", "m": None, "eps": 1e-12, "faithful": False, "edges": "1.2,1.5,2,4,8,16",
              "ire_rank": 0.9, "eta": 0.01, "minibatch": None}
TIE_RANK = 0.3


def ratio_cfg(variant: str = "l2") -> dict:
    from sam_probe.analyses.ratios import ratio_config

    return ratio_config({**RATIO_OPTS, "variant": variant})


def other_state(model) -> dict:
    """State B of the path: every float tensor (parameters and BatchNorm buffers) moved, seeded."""
    g = torch.Generator().manual_seed(7)
    out = {}
    for n, t in list(model.named_parameters()) + list(model.named_buffers()):
        t = t.detach()
        out[n] = t + 0.2 * torch.randn(t.shape, generator=g, dtype=t.dtype) if t.is_floating_point() else t.clone()
        if n.endswith("running_var"):
            out[n] = out[n].abs()
    return out


def tie_gradient(n: int) -> torch.Tensor:
    """A float32 'gradient' whose g² has many ties (the IRE threshold falls on a tie)."""
    return (torch.randint(-3, 4, (n,), generator=torch.Generator().manual_seed(3)) / 4).float()


def sharded_numbers() -> dict:
    from sam_probe.analyses.gradnorm import gradient_norms
    from sam_probe.analyses.ratios import compute_ratios
    from sam_probe.core import inner
    from sam_probe.core.paths import interpolate
    from sam_probe.core.ratios import flat_mask_of_shards
    from sam_probe.core.sharded import ShardedObjective, ShardedPath

    out = {}
    for name, (model, x, y, loss) in cases(NAMES).items():
        state_a = {n: t.detach().clone() for n, t in list(model.named_parameters()) + list(model.named_buffers())}
        state_b = other_state(model)
        obj = ShardedObjective(model, x, y, loss, chunk_size=4 if name == "mlp" else None)
        w0 = obj.current_shard()
        row = {"ratios": compute_ratios(obj, ratio_cfg()), "gradnorm": gradient_norms(obj)}
        if name == "mlp":
            row["ratios_asam"] = compute_ratios(obj, ratio_cfg("asam"))
            with inner.over(obj):
                t = local_part(obj, tie_gradient(obj.n_params), obj.space.names, obj.space.shapes)
                row["tie_mask"] = flat_mask_of_shards(t, obj.space, TIE_RANK, chunk=8)
        path = ShardedPath(obj)
        row["interpolate"] = interpolate(path, path.local(state_a), path.local(state_b), points=5).to_dict()
        row["weights_unchanged"] = bool(torch.equal(obj.current_shard(), w0))
        out[name] = row
    return out


def worker(outdir: str) -> None:
    distributed.init("cpu")
    try:
        torch.save(sharded_numbers(), Path(outdir, f"rank{distributed.rank()}.pt"))
    finally:
        distributed.shutdown()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ranks")
    procs = run_ranks([sys.executable, __file__, str(out)], 2, timeout=400)
    for p in procs:
        assert p.returncode == 0, p.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def reference(name: str, model, x, y, loss) -> dict:
    from sam_probe.analyses.gradnorm import gradient_norms
    from sam_probe.analyses.ratios import compute_ratios
    from sam_probe.core.objective import Objective
    from sam_probe.core.overlap import flat_mask
    from sam_probe.core.paths import interpolate

    state_a = {n: t.detach().clone() for n, t in list(model.named_parameters()) + list(model.named_buffers())}
    state_b = other_state(model)
    obj = Objective(model, x, y, loss)
    row = {"ratios": compute_ratios(obj, ratio_cfg()), "gradnorm": gradient_norms(obj)}
    if name == "mlp":
        row["ratios_asam"] = compute_ratios(obj, ratio_cfg("asam"))
        row["tie_mask"] = flat_mask(tie_gradient(obj.n_params).square(), TIE_RANK)
    row["interpolate"] = interpolate(obj, state_a, state_b, points=5).to_dict()
    # tensors whose magnitude split sits on a tie to rounding (e.g. the two output biases of a 2-class
    # softmax: g_0 = -g_1 up to the last bit): which side of tau an entry lands on is rounding, on one
    # process as on R (the gradients agree to the order of additions only)
    g = obj.grad_flat().abs()
    row["near_ties"] = set()
    for layer, sl in zip(row["ratios"]["per_layer"], obj.space.slices().values()):
        tau = layer["magnitude_split"]["tau"]
        if tau is not None and int(((g[sl] - tau).abs() <= 1e-12 * tau).sum()) > 1:
            row["near_ties"].add(layer["name"])
    return row


def same_packed(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], np.ndarray):
            assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def test_sharded_analyses_equal_one_process(ranks):
    from sam_probe.core.bitpack import unpack_codes

    for name, (model, x, y, loss) in cases(NAMES).items():
        ref = reference(name, model, x, y, loss)
        r0, r1 = ranks[0][name], ranks[1][name]
        assert r0["weights_unchanged"] and r1["weights_unchanged"]
        for key in ("ratios", "ratios_asam"):
            if key not in ref:
                continue
            a, b, c = dict(ref[key]), dict(r0[key]), dict(r1[key])
            codes, flat = a.pop("codes"), a.pop("ire_flat")
            got_codes, got_flat = b.pop("codes"), b.pop("ire_flat")
            assert c.pop("codes") is None and c.pop("ire_flat")["mask"] is None  # rank 0 alone holds them
            # the stored bytes: identical to one process (codes in one process's flat order)
            same_packed(codes, got_codes)
            assert got_flat["rank"] == flat["rank"] and np.array_equal(got_flat["mask"], flat["mask"]), name
            assert len(unpack_codes(got_codes)) == a["n_params"]
            # counts, fractions, buckets, per-tensor tallies exactly; norms and tau to rounding
            close(b, c, rel=0.0, path=f"{name}.{key}.rank1")  # every rank: the same statistics
            assert a["counts"] == b["counts"] and a["buckets"] == b["buckets"], name
            for la, lb in zip(a["per_layer"], b["per_layer"]):
                if la["name"] in ref["near_ties"]:
                    la["magnitude_split"] = lb["magnitude_split"] = None
            close(a, b, rel=1e-10, path=f"{name}.{key}")
            assert min(a["counts"][k] for k in ("C1", "C2")) > 0, name  # non-trivial categories compared
        close(ref["gradnorm"], r0["gradnorm"], rel=1e-10, path=f"{name}.gradnorm")
        close(r0["gradnorm"], r1["gradnorm"], rel=0.0, path=f"{name}.gradnorm.rank1")
        if "interpolate" in ref:
            close(ref["interpolate"], r0["interpolate"], rel=1e-10, path=f"{name}.interpolate")
            assert len(set(ref["interpolate"]["loss"])) == len(ref["interpolate"]["loss"])  # a non-trivial path
        if "tie_mask" in ref:
            assert r1["tie_mask"] is None and np.array_equal(r0["tie_mask"], ref["tie_mask"])


def timeless(x):
    """``x`` without its wall times."""
    if isinstance(x, dict):
        return {k: timeless(v) for k, v in x.items() if k != "seconds"}
    return [timeless(v) for v in x] if isinstance(x, list) else x


def test_cli_overlap_shard_model_equals_one_process(tmp_path):
    """``overlap --shard-model`` as 2 ranks: its ratio units (computed on the way) and the overlap unit are
    written once, by rank 0, with the same codes and IRE masks as a one-process run, and the same JSON."""
    from clitools import run_cli

    from sam_probe import store
    from sam_probe.commands.train_cmd import write_run

    run = tmp_path / "run"
    write_run(run, optimizer="sam", model="mlp", model_args={"in_dim": 64, "hidden": [5], "out_dim": 10},
              data="digits", max_samples=41, steps=2, lr=0.1, batch_size=20, checkpoint_every=1, seed=0)
    args = ["overlap", str(run), "--data", "digits", "--max-samples", "41", "--dtype", "float64", "--json",
            "--no-plot", "--null", "independence"]
    one = run_cli(*args, "--out", str(tmp_path / "one"))
    assert one.code == 0, one.stderr
    procs = run_ranks([sys.executable, "-m", "sam_probe", *args, "--shard-model", "--out", str(tmp_path / "two")],
                      2, timeout=300)
    assert [p.returncode for p in procs] == [0, 0], procs[0].stderr[-2000:] + procs[1].stderr[-2000:]
    assert procs[1].stdout == ""
    close(timeless(one.json()), timeless(json.loads(procs[0].stdout)), rel=1e-10)

    def units(root):
        got = {}
        for _, result, meta in store.iter_units(root):
            got[(meta["analysis"], str(result.get("path", "")))] = (result, meta)
        return got

    a, b = units(tmp_path / "one"), units(tmp_path / "two")
    assert a.keys() == b.keys() and len([k for k in a if k[0] == "ratios"]) == 3
    for key, (ra, _) in a.items():
        rb, mb = b[key]
        assert mb["world_size"] == 2 and mb["shard_model"] is True
        if key[0] == "ratios":
            same_packed(ra["codes"], rb["codes"])
            assert np.array_equal(ra["ire_flat"]["mask"], rb["ire_flat"]["mask"])


def test_a_lost_rank_ends_the_run_in_one_line(monkeypatch):
    """In a multi-rank group, a unit failing because a peer is gone (or this rank ran out of memory) is not a
    per-unit failure: the ranks no longer meet in the same collectives, so RankLost ends the command (the CLI
    prints its one line and exits 2; units are written only once computed, so none is partial)."""
    from sam_probe.errors import RankLost
    from sam_probe.pipeline.outcome import failure

    lost = RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:1\nmore")
    assert failure("ck.pt", 1, lost).status == "failed"  # one process: an ordinary failed unit
    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setitem(distributed._STATE, "lost", False)
    with pytest.raises(RankLost) as err:
        failure("ck.pt", 1, lost)
    assert "one of the 2 ranks died" in str(err.value) and "\n" not in str(err.value)
    assert failure("ck.pt", 1, ValueError("a bug")).status == "failed"  # other errors stay per unit
    with pytest.raises(RankLost, match="ran out of memory"):
        failure("ck.pt", 1, MemoryError("no room"))


if __name__ == "__main__":
    worker(sys.argv[1])
