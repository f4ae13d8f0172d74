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


# ------------------------------------------------------------------ resume, windows, init scale
def test_checkpoint_step_windows():
    from sam_probe.training import parse_checkpoint_steps

    assert parse_checkpoint_steps("0:4:1,4:20:5,33", 30) == {0, 1, 2, 3, 4, 9, 14, 19, 33}
    assert parse_checkpoint_steps("0:100:50", 60) == {0, 50}
    assert parse_checkpoint_steps(None, 10) is None
    for bad in ("5:2", "a:b", "0:10:0", "-1"):
        with pytest.raises(SpecError, match="checkpoint-steps"):
            parse_checkpoint_steps(bad, 10)


def test_checkpoint_steps_are_written(digits):
    seen = []
    train(mlp(), digits, steps=12, batch_size=32, checkpoint_steps={0, 1, 2, 7},
          on_checkpoint=lambda s, sd, m: seen.append(s))
    assert seen == [0, 1, 2, 7, 12]


def test_batch_stream_skip_equals_consumed():
    for bs in (3, 4, 10):
        full = batches(10, bs, seed=5)
        drawn = [next(full) for _ in range(9)]
        for skip in range(8):
            assert torch.equal(next(batches(10, bs, seed=5, skip=skip)), drawn[skip])


@pytest.mark.parametrize("kw", [dict(optimizer="sam", momentum=0.9, rho=0.1, weight_decay=1e-3, model="cnn"),
                                dict(optimizer="late-sam", switch_step=3, samckpt="12", condition=0.5),
                                dict(optimizer="sam", samckpt="234", random_mask=True, momentum=0.5)])
def test_resume_equals_an_uninterrupted_run_bit_for_bit(tmp_path, kw):
    from sam_probe.commands.train_cmd import resume_run, write_run

    kw = dict(kw)
    arch = kw.pop("model", "mlp")
    spec = dict(model=arch, model_args={"width": 2} if arch == "cnn" else {"in_dim": 64, "hidden": [8], "out_dim": 10},
                data="digits", max_samples=90, lr=0.1, batch_size=20, seed=3)
    write_run(tmp_path / "whole", steps=9, checkpoint_every=3, **spec, **kw)
    write_run(tmp_path / "first", steps=4, checkpoint_every=4, **spec, **kw)
    resume_run(tmp_path / "rest", tmp_path / "first" / "step_000004.pt", model=None, model_args={}, data=None,
               data_args=None, checkpoint_every=3, steps=9)
    for step in (6, 9):
        a = torch.load(tmp_path / "whole" / f"step_{step:06d}.pt", weights_only=True)
        b = torch.load(tmp_path / "rest" / f"step_{step:06d}.pt", weights_only=True)
        assert set(a["model"]) == set(b["model"])
        assert all(torch.equal(a["model"][n], b["model"][n]) for n in a["model"])
        assert a["metrics"] == b["metrics"] and a["hparams"]["minibatch"] == b["hparams"]["minibatch"]
    assert b["hparams"]["resumed_from"].endswith("step_000004.pt") and b["hparams"]["start_step"] == 4


def test_resume_switches_optimizer_and_reads_a_plain_state_dict(tmp_path):
    from clitools import run_cli

    tiny = ["--model", "mlp", "--model-arg", "in_dim=64", "--model-arg", "hidden=5", "--model-arg", "out_dim=10",
            "--data", "digits", "--max-samples", "60", "--batch-size", "20", "--quiet"]
    assert run_cli("train", tmp_path / "sgd", *tiny, "--steps", "8", "--checkpoint-every", "4").code == 0
    res = run_cli("train", tmp_path / "late", "--resume", tmp_path / "sgd" / "step_000004.pt", "--optimizer", "sam",
                  "--rho", "0.2", "--checkpoint-steps", "4:8:1", "--quiet")
    assert res.code == 0, res.stderr
    late = {s: torch.load(tmp_path / "late" / f"step_{s:06d}.pt", weights_only=True) for s in range(4, 9)}
    sgd4 = torch.load(tmp_path / "sgd" / "step_000004.pt", weights_only=True)
    sgd8 = torch.load(tmp_path / "sgd" / "step_000008.pt", weights_only=True)
    assert all(torch.equal(late[4]["model"][n], sgd4["model"][n]) for n in sgd4["model"])  # starts where SGD was
    assert not torch.equal(late[8]["model"]["net.0.weight"], sgd8["model"]["net.0.weight"])  # then SAM
    assert late[8]["optimizer"] == "sam" and late[8]["hparams"]["lr"] == 0.1 and late[8]["hparams"]["rho"] == 0.2
    # a plain state dict (no hyper-parameters) with the model named on the command line
    torch.save(sgd4["model"], tmp_path / "plain.pt")
    res = run_cli("train", tmp_path / "cont", "--resume", tmp_path / "plain.pt", *tiny, "--steps", "6",
                  "--init-scale", "0.5")
    assert res.code == 0, res.stderr
    first = torch.load(tmp_path / "cont" / "step_000000.pt", weights_only=True)
    assert torch.equal(first["model"]["net.0.weight"], 0.5 * sgd4["model"]["net.0.weight"])
    bad = run_cli("train", tmp_path / "x", "--resume", tmp_path / "plain.pt", "--quiet")
    assert bad.code == 2 and "--model" in bad.stderr


# ------------------------------------------------------------------ masked SAM against a hand-written update
def _hand_step(model, x, y, rho, rule):
    """One full-batch step written out with plain autograd: g, g~ = grad at w + rho g/||g||, r = g~/g."""
    from torch.func import functional_call
    import torch.nn.functional as F

    names = [n for n, _ in model.named_parameters()]
    w = [p.detach().clone() for p in model.parameters()]

    def grad_at(ws):
        ws = [t.clone().requires_grad_(True) for t in ws]
        out = functional_call(model, dict(zip(names, ws)), (x,))
        return torch.cat([t.reshape(-1) for t in torch.autograd.grad(F.cross_entropy(out, y), ws)])

    g = grad_at(w)
    flat = torch.cat([t.reshape(-1) for t in w])
    e = rho * g / g.norm()
    sizes = [t.numel() for t in w]
    gt = grad_at([t.reshape(s.shape) for t, s in zip(torch.split(flat + e, sizes), w)])
    return flat, g, gt, rule(g, gt)


def _category(g, gt):
    r = gt / g
    return torch.where(r > 1, 1, torch.where(r > 0, 2, torch.where(r < -1, 3, 4)))  # C1..C4 (no ties here)


@pytest.mark.parametrize("mode", ["select 12", "scale 234 x0.5", "select 3", "random 1"])
def test_masked_sam_equals_a_hand_written_update(mode):
    from sam_probe.training import mask_generator

    data = load_data("digits", max_samples=40, seed=1)
    torch.manual_seed(0)
    model = build_model("mlp", {"in_dim": 64, "hidden": [4], "out_dim": 10}).double()
    before = build_model("mlp", {"in_dim": 64, "hidden": [4], "out_dim": 10}).double()
    before.load_state_dict(model.state_dict())
    x, y = data.inputs.double(), data.targets
    kind, cats, *c = mode.split()
    wanted = [int(ch) for ch in cats]
    condition = float(c[0][1:]) if c else None

    def rule(g, gt):
        mask = torch.isin(_category(g, gt), torch.tensor(wanted))
        if kind == "random":
            m = torch.zeros_like(mask)
            m[torch.randperm(mask.numel(), generator=mask_generator(7, 0))[:int(mask.sum())]] = True
            assert int(m.sum()) == int(mask.sum()) and not torch.equal(m, mask)
            mask = m
        if condition is None:
            return torch.where(mask, gt, g)  # g~ on the chosen categories, g elsewhere
        return torch.where(mask, gt * condition, gt)  # g~ * c there, g~ elsewhere

    flat, g, gt, d = _hand_step(before, x, y, 0.3, rule)
    train(model, data, optimizer="sam", rho=0.3, lr=0.5, steps=1, batch_size=0, samckpt=cats, condition=condition,
          random_mask=kind == "random", seed=7)
    got = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(got, flat - 0.5 * d, rtol=0, atol=1e-12)
    assert not torch.allclose(d, gt) and not torch.allclose(d, g)  # the mask mattered


# ------------------------------------------------------------------ dominant / bulk projected SGD
@pytest.mark.parametrize("kind", ["dom", "bulk"])
def test_projected_updates_stay_in_the_subspace(kind):
    from sam_probe.training import TrainState

    data = load_data("digits", max_samples=60, seed=0)
    torch.manual_seed(0)
    model = build_model("mlp", {"in_dim": 64, "hidden": [3], "out_dim": 10}).double()
    st = TrainState()
    seen = []
    train(model, data, optimizer="sgd", lr=0.3, steps=5, batch_size=20, momentum=0.5, project=kind, k=3,
          eigen_every=2, eigen_tol=1e-6, checkpoint_every=1, state=st,
          on_checkpoint=lambda s, sd, m: seen.append((s, {n: sd[n] for n, _ in model.named_parameters()},
                                                      None if st.projector is None else st.projector.clone(), m)))
    steps_with_new = [m.get("projector_step") for _, _, _, m in seen]
    assert steps_with_new[1:] == [0, 0, 2, 2, 4]  # recomputed every 2 steps
    for (s0, w0, _, _), (s1, w1, V, _) in zip(seen, seen[1:]):
        dw = torch.cat([(w1[n] - w0[n]).reshape(-1) for n in w0])
        inside = V @ (V.T @ dw)
        off = dw - inside if kind == "dom" else inside
        assert float(dw.norm()) > 0 and float(off.norm()) <= 1e-10 * float(dw.norm())
    # the projector is the top-3 space of the dense Hessian of the full training loss at its step
    from sam_probe.core.objective import Objective

    obj = Objective(model, data.inputs, data.targets, "ce", bn_mode="train",
                    params={n: seen[4][1][n] for n in seen[4][1]})
    P = obj.n_params
    H = torch.stack([obj.hvp(torch.eye(P, dtype=torch.float64)[i]) for i in range(P)])
    evals, evecs = torch.linalg.eigh((H + H.T) / 2)
    U = evecs[:, -3:]
    V = seen[5][2]  # recomputed at step 4
    assert float(torch.linalg.matrix_norm(U.T @ V) ** 2 / 3) > 1 - 1e-6
    assert seen[5][3]["projector_eigenvalues"] == pytest.approx(sorted(evals[-3:].tolist(), reverse=True), rel=1e-6)


def test_projection_and_mask_option_checks(digits):
    with pytest.raises(SpecError, match="dom or bulk"):
        train(mlp(), digits, project="top", steps=1)
    with pytest.raises(SpecError, match="random-mask needs --samckpt"):
        train(mlp(), digits, optimizer="sam", random_mask=True, steps=1)
    with pytest.raises(SpecError, match="after --steps"):
        from sam_probe.training import TrainState
        train(mlp(), digits, steps=2, start=TrainState(step=5))
