"""Fitting a checkpoint's tensors to a model: every layout, Lightning prefixes, mismatch tables."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from sam_probe.errors import CheckpointError
from sam_probe.loading.checkpoints import load_checkpoint
from writers import LAYOUTS, save_in_layout
from sam_probe.loading.matching import KeyMismatchError, Matched, infer_prefix, match_state

PARAMS = ["fc1.weight", "fc1.bias", "bn.weight", "bn.bias", "fc2.weight", "fc2.bias"]
BUFFERS = ["bn.running_mean", "bn.running_var", "bn.num_batches_tracked"]


def _check_matched(m: Matched, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    assert list(m.params) == PARAMS and sorted(m.buffers) == sorted(BUFFERS)
    for n in PARAMS:
        assert torch.equal(m.params[n], state[n])
    for n in BUFFERS:
        assert torch.equal(m.buffers[n], state[n])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_matches_the_model(tmp_path, tiny_model, tiny_state, layout):
    ck = load_checkpoint(save_in_layout(tiny_state, tmp_path / "ck.pt", layout, step=1, hparams={"lr": 0.1}))
    m = match_state(tiny_model, ck.state)
    assert m.prefix == ("model." if layout == "lightning" else "")
    _check_matched(m, tiny_model, tiny_state)


@pytest.mark.parametrize("prefix", ["model.", "net.", "student.backbone.", "model.model."])
def test_lightning_prefix_inferred(tiny_model, tiny_state, prefix):
    state = {prefix + k: v for k, v in tiny_state.items()}
    state["criterion.weight"] = torch.ones(2)  # other LightningModule attributes are ignored
    state["teacher.fc1.weight_extra"] = torch.ones(1)
    m = match_state(tiny_model, state)
    assert m.prefix == prefix
    _check_matched(m, tiny_model, tiny_state)


def test_prefix_inferred_for_model_with_model_submodule(tiny_model, tiny_state):
    class Wrapper(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.model = inner

    w = Wrapper(type(tiny_model)())
    state = {"model.model." + k: v for k, v in tiny_state.items()}
    m = match_state(w, state)
    assert m.prefix == "model." and set(m.params) == {"model." + n for n in PARAMS}


def test_infer_prefix():
    expected = {"fc1.weight", "fc1.bias"}
    assert infer_prefix(["fc1.weight", "fc1.bias"], expected) == ""
    assert infer_prefix(["model.fc1.weight", "model.fc1.bias"], expected) == "model."
    assert infer_prefix(["a.b.fc1.weight", "a.b.fc1.bias", "a.c"], expected) == "a.b."
    assert infer_prefix(["x.y", "z"], expected) == ""
    assert infer_prefix([], expected) == ""


def test_missing_optional_num_batches_tracked(tiny_model, tiny_state):
    state = {k: v for k, v in tiny_state.items() if not k.endswith("num_batches_tracked")}
    m = match_state(tiny_model, state)
    assert int(m.buffers["bn.num_batches_tracked"]) == 0
    assert torch.equal(m.buffers["bn.running_mean"], tiny_state["bn.running_mean"])


def test_matched_tensors_are_the_checkpoint_tensors(tiny_model, tiny_state):
    m = match_state(tiny_model, tiny_state)
    assert m.params["fc1.weight"] is tiny_state["fc1.weight"]  # no copies


def test_mismatch_rows_with_closest_suggestions(tiny_model, tiny_state):
    state = dict(tiny_state)
    state["fc_2.weight"] = state.pop("fc2.weight")          # renamed -> missing + unexpected
    state["fc1.bias"] = torch.zeros(5)                      # wrong shape
    state["zzz"] = torch.ones(1)                            # unexpected, nothing close
    del state["bn.running_var"]                             # missing buffer
    with pytest.raises(KeyMismatchError) as ei:
        match_state(tiny_model, state)
    err = ei.value
    assert isinstance(err, CheckpointError)
    msg = str(err)
    assert "\n" not in msg
    assert "2 missing" in msg and "2 unexpected" in msg and "1 shape-mismatched" in msg
    rows = {(kind, name): detail for kind, name, detail in err.rows}
    assert set(rows) == {("missing", "fc2.weight"), ("missing", "bn.running_var"), ("unexpected", "fc_2.weight"),
                         ("unexpected", "zzz"), ("shape", "fc1.bias")}
    assert rows[("missing", "fc2.weight")] == "closest: fc_2.weight"
    assert rows[("unexpected", "fc_2.weight")] == "closest: fc2.weight"
    assert rows[("unexpected", "zzz")] == ""
    assert rows[("shape", "fc1.bias")] == "checkpoint (5,) vs model (4,)"
    assert [r[0] for r in err.rows] == ["missing", "missing", "unexpected", "unexpected", "shape"]


def test_wrong_width_is_all_shape_rows(tiny_model, tiny_state):
    with pytest.raises(KeyMismatchError) as ei:
        match_state(type(tiny_model)(hidden=5), tiny_state)
    kinds = {r[0] for r in ei.value.rows}
    assert kinds == {"shape"}
    assert ("shape", "fc2.weight", "checkpoint (2, 4) vs model (2, 5)") in ei.value.rows
    assert "check --model" in str(ei.value)


def test_wrong_architecture(tiny_state):
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    with pytest.raises(KeyMismatchError) as ei:
        match_state(model, tiny_state)
    missing = [r for r in ei.value.rows if r[0] == "missing"]
    assert {r[1] for r in missing} == {"0.weight", "0.bias", "1.weight", "1.bias"}
    assert all(r[2].startswith("closest: ") for r in missing)


def test_mismatch_after_layout_loading(tmp_path, tiny_model, tiny_state):
    """A Lightning file against a model of another width still reports the prefix-free names."""
    ck = load_checkpoint(save_in_layout(tiny_state, tmp_path / "ck.ckpt", "lightning", step=1))
    with pytest.raises(KeyMismatchError) as ei:
        match_state(type(tiny_model)(d_in=7), ck.state)
    assert ei.value.rows == [("shape", "fc1.weight", "checkpoint (4, 3) vs model (4, 7)")]


# ------------------------------------------------------------ state_dict names: transient buffers, tied weights
class WithTransient(nn.Module):
    """A persistent and a non-persistent buffer (like BERT's position_ids), and a tied head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 3)
        self.head = nn.Linear(3, 5, bias=False)
        self.head.weight = self.emb.weight  # tied
        self.register_buffer("position_ids", torch.arange(4), persistent=False)
        self.register_buffer("scale", torch.ones(3))


def test_non_persistent_buffers_are_not_required_and_tied_aliases_may_be_absent():
    m = WithTransient()
    state = {k: v.clone() for k, v in m.state_dict().items() if k != "head.weight"}  # what save_pretrained writes
    assert "position_ids" not in state
    got = match_state(m, state)
    assert list(got.params) == ["emb.weight"] and got.tied == ["head.weight"] and got.ignored == []
    assert torch.equal(got.buffers["position_ids"], torch.arange(4)) and "scale" in got.buffers
    # older exports that saved the transient buffer: ignored (the model's own values are used)
    old = {**state, "position_ids": torch.zeros(4, dtype=torch.long)}
    assert match_state(m, old).ignored == ["position_ids"]
    # a file holding only the alias stands for the tied parameter
    alias = {"head.weight": state["emb.weight"], "scale": state["scale"]}
    assert match_state(m, alias).params["emb.weight"] is state["emb.weight"]


def test_hints_point_from_missing_to_unexpected_only(tiny_model, tiny_state):
    state = dict(tiny_state)
    del state["bn.running_var"]  # missing with no rename: no hint pointing at a name that already matched
    with pytest.raises(KeyMismatchError) as ei:
        match_state(tiny_model, state)
    assert ei.value.rows == [("missing", "bn.running_var", "")]


def test_layout_names_every_prefix(tmp_path, tiny_model, tiny_state):
    ck = load_checkpoint(save_in_layout(tiny_state, tmp_path / "c.pt", "ddp-compiled", step=1))
    assert match_state(tiny_model, ck.state, ck.stripped_prefixes).prefixes == "module. + _orig_mod."
    light = load_checkpoint(save_in_layout(tiny_state, tmp_path / "l.ckpt", "lightning", step=1))
    assert match_state(tiny_model, light.state, light.stripped_prefixes).prefixes == "model."
    assert match_state(tiny_model, tiny_state).prefixes == "-" == match_state(tiny_model, tiny_state).layout
