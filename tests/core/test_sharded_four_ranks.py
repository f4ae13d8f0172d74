"""``ratios``, ``gradnorm``, ``interpolate``, ``alignment``, ``subspace`` and ``distance`` on 4 model-sharded
gloo ranks = one process (float64, the MLP).

The 2-rank tests (tests/core/test_sharded_analyses.py, tests/core/test_sharded_eigen.py) cover the MLP, the
BatchNorm CNN and the tiny GPT-2; with 4 ranks the MLP's smallest tensors (the 3 output biases) leave one rank
with no entries of them, and the radix selection, the gathers in one process's order and the Gram reductions
see four partial sums.  One spawn (4 processes on 2 shared cores: the MLP only) runs both files' per-rank
computations; the test compares them with the same one-process references those files use.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sam_probe import distributed

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_sharded_analyses as ana  # noqa: E402
import test_sharded_eigen as eig  # noqa: E402
from test_distributed import close, run_ranks  # noqa: E402

pytestmark = pytest.mark.slow  # gloo ranks as processes

WORLD = 4


def mlp_only(cases):
    """``cases`` without the CNN and the GPT-2 (the MLP; the wide MLP only where named: its memory numbers are
    skipped); the others are not even built (GPT-2 would import transformers in every rank)."""
    return lambda names=("mlp",): cases(tuple(n for n in names if n in ("mlp", "wide")))


def worker(outdir: str) -> None:
    distributed.init("cpu")
    try:
        ana.NAMES = ("mlp",)
        eig.cases = mlp_only(eig.cases)
        eig.memory_numbers = lambda *a: {}  # (the memory test runs with 2 ranks)
        inputs = torch.load(Path(outdir, "inputs.pt"), weights_only=True)
        torch.save({"analyses": ana.sharded_numbers(), "eigen": eig.sharded_numbers(inputs)},
                   Path(outdir, f"rank{distributed.rank()}.pt"))
    finally:
        distributed.shutdown()


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:  # (the module is shared with tests/core/test_sharded_eigen.py)
        mp.setattr(eig, "cases", mlp_only(eig.cases))
        ref = eig.reference()
    out = tmp_path_factory.mktemp("four")
    torch.save({n: {"V": r["V"], "evals": r["evals"]} for n, r in ref.items()}, out / "inputs.pt")
    procs = run_ranks([sys.executable, __file__, str(out)], WORLD, timeout=400)
    for p in procs:
        assert p.returncode == 0, p.stderr[-3000:]
    return ref, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_four_ranks_ratios_gradnorm_interpolate(four):
    _, rows = four
    model, x, y, loss = ana.cases(("mlp",))["mlp"]
    ref = ana.reference("mlp", model, x, y, loss)
    got = [r["analyses"]["mlp"] for r in rows]
    assert all(g["weights_unchanged"] for g in got)
    for key in ("ratios", "ratios_asam"):
        a, b = dict(ref[key]), dict(got[0][key])
        codes, flat = a.pop("codes"), a.pop("ire_flat")
        got_codes, got_flat = b.pop("codes"), b.pop("ire_flat")
        ana.same_packed(codes, got_codes)  # the stored bytes of one process
        assert got_flat["rank"] == flat["rank"] and np.array_equal(got_flat["mask"], flat["mask"])
        for g in got[1:]:  # rank 0 alone holds codes and masks; every rank the same statistics
            c = dict(g[key])
            assert c.pop("codes") is None and c.pop("ire_flat")["mask"] is None
            close(b, c, rel=0.0, path=f"{key}.rank")
        assert a["counts"] == b["counts"] and a["buckets"] == b["buckets"]
        for la, lb in zip(a["per_layer"], b["per_layer"]):
            if la["name"] in ref["near_ties"]:
                la["magnitude_split"] = lb["magnitude_split"] = None
        close(a, b, rel=1e-10, path=key)
    close(ref["gradnorm"], got[0]["gradnorm"], rel=1e-10, path="gradnorm")
    close(ref["interpolate"], got[0]["interpolate"], rel=1e-10, path="interpolate")
    assert np.array_equal(got[0]["tie_mask"], ref["tie_mask"]) and all(g["tie_mask"] is None for g in got[1:])


def test_four_ranks_alignment_subspace_distance(four):
    ref, rows = four
    r = ref["mlp"]
    got = [row["eigen"]["mlp"] for row in rows]
    assert sum(g["P_local"] for g in got) == r["P"] and min(g["P_local"] for g in got) > 0
    for g in got[1:]:  # reduced scalars: the same on every rank; gathered vectors on rank 0 only
        for key in ("alignment", "subspace", "distance", "pair", "share", "overlap_given"):
            assert g[key] == got[0][key], key
        assert g["stored"] is None and g["gathered"] is None
    a = got[0]
    close(a["alignment"]["chi"], r["alignment"]["chi"], rel=1e-10, path="chi")
    close(a["alignment"]["dL"], r["alignment"]["dL"], rel=1e-10, path="dL")
    close(a["alignment"]["dL_pred"], r["alignment"]["dL_pred"], rel=1e-8, path="dL_pred")
    close(a["alignment"]["delta_chi"], r["alignment"]["delta_chi"], rel=1e-9, path="delta_chi")
    assert a["alignment"]["eta_star"] == r["alignment"]["eta_star"]
    close(a["overlap_given"], r["overlap"], rel=1e-12, path="overlap_given")
    close(a["subspace"]["eigenvalues"], r["evals"], rel=1e-8, path="eigenvalues")
    close(a["subspace"]["overlap"], r["overlap"], rel=1e-8, path="overlap")
    assert torch.equal(torch.tensor(a["gathered"], dtype=torch.float64), r["V"][0])
    close(a["distance"], r["distance"], rel=1e-12, path="distance")
    assert a["pair"] == pytest.approx(r["pair"], rel=1e-12)
    close(a["share"][1:], r["share"][1:], rel=1e-10, path="share")


if __name__ == "__main__":
    worker(sys.argv[1])
