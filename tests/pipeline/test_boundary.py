"""The trust boundary as pure functions: what a checkpoint may choose, what only the user may."""
from __future__ import annotations

import pytest

from sam_probe.errors import CLI, CheckpointError, SpecError, style
from sam_probe.pipeline.boundary import (plain_value, resolve_data, resolve_loss, resolve_model,
                                         saved_factory_args)
from sam_probe.settings import Settings

CK = "run/step_10.pt"


def test_the_user_model_wins_and_keeps_saved_arguments_only_for_the_same_model():
    saved = {"name": "mlp", "args": {"hidden": [8]}}
    assert resolve_model(Settings(model="mlp"), saved, CK, False) == ("mlp", {"hidden": [8]})
    assert resolve_model(Settings(model="cnn"), saved, CK, False) == ("cnn", {})
    s = Settings(model="mlp", model_args={"hidden": [4], "out_dim": 3})
    assert resolve_model(s, saved, CK, False) == ("mlp", {"hidden": [4], "out_dim": 3})


def test_a_checkpoint_names_only_builtin_models_with_plain_arguments():
    assert resolve_model(Settings(), {"name": "mlp", "args": {"hidden": [6]}}, CK, False) == ("mlp", {"hidden": [6]})
    assert resolve_model(Settings(), {}, CK, True) == ("hf", {})  # a config.json beside the weights
    with pytest.raises(CheckpointError, match="never imports or calls code") as e:
        resolve_model(Settings(), {"name": "evil.py:make"}, CK, False)
    with style(CLI):
        assert "pass --model evil.py:make yourself" in str(e.value)
    assert "pass model='evil.py:make' yourself" in str(e.value)  # in Python: the keyword
    allowed = Settings(allow_models=["evil.py:make"])
    assert resolve_model(allowed, {"name": "evil.py:make"}, CK, False) == ("evil.py:make", {})
    with pytest.raises(CheckpointError, match="not a plain value"):
        resolve_model(Settings(), {"name": "mlp", "args": {"hidden": {"nested": 1}}}, CK, False)
    with pytest.raises(CheckpointError, match="not key=value pairs"):
        resolve_model(Settings(), {"name": "mlp", "args": [1, 2]}, CK, False)
    with pytest.raises(SpecError, match="does not name its model"):
        resolve_model(Settings(), None, CK, False)


def test_saved_hyper_parameters_fill_only_named_open_parameters():
    def factory(hidden=3, depth=1, **kwargs):
        return None

    hparams = {"hidden": 8, "depth": [1, 2], "lr": 0.1, "width": 5, "bad": object()}
    assert saved_factory_args(factory, hparams, {"depth": 4}) == {"depth": 4, "hidden": 8}
    assert plain_value([1, "a", None]) and not plain_value([[1]]) and not plain_value(list(range(1025)))


def test_data_is_the_users_or_builtin_data_the_checkpoint_names():
    assert resolve_data(Settings(data="x.pt", data_args={"a": 1}), {"data": "digits"}, CK) == ("x.pt", {"a": 1})
    saved = {"data": "digits", "data_args": {"n": 5}}
    assert resolve_data(Settings(), saved, CK) == ("digits", {"n": 5})
    assert resolve_data(Settings(data_args={"n": 7}), saved, CK) == ("digits", {"n": 7})  # --data-arg wins
    assert resolve_data(Settings(), {**saved, "data_args": {"n": object()}}, CK) == ("digits", {})
    with pytest.raises(CheckpointError, match="never reads files"):
        resolve_data(Settings(), {"data": "/etc/passwd"}, CK)
    with pytest.raises(SpecError) as e:
        resolve_data(Settings(), {}, CK)
    with style(CLI):
        assert str(e.value) == "no --data given and the checkpoint does not name its data; pass --data (e.g. digits)"


def test_loss_is_the_users_a_builtin_the_checkpoint_names_lm_or_the_datas_default():
    assert resolve_loss(Settings(loss="mse"), {"loss": "ce"}, CK, causal_lm=True, data_default="bce") == "mse"
    assert resolve_loss(Settings(), {"loss": "ce"}, CK, causal_lm=True, data_default="bce") == "ce"
    assert resolve_loss(Settings(), {}, CK, causal_lm=True, data_default="bce") == "lm"
    assert resolve_loss(Settings(), {}, CK, causal_lm=False, data_default="bce") == "bce"
    for named in ("pkg.mod:fn", "loss.py"):
        with pytest.raises(CheckpointError, match="never imports code"):
            resolve_loss(Settings(), {"loss": named}, CK, causal_lm=False, data_default=None)
