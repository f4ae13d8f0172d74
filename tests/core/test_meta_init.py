"""Models built with meta-device parameters for ``--shard-model`` (core/meta_init.py): nothing whole on a rank.

The 2- and 4-rank runs in tests/core/test_sharded.py go through this path for the zoo MLP; here: the
registration patch itself (parameters on meta, buffers real, ties kept, the patch undone), the rows a
rank takes, and a Hugging Face folder of several safetensors shards analysed with ``--shard-model``
(a group of one process) equal to the ordinary one-process run.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from sam_probe.core.meta_init import has_meta_params, params_on_meta, rows_of

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class WithBuffers(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)
        self.register_buffer("mask", torch.tril(torch.ones(4, 4)), persistent=False)
        self.b = nn.Linear(4, 3, bias=False)
        self.c = nn.Linear(4, 3, bias=False)
        self.c.weight = self.b.weight  # tied


def test_params_on_meta_keeps_buffers_and_ties():
    with params_on_meta():
        m = WithBuffers()
    assert has_meta_params(m) and all(p.is_meta for p in m.parameters())
    assert not any(b.is_meta for b in m.buffers())
    assert torch.equal(m.mask, torch.tril(torch.ones(4, 4)))  # the constructor's own value
    assert m.c.weight is m.b.weight  # a tie survives
    assert [n for n, _ in m.named_parameters()] == [n for n, _ in WithBuffers().named_parameters()]
    assert all(p.requires_grad for p in m.parameters())
    assert not has_meta_params(nn.Linear(2, 2))  # the patch is gone after the block


def test_params_on_meta_undone_on_error():
    with pytest.raises(RuntimeError), params_on_meta():
        raise RuntimeError("constructor failed")
    assert not has_meta_params(nn.Linear(2, 2))


def test_hf_model_builds_on_meta():
    pytest.importorskip("transformers")
    import hftiny

    with params_on_meta():
        gpt = hftiny.gpt2()
    assert has_meta_params(gpt)
    assert gpt.lm_head.weight is gpt.transformer.wte.weight


@pytest.mark.parametrize("shape,world", [((7, 3), 2), ((7, 3), 4), ((2,), 4), ((), 2), ((5, 2, 2), 3)])
def test_rows_are_fsdp_chunks(shape, world):
    t = torch.arange(int(torch.Size(shape).numel()), dtype=torch.float64).reshape(shape)
    parts = [rows_of(t, world, r) for r in range(world)]
    assert torch.equal(torch.cat([p.reshape(-1) for p in parts]), t.reshape(-1))
    assert all(p.shape[1:] == t.shape[1:] for p in parts)


def test_hf_sharded_folder_with_shard_model_equals_one_process(tmp_path):
    """A GPT-2 folder saved in several safetensors shards: ``sharpness --shard-model`` (a group of one, its
    weights filled into meta-built shards) equals the ordinary run, and says how it was built."""
    pytest.importorskip("transformers")
    import hftiny
    from clitools import run_cli

    model = hftiny.perturb(hftiny.gpt2())
    model.save_pretrained(tmp_path / "gpt", max_shard_size="1KB")
    assert len(list((tmp_path / "gpt").glob("*.safetensors"))) > 1
    torch.save(hftiny.token_batch(6, labels=None), tmp_path / "tokens.pt")
    args = ["sharpness", str(tmp_path / "gpt"), "--data", str(tmp_path / "tokens.pt"), "--top-k", "1",
            "--tol", "1e-6", "--dtype", "float64", "--rho", "0.05", "--json", "--no-plot", "--no-store"]
    one = run_cli(*args)
    assert one.code == 0, one.stderr
    proc = subprocess.run([sys.executable, "-m", "sam_probe", *args, "--shard-model"], capture_output=True,
                          text=True, timeout=300, env={**__import__("os").environ, "WORLD_SIZE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "built on the meta device" in proc.stderr
    a, b = one.json()["results"][0], json.loads(proc.stdout)["results"][0]
    assert abs(a["loss"] - b["loss"]) <= 1e-12 * abs(a["loss"])
    for x, y in zip(a["eigenvalues"], b["eigenvalues"]):
        assert abs(x - y) <= 1e-6 * abs(x)
    assert abs(a["sam_sharpness"] - b["sam_sharpness"]) <= 1e-8 * abs(a["sam_sharpness"]) + 1e-12
