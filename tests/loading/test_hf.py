"""Hugging Face folders and Trainer runs: discovery, steps, shards, hostile configs and indexes."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

import hftiny  # noqa: E402
from sam_probe.errors import CheckpointError, SpecError  # noqa: E402
from sam_probe.loading import hf  # noqa: E402
from sam_probe.loading.checkpoints import file_sha256, load_checkpoint  # noqa: E402
from sam_probe.loading.matching import match_state  # noqa: E402
from sam_probe.loading.runs import discover  # noqa: E402


def test_save_pretrained_bert_matches_without_its_transient_buffers(tmp_path):
    model = hftiny.bert()
    model.save_pretrained(tmp_path / "b")
    ck = load_checkpoint(tmp_path / "b")
    assert ck.layout == "hf-folder" and ck.model_spec["name"] == "hf"
    assert "bert.embeddings.position_ids" not in ck.state  # non-persistent: never saved
    built = hf.build_model(tmp_path / "b", expected_numel=ck.n_params)
    m = match_state(built, ck.state)
    assert set(m.params) == {n for n, _ in model.named_parameters()}
    assert torch.equal(m.buffers["bert.embeddings.position_ids"], model.bert.embeddings.position_ids)


def test_gpt2_tied_head_is_accepted_when_absent(tmp_path):
    hftiny.gpt2().save_pretrained(tmp_path / "g")
    ck = load_checkpoint(tmp_path / "g")
    assert "lm_head.weight" not in ck.state
    m = match_state(hf.build_model(tmp_path / "g"), ck.state)
    assert m.tied == ["lm_head.weight"]


def test_trainer_run_steps_from_state_else_folder_name(tmp_path):
    run = hftiny.write_trainer_run(tmp_path / "run", steps=(500, 1000))
    assert [p.name for p in discover(run)] == ["checkpoint-500", "checkpoint-1000"]  # by step, not lexically
    (run / "checkpoint-1000" / "trainer_state.json").unlink()
    a, b = load_checkpoint(run / "checkpoint-500"), load_checkpoint(run / "checkpoint-1000")
    assert (a.step, a.step_source) == (500, "content:trainer_state.global_step") and a.hparams == {"lr": 0.05}
    assert (b.step, b.step_source) == (1000, "filename")
    assert file_sha256(run / "checkpoint-500") != file_sha256(run / "checkpoint-1000")
    assert [p.name for p in discover(run / "checkpoint-500")] == ["checkpoint-500"]


def test_hostile_index_config_and_classes(tmp_path):
    d = tmp_path / "h"
    hftiny.bert().save_pretrained(d, max_shard_size="1KB")
    idx = d / "model.safetensors.index.json"
    good = json.loads(idx.read_text())
    idx.write_text(json.dumps({"weight_map": {"a": "../../etc/passwd"}}))
    with pytest.raises(CheckpointError, match="not a plain file name"):
        load_checkpoint(d)
    idx.write_text(json.dumps(good))
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "hidden_size": 512, "intermediate_size": 4096}))
    with pytest.raises(CheckpointError, match="do not belong together"):
        hf.build_model(d, expected_numel=load_checkpoint(d).n_params)  # refused on the meta device
    (d / "config.json").write_text(json.dumps({**cfg, "architectures": ["Evil"], "auto_map": {"AutoModel": "x.Evil"}}))
    with pytest.raises(SpecError, match="auto_map is never run"):
        hf.build_model(d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable config.json"):
        hf.build_model(d)
    with pytest.raises(SpecError, match="no config.json"):
        hf.build_model(tmp_path)
