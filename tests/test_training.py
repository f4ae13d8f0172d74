"""The small trainer: every optimizer learns, late-SAM switches, masked SAM, checkpoints, purity."""
import pytest
import torch

from sam_probe.errors import SpecError
from sam_probe.loading.data import load_data
from sam_probe.loading.models import build_model
from sam_probe.training import OPTIMIZERS, batches, masked_direction, train


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", max_samples=256, seed=0)


def mlp(seed=0):
    torch.manual_seed(seed)
    return build_model("mlp", {"hidden": [16]})


@pytest.mark.parametrize("opt", OPTIMIZERS)
def test_each_optimizer_decreases_loss(digits, opt):
    extra = {"switch_step": 5} if opt == "late-sam" else {}
    rho = 0.002 if opt == "linf-sam" else 0.05
    h = train(mlp(), digits, optimizer=opt, lr=0.2, steps=30, batch_size=64, rho=rho, checkpoint_every=30,
              momentum=0.5, weight_decay=1e-4, **extra)
    assert h[-1]["loss"] < 0.7 * h[0]["loss"]


def test_late_sam_switches(digits):
    common = dict(lr=0.1, steps=8, batch_size=32, checkpoint_every=2)
    late = train(mlp(), digits, optimizer="late-sam", switch_step=4, **common)
    assert [m["phase"] for m in late] == ["sgd", "sgd", "sam", "sam", "sam"]
    sgd_model, late_model = mlp(), mlp()
    train(sgd_model, digits, optimizer="sgd", **{**common, "steps": 4})
    train(late_model, digits, optimizer="late-sam", switch_step=4, **{**common, "steps": 4})
    assert all(torch.equal(a, b) for a, b in zip(sgd_model.parameters(), late_model.parameters()))
    train(sgd_model, digits, optimizer="sgd", **{**common, "steps": 5})
    train(late_model, digits, optimizer="late-sam", switch_step=4, **{**common, "steps": 5})
    assert not all(torch.equal(a, b) for a, b in zip(sgd_model.parameters(), late_model.parameters()))


def test_samckpt_condition_one_is_plain_sam(digits):
    a, b, c = mlp(), mlp(), mlp()
    kw = dict(optimizer="sam", lr=0.1, steps=5, batch_size=32, rho=0.1)
    train(a, digits, **kw)
    train(b, digits, samckpt="12", condition=1.0, **kw)
    train(c, digits, samckpt="1", condition=0.0, **kw)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters()))


def test_masked_direction():
    g = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0])
    gt = torch.tensor([2.0, 0.5, -2.0, -0.5, 3.0])  # C1, C2, C3, C4, undefined
    assert torch.equal(masked_direction(g, gt, [0, 3], 10.0), torch.tensor([20.0, 0.5, -2.0, -5.0, 3.0]))


def test_checkpoint_steps_and_state(digits):
    seen = []
    model = build_model("cnn", {"width": 2})
    bn0 = model.features[1].running_mean.clone()
    train(model, digits, optimizer="sgd", lr=0.05, steps=7, batch_size=32, checkpoint_every=3,
          on_checkpoint=lambda s, sd, m: seen.append((s, sd, m)))
    assert [s for s, _, _ in seen] == [0, 3, 6, 7]
    step, state, metrics = seen[-1]
    assert set(state) == set(model.state_dict()) and all(not t.requires_grad for t in state.values())
    assert torch.equal(state["head.weight"], model.head.weight.detach())
    assert seen[0][1]["head.weight"] is not state["head.weight"]
    assert metrics["step"] == 7 and isinstance(metrics["loss"], float) and 0 <= metrics["accuracy"] <= 1
    assert int(state["features.1.num_batches_tracked"]) == 7 and not torch.equal(bn0, model.features[1].running_mean)


def test_data_untouched_and_deterministic(digits):
    x, y = digits.inputs.clone(), digits.targets.clone()
    a, b = mlp(), mlp()
    ha = train(a, digits, optimizer="asam", lr=0.1, steps=6, batch_size=50, seed=3)
    hb = train(b, digits, optimizer="asam", lr=0.1, steps=6, batch_size=50, seed=3)
    assert ha == hb and all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert torch.equal(digits.inputs, x) and torch.equal(digits.targets, y)


def test_batches_cover_each_epoch():
    it = batches(10, 4, seed=0)
    epoch = torch.cat([next(it) for _ in range(3)])
    assert sorted(epoch.tolist()) == list(range(10))
    assert torch.equal(next(batches(10, 0, 0)), torch.arange(10))


def test_diag_linear_runs_full_batch():
    data = load_data("synthetic-minor-major", options={"n": 16, "d": 6, "features": "aligned"})
    m = build_model("diag-linear", {"in_dim": 6, "alpha": 0.3})
    h = train(m, data, optimizer="sam", lr=0.5, steps=40, batch_size=0, checkpoint_every=20)
    assert data.meta["loss"] == "bce" and h[-1]["loss"] < h[0]["loss"]
    assert float((m.u * m.v).argmax()) == 0


def test_bad_configs():
    data = load_data("synthetic-minor-major", options={"n": 8, "d": 3})
    m = build_model("diag-linear", {"in_dim": 3})
    with pytest.raises(SpecError, match="did you mean 'sam'"):
        train(m, data, optimizer="sma")
    with pytest.raises(SpecError, match="switch-step"):
        train(m, data, optimizer="late-sam")
    with pytest.raises(SpecError, match="SAM optimizer"):
        train(m, data, optimizer="sgd", samckpt="1")
    with pytest.raises(SpecError, match="digits 1-4"):
        train(m, data, optimizer="sam", samckpt="15")
