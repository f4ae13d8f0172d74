"""Hugging Face runs end to end against an independent float64 reference.

The reference rebuilds each model with eager attention, loads the saved weights
with transformers' own loader, and differentiates the model's own ``labels=``
loss with plain autograd (``torch.autograd.functional.hessian``: a dense
Hessian, every model here has < 300 parameters).  sam-probe runs through the CLI
(default SDPA attention, run through the math backend for HVPs).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.func import functional_call

pytest.importorskip("transformers")
pytestmark = pytest.mark.slow  # Hugging Face models end to end (pytest -m "not slow" skips it)

import hftiny  # noqa: E402
from clitools import run_cli  # noqa: E402
from sam_probe.core.categories import categorize, counts  # noqa: E402


def _next_token_ce(out, batch):
    """Next-token cross-entropy written out (float64; HF's own loss upcasts logits to float32 only)."""
    logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def _reference(folder, cls, batch, loss_of=lambda out, batch: out.loss, hessian=True):
    """``(loss, dense Hessian, gradient fn, w)`` of the model's loss at the saved weights (float64, eager)."""
    m = cls.from_pretrained(folder, attn_implementation="eager", local_files_only=True).double().eval()
    names = [n for n, _ in m.named_parameters()]
    shapes = [p.shape for _, p in m.named_parameters()]
    w0 = torch.cat([p.detach().reshape(-1) for p in m.parameters()])

    def f(w):
        d, o = {}, 0
        for n, s in zip(names, shapes):
            d[n] = w[o:o + s.numel()].reshape(s)
            o += s.numel()
        return loss_of(functional_call(m, d, (), batch), batch)

    def g(w):
        w = w.detach().clone().requires_grad_(True)
        return torch.autograd.grad(f(w), w)[0]

    H = torch.autograd.functional.hessian(f, w0, vectorize=True) if hessian else None
    return f(w0).item(), H, g, w0


@pytest.fixture(scope="module")
def bert_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    run = hftiny.write_trainer_run(root / "trainer", hftiny.bert, steps=(2, 4), data=hftiny.token_batch(10))
    return run


@pytest.fixture(scope="module")
def gpt_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt")
    hftiny.perturb(hftiny.gpt2(), 0.3).save_pretrained(root / "gpt")
    torch.save(hftiny.token_batch(10, labels=None), root / "tokens.pt")  # token-only: {'input_ids', 'attention_mask'}
    return root


def test_trainer_run_sharpness_matches_dense_reference(bert_run, tmp_path):
    from transformers import BertForSequenceClassification

    res = run_cli("sharpness", bert_run, "--data", bert_run / "data.pt", "--top-k", "3", "--tol", "1e-9",
                  "--dtype", "float64", "--rho", "0.05", "--out", tmp_path, "--json")
    assert res.code == 0, res.stderr
    assert "math scaled-dot-product backend" in res.stderr  # the one-line note
    results = res.json()["results"]
    assert [r["step"] for r in results] == [2, 4]  # from trainer_state.json
    batch = torch.load(bert_run / "data.pt")
    for r in results:
        loss, H, g, w0 = _reference(r["path"], BertForSequenceClassification, batch)
        exact = torch.linalg.eigvalsh(H).flip(0)[:3]
        np.testing.assert_allclose(r["eigenvalues"], exact.numpy(), rtol=1e-7)
        assert r["loss"] == pytest.approx(loss, rel=1e-10)
        e = 0.05 * g(w0) / g(w0).norm()
        ref_sharp = _reference_loss_at(r["path"], batch, w0 + e) - loss
        assert r["sam_sharpness"] == pytest.approx(ref_sharp, rel=1e-7)


def _reference_loss_at(folder, batch, w):
    from transformers import BertForSequenceClassification

    m = BertForSequenceClassification.from_pretrained(folder, attn_implementation="eager",
                                                      local_files_only=True).double().eval()
    torch.nn.utils.vector_to_parameters(w, m.parameters())
    with torch.no_grad():
        return m(**batch).loss.item()


def test_trainer_run_ratio_counts_match_reference(bert_run, tmp_path):
    from transformers import BertForSequenceClassification

    res = run_cli("ratios", bert_run / "checkpoint-4", "--data", bert_run / "data.pt", "--rho", "0.05",
                  "--dtype", "float64", "--out", tmp_path, "--json")
    assert res.code == 0, res.stderr
    r = res.json()["results"][0]
    _, _, g, w0 = _reference(bert_run / "checkpoint-4", BertForSequenceClassification, torch.load(bert_run / "data.pt"),
                             hessian=False)
    g0 = g(w0)
    gt = g(w0 + 0.05 * g0 / g0.norm())
    assert r["counts"] == counts(categorize(g0, gt)) and r["n_params"] == w0.numel()
    assert r["grad_norm"] == pytest.approx(g0.norm().item(), rel=1e-9)


def test_causal_lm_loss_and_curvature_from_token_only_data(gpt_dir, tmp_path):
    from transformers import GPT2LMHeadModel

    res = run_cli("sharpness", gpt_dir / "gpt", "--data", gpt_dir / "tokens.pt", "--top-k", "2", "--tol", "1e-9",
                  "--dtype", "float64", "--rho", "0", "--out", tmp_path, "--json")
    assert res.code == 0, res.stderr
    r = res.json()["results"][0]
    batch = torch.load(gpt_dir / "tokens.pt")
    labels = torch.where(batch["attention_mask"].bool(), batch["input_ids"], torch.full_like(batch["input_ids"], -100))
    loss, H, _, _ = _reference(gpt_dir / "gpt", GPT2LMHeadModel, {**batch, "labels": labels}, _next_token_ce)
    own = _reference(gpt_dir / "gpt", GPT2LMHeadModel, {**batch, "labels": labels}, hessian=False)[0]
    assert r["loss"] == pytest.approx(loss, rel=1e-12)  # lm (default for causal LMs): next-token CE
    assert r["loss"] == pytest.approx(own, rel=1e-6)  # = the model's own labels= loss (computed in float32 there)
    np.testing.assert_allclose(r["eigenvalues"], torch.linalg.eigvalsh(H).flip(0)[:2].numpy(), rtol=1e-7)
    # the same through --loss model with the labels in the batch, in chunks of 3 sequences (token-weighted)
    torch.save({**batch, "labels": labels}, gpt_dir / "labelled.pt")
    res = run_cli("sharpness", gpt_dir / "gpt", "--data", gpt_dir / "labelled.pt", "--loss", "model", "-b", "3",
                  "--top-k", "1", "--tol", "1e-6", "--dtype", "float64", "--rho", "0", "--no-store", "--json")
    assert res.code == 0, res.stderr
    m = res.json()["results"][0]
    assert m["loss"] == pytest.approx(own, rel=1e-6)  # chunk means of float32 losses, token-weighted
    assert m["eigenvalues"][0] == pytest.approx(r["eigenvalues"][0], rel=1e-5)  # float32 loss inside the model


def test_every_analysis_runs_on_a_trainer_run(bert_run, tmp_path):
    data = ["--data", bert_run / "data.pt", "--out", tmp_path, "--json"]
    ov = run_cli("overlap", bert_run, "--rho", "0.05", *data)
    assert ov.code == 0, ov.stderr
    assert ov.json()["steps"] == [2, 4]
    al = run_cli("alignment", bert_run / "checkpoint-4", "--k", "2", *data)
    assert al.code == 0, al.stderr
    assert 0 <= al.json()["results"][0]["chi"]["full"] <= 1
    it = run_cli("interpolate", bert_run / "checkpoint-2", bert_run / "checkpoint-4", "--points", "3", "--range", "0,1", *data)
    assert it.code == 0, it.stderr
    loss_a = run_cli("sharpness", bert_run / "checkpoint-2", "--top-k", "0", "--rho", "0", *data).json()
    assert it.json()["loss"][0] == pytest.approx(loss_a["results"][0]["loss"], rel=1e-6)  # alpha = 0
    ds = run_cli("distance", bert_run, "--out", tmp_path, "--json")
    assert ds.code == 0 and ds.json()["steps"] == [2, 4]
    ft = run_cli("features", bert_run, *data)
    assert ft.code == 2 and "features needs in-memory tensor inputs" in ft.stderr and "Traceback" not in ft.stderr
    for curvature in ("hessian", "ggn"):
        sub = run_cli("subspace", bert_run, "--k", "2", "--curvature", curvature, *data)
        assert sub.code == 0, sub.stderr
        r = sub.json()
        assert r["steps"] == [2, 4] and r["curvature"] == curvature and 0 <= r["previous"][1] <= 1 + 1e-9
    sh = run_cli("sharpness", bert_run, "--top-k", "2", "--curvature", "ggn", "--per-layer", "module", "--rho", "0.05",
                 "--worst-case", "--ascent-steps", "3", *data)
    assert sh.code == 0, sh.stderr
    for r in sh.json()["results"]:
        assert r["curvature"] == "ggn" and r["per_layer"] and r["worst_case_sharpness"] >= r["sam_sharpness"] - 1e-7


def test_model_that_does_not_take_the_data_is_one_line(bert_run, tmp_path):
    res = run_cli("sharpness", bert_run / "checkpoint-2", "--data", "digits", "--max-samples", "4", "--no-store")
    assert res.code == 2 and "does not accept the data" in res.stderr and "Traceback" not in res.stderr


def test_sharded_and_bin_folders_and_class_override(tmp_path):
    model = hftiny.perturb(hftiny.bert())
    model.save_pretrained(tmp_path / "sharded", max_shard_size="1KB")
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "sharded" / "config.json").read_text())
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")  # read with weights_only=True
    torch.save(hftiny.token_batch(6), tmp_path / "d.pt")
    args = ["--data", tmp_path / "d.pt", "--top-k", "0", "--rho", "0", "--no-store", "--json"]
    losses = [run_cli("sharpness", tmp_path / "sharded", *args), run_cli("sharpness", tmp_path / "bin", *args),
              run_cli("sharpness", tmp_path / "sharded", *args, "--model", "hf:BertForSequenceClassification")]
    assert all(r.code == 0 for r in losses), [r.stderr for r in losses]
    assert len({r.json()["results"][0]["loss"] for r in losses}) == 1
    bad = run_cli("sharpness", tmp_path / "sharded", "--data", tmp_path / "d.pt", "--model", "hf:os", "--no-store")
    assert bad.code == 2 and "not a transformers model class" in bad.stderr
    # the classifier's 'bert.' prefix is inferred for the bare encoder, whose outputs do not fit class labels
    base = run_cli("sharpness", tmp_path / "sharded", "--data", tmp_path / "d.pt", "--model", "hf:BertModel",
                   "--no-store")
    assert base.code == 2 and "does not accept the data" in base.stderr


ONCE = '''import torch
class Cube(torch.autograd.Function):
    generate_vmap_rule = True
    @staticmethod
    def forward(x):
        return x ** 3
    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0]); ctx.save_for_forward(inputs[0])
    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return BACKWARD
    @staticmethod
    def jvp(ctx, t):
        (x,) = ctx.saved_tensors
        return 3 * x * x * t
class CubeGrad(torch.autograd.Function):
    """3 x^2 g with a forward-mode derivative but no reverse one (like ops PyTorch lacks formulas for)."""
    generate_vmap_rule = True
    @staticmethod
    def forward(x, g):
        return 3 * x * x * g
    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_forward(*inputs)
    @staticmethod
    def backward(ctx, gg):
        raise RuntimeError("the derivative for 'cube_grad' is not implemented.")
    @staticmethod
    def jvp(ctx, tx, tg):
        x, g = ctx.saved_tensors
        return 6 * x * tx * g + 3 * x * x * tg
class Net(torch.nn.Module):
    def __init__(self):
        super().__init__(); self.lin = torch.nn.Linear(3, 2)
    def forward(self, x):
        return Cube.apply(self.lin(x))
def net():
    return Net()
'''


def _once_case(tmp_path, backward: str, once: bool = False):
    src = ONCE.replace("BACKWARD", backward)
    if once:
        src = src.replace("    def backward(ctx, g):", "    @torch.autograd.function.once_differentiable\n"
                                                       "    def backward(ctx, g):")
    (tmp_path / "onceop.py").write_text(src)
    torch.manual_seed(0)
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    torch.save({"inputs": x, "targets": y}, tmp_path / "d.pt")
    lin = torch.nn.Linear(3, 2)
    torch.save({"lin." + k: v for k, v in lin.state_dict().items()}, tmp_path / "ck.pt")
    common = ["--model", f"{tmp_path / 'onceop.py'}:net", "--data", tmp_path / "d.pt", "--dtype", "float64",
              "--top-k", "2", "--tol", "1e-9", "--rho", "0", "--no-store"]

    def f(w):
        W, b = w[:6].reshape(2, 3), w[6:]
        return torch.nn.functional.cross_entropy((x.double() @ W.T + b) ** 3, y)

    w0 = torch.cat([lin.weight.detach().reshape(-1), lin.bias.detach()]).double()
    return common, torch.linalg.eigvalsh(torch.autograd.functional.hessian(f, w0)).flip(0)[:2].numpy()


def test_fwd_rev_option_for_an_op_without_double_backward(tmp_path):
    """rev-rev names the op without a second reverse derivative and suggests --hvp fwd-rev, which is exact."""
    common, exact = _once_case(tmp_path, "CubeGrad.apply(x, g)")
    bad = run_cli("sharpness", tmp_path / "ck.pt", *common)
    assert bad.code == 2 and "cube_grad" in bad.stderr and "--hvp fwd-rev" in bad.stderr, bad.stderr
    assert "Traceback" not in bad.stderr
    ok = run_cli("sharpness", tmp_path / "ck.pt", *common, "--hvp", "fwd-rev", "--json")
    assert ok.code == 0, ok.stderr
    np.testing.assert_allclose(ok.json()["results"][0]["eigenvalues"], exact, rtol=1e-7)
    assert run_cli("sharpness", tmp_path / "ck.pt", *common, "--hvp", "fwd").code == 2


@pytest.mark.parametrize("hvp", ["rev-rev", "fwd-rev"])
def test_once_differentiable_is_refused_not_read_as_zero_curvature(tmp_path, hvp):
    common, _ = _once_case(tmp_path, "3 * x * x * g", once=True)
    res = run_cli("sharpness", tmp_path / "ck.pt", *common, "--hvp", hvp)
    assert res.code == 2 and "Cube" in res.stderr and "once_differentiable" in res.stderr, res.stderr
