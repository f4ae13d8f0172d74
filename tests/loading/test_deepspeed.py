"""The DeepSpeed source: ZeRO 1-3 folders written in DeepSpeed's documented layout, rebuilt exactly, read inertly."""
from __future__ import annotations

import os

import pytest
import torch

from clitools import run_cli
from sam_probe.errors import CheckpointError
from sam_probe.loading import sources
from sam_probe.loading.checkpoints import file_sha256, load_checkpoint
from writers import save_deepspeed


@pytest.fixture
def state():
    g = torch.Generator().manual_seed(0)
    return {"fc1.weight": torch.randn(5, 3, generator=g), "fc1.bias": torch.randn(5, generator=g),
            "bn.running_mean": torch.randn(5, generator=g), "bn.num_batches_tracked": torch.tensor(7),
            "fc2.weight": torch.randn(2, 5, generator=g), "fc2.bias": torch.randn(2, generator=g)}


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_stage_and_world_size_rebuilds_the_exact_weights(tmp_path, state, stage, world):
    folder = save_deepspeed(state, tmp_path / "ds", step=40, stage=stage, world=world, groups=2,
                            buffers=("bn.running_mean", "bn.num_batches_tracked"))
    ck = load_checkpoint(folder)
    assert ck.source == "deepspeed" and ck.layout == f"deepspeed-zero{stage}"
    assert set(ck.state) == set(state)
    for k, v in state.items():
        assert torch.equal(ck.state[k], v.float() if v.is_floating_point() else v), k
    assert (ck.step, ck.step_source) == (40, "content:global_steps") and ck.hparams == {"lr": 1e-3}
    assert ck.placeholders == ["deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"]  # inert, never imported
    assert ck.digest == file_sha256(folder) and ck.nonfinite() == {}


def test_a_deepspeed_run_is_discovered_by_step_and_analysed(tmp_path, tiny_runs):
    """A save dir of global_stepN/ folders is a run; sharpness on it equals sharpness on the same weights as .pt."""
    from conftest import TINY

    files = sorted(tiny_runs["sgd"].glob("*.pt"))
    run = tmp_path / "ds_run"
    for f in files[:2]:
        ck = load_checkpoint(f)
        save_deepspeed(ck.state, run, step=ck.step + 1000, stage=3, world=2)
    assert [p.name for p in sources.discover(run)] == [f"global_step{load_checkpoint(f).step + 1000}"
                                                       for f in files[:2]]
    args = ["--model", "mlp", *[a for k, v in TINY["model_args"].items()
                                for a in ("--model-arg", f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}")],
            "--data", "digits", "--max-samples", "40", "--json", "--no-store", "--no-plot", "-q"]
    ds = run_cli("sharpness", run, *args)
    pt = run_cli("sharpness", files[0], *args)
    assert ds.code == 0 and pt.code == 0, ds.stderr + pt.stderr
    first, same = ds.json()["results"][0], pt.json()["results"][0]
    assert first["step"] == same["step"] + 1000 and first["source"]["layout"] == "deepspeed-zero3"
    assert first["eigenvalues"] == pytest.approx(same["eigenvalues"], rel=1e-6)


def test_hostile_deepspeed_folders_are_one_line_errors(tmp_path, state):
    def fresh(name, **kw):
        return save_deepspeed(state, tmp_path / name, step=3, stage=kw.pop("stage", 2), world=2, **kw)

    # a count that disagrees with the shapes
    bad = fresh("counts", loss_scaler=False)
    f = bad / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    obj = torch.load(f, weights_only=False)
    obj["optimizer_state_dict"]["single_partition_of_fp32_groups"][0] = torch.zeros(3)
    torch.save(obj, f)
    with pytest.raises(CheckpointError, match="not a consistent DeepSpeed checkpoint") as ei:
        load_checkpoint(bad)
    assert "\n" not in str(ei.value)
    # a missing rank
    gone = fresh("missing")
    (gone / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(CheckpointError, match="partition_count 2 but 1 optimizer state files"):
        load_checkpoint(gone)
    # a rank file that is a link leading out of the folder
    out = fresh("outside")
    moved = tmp_path / "elsewhere.pt"
    os.replace(out / "zero_pp_rank_0_mp_rank_00_optim_states.pt", moved)
    os.symlink(moved, out / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(CheckpointError, match="not a regular file inside the folder"):
        load_checkpoint(out)
    # an optimizer file whose pickle calls os.system: refused before anything runs, no --trust-checkpoint advice
    evil = fresh("evil")
    marker = tmp_path / "ran"
    payload = (b"\x80\x02cos\nsystem\nq\x00X" + len(f"touch {marker}").to_bytes(4, "little")
               + f"touch {marker}".encode() + b"\x85R.")
    import zipfile
    target = evil / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    with zipfile.ZipFile(target, "w") as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/version", "3\n")
    with pytest.raises(CheckpointError, match="refused") as ei:
        load_checkpoint(evil)
    assert "--trust-checkpoint" not in str(ei.value) and not marker.exists()
    with pytest.raises(CheckpointError, match="--key does not apply"):
        load_checkpoint(fresh("key"), key="module")
