"""Loss terms, dict batches and streamed sources: every loss is chunk-invariant and token-weighted exactly."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sam_probe.core.batches import DatasetBatches, StreamBatches, TensorBatches
from sam_probe.core.losses import LossError
from sam_probe.core.objective import Objective
from sam_probe.core.perturb import perturbed_gradient, sam_sharpness

V, T, N = 7, 5, 9


class TinyForCausalLM(nn.Module):
    """Embedding -> tanh -> Linear over the vocabulary; takes input_ids/attention_mask (and labels).

    Named like transformers' causal LMs, whose own loss shifts the labels (so ``loss='model'`` counts
    predicted tokens)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(V, 3)
        self.mix = nn.Linear(3, 3)
        self.head = nn.Linear(3, V)

    def forward(self, input_ids, attention_mask=None, labels=None):
        h = torch.tanh(self.mix(self.emb(input_ids)))
        h = h.cumsum(1) / torch.arange(1, input_ids.shape[1] + 1, device=h.device).view(1, -1, 1)  # causal mix
        logits = self.head(h)
        out = {"logits": logits}
        if labels is not None:  # a causal LM's own loss: mean over predicted tokens
            out["loss"] = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)
        return out


def tokens():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (N, T), generator=g)
    mask = torch.ones(N, T, dtype=torch.long)
    for i, l in enumerate(torch.randint(2, T + 1, (N,), generator=g).tolist()):
        mask[i, l:] = 0  # ragged lengths: chunks hold different token counts
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    return {"input_ids": ids, "attention_mask": mask}, labels


def lm_reference(model, batch, labels) -> torch.Tensor:
    """Mean next-token CE over all predicted tokens of the selection, written out."""
    logits = model(**batch)["logits"].double()
    lg, lb = logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1)
    keep = lb != -100
    return F.cross_entropy(lg[keep], lb[keep], reduction="sum") / keep.sum()


def per_token(out, y):
    """A user loss: per-token CE with its mask (tokens weighted like lm, no shift)."""
    ce = F.cross_entropy(out.transpose(1, 2), y.clamp_min(0), reduction="none")
    return ce, (y != -100)


def per_sample(out, y):
    """A user loss: one value per sample (mean CE over its tokens)."""
    ce, m = per_token(out, y)
    return (ce * m).sum(1) / m.sum(1)


def objectives(loss, chunk, source="memory"):
    model = TinyForCausalLM().double()
    batch, labels = tokens()
    x = {**batch, "labels": labels}
    if source == "memory":
        data = TensorBatches(x)
    else:
        items = [{k: v[i] for k, v in x.items()} for i in range(N)]
        data = DatasetBatches(items) if source == "dataset" else StreamBatches(items, N)
    return Objective(model, data, None, loss, dtype=torch.float64, chunk_size=chunk), model, batch, labels


@pytest.mark.parametrize("loss", ["lm", "model", "ce", per_token, per_sample])
@pytest.mark.parametrize("source", ["memory", "dataset", "stream"])
def test_chunked_equals_unchunked_and_token_weighted(loss, source):
    whole, *_ = objectives(loss, None)
    v = torch.randn(whole.n_params, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref = (whole.loss(), whole.grad_flat(), whole.hvp_block(v))
    for chunk in (1, 2, 4):
        o, *_ = objectives(loss, chunk, source)
        assert o.loss() == pytest.approx(ref[0], rel=1e-12)
        torch.testing.assert_close(o.grad_flat(), ref[1], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(o.hvp_block(v), ref[2], rtol=1e-10, atol=1e-12)


def test_lm_is_next_token_mean_and_the_models_own_loss():
    lm, model, batch, labels = objectives("lm", 4)
    own, *_ = objectives("model", 2)
    exact = lm_reference(model, batch, labels).item()
    assert lm.loss() == pytest.approx(exact, rel=1e-12) and own.loss() == pytest.approx(exact, rel=1e-12)
    assert lm.denominator == int((labels[:, 1:] != -100).sum())  # predicted tokens, not samples
    assert lm.evaluate()[1] is not None  # next-token accuracy
    # token-only data: lm takes its targets from the ids and the attention mask
    only = Objective(TinyForCausalLM().double(), TensorBatches(batch), None, "lm", dtype=torch.float64, chunk_size=3)
    assert only.loss() == pytest.approx(exact, rel=1e-12)
    assert Objective(TinyForCausalLM(), TensorBatches(batch), None).loss_name == "lm"  # the default without targets


def test_integer_inputs_keep_their_dtype_and_labels_are_not_passed_unless_model_loss():
    seen = []

    class Spy(TinyForCausalLM):
        def forward(self, input_ids, attention_mask=None, labels=None):
            seen.append((input_ids.dtype, attention_mask.dtype, labels is not None))
            return super().forward(input_ids, attention_mask, labels)

    batch, labels = tokens()
    for loss, passed in (("lm", False), ("model", True)):
        seen.clear()
        Objective(Spy(), TensorBatches({**batch, "labels": labels, "text_id": labels[:, 0]}), None, loss,
                  dtype=torch.float64).loss()
        assert seen == [(torch.int64, torch.int64, passed)]


def test_m_sharpness_weights_are_token_counts():
    """Sub-batches of a token loss are weighted by their predicted tokens, so m = N equals the whole batch."""
    obj, *_ = objectives("lm", None)
    one = perturbed_gradient(obj, rho=0.05, m=None)
    whole = perturbed_gradient(obj, rho=0.05, m=N)
    torch.testing.assert_close(whole.grad, one.grad)
    pg = perturbed_gradient(obj, rho=0.05, m=3)
    subs = [obj.subset(torch.arange(s, min(s + 3, N))) for s in range(0, N, 3)]
    assert sum(s.denominator for s in subs) == obj.denominator
    g = sum(s.grad_flat() * (s.denominator / obj.denominator) for s in subs)
    torch.testing.assert_close(pg.grad, g)  # term-weighted mean of the sub-batch gradients = the full gradient
    torch.testing.assert_close(pg.grad, one.grad, rtol=1e-10, atol=1e-12)
    assert sam_sharpness(obj, 0.05, m=3) > 0


def test_user_loss_errors_are_one_line():
    model = TinyForCausalLM().double()
    batch, labels = tokens()
    mean = Objective(model, TensorBatches({**batch, "labels": labels}), None,
                     lambda out, y: F.cross_entropy(out.transpose(1, 2), y.clamp_min(0)))
    with pytest.raises(LossError, match="one loss per sample"):
        mean.loss()
    with pytest.raises(LossError, match="takes no labels"):
        Objective(nn.Linear(3, 2), torch.randn(4, 3), torch.zeros(4, dtype=torch.long), "model").loss()


def test_stream_rereads_and_detects_a_shrinking_iterable():
    class Shrinks:
        def __init__(self):
            self.passes = 0

        def __iter__(self):
            self.passes += 1
            n = 6 if self.passes == 1 else 4
            return iter([(torch.ones(2) * i, i % 2) for i in range(n)])

    s = StreamBatches(Shrinks(), 6)
    x, y = next(s.slices(0, 6, 6))
    assert x[:, 0].tolist() == [0, 1, 2, 3, 4, 5] and y.tolist() == [0, 1, 0, 1, 0, 1]
    with pytest.raises(ValueError, match="same items on every pass"):
        list(s.slices(0, 6, 6))
    sub = StreamBatches([(torch.ones(1) * i, 0) for i in range(10)], 10).take(torch.tensor([7, 2, 5]))
    assert torch.cat([c[0] for c in sub.slices(0, 3, 2)])[:, 0].tolist() == [2, 5, 7]


def test_core_errors_are_neutral_and_render_as_flags_only_on_the_command_line():
    """Core messages name settings by option/value (Python names in a notebook, flags in the CLI's style)."""
    from sam_probe import errors

    float_ids = Objective(TinyForCausalLM(), TensorBatches({"input_ids": torch.rand(3, T)}), None, "lm")
    with pytest.raises(LossError) as info:
        float_ids.loss()
    assert str(info.value).startswith("loss='lm': needs integer token ids") and "--" not in str(info.value)
    with errors.style(errors.CLI):
        assert str(info.value).startswith("--loss lm: needs integer token ids")


def test_no_core_exception_message_names_a_command_line_flag():
    """A static check: no string inside a ``raise`` of sam_probe/core names a ``--flag``."""
    import ast
    import re
    from pathlib import Path

    core = Path(__file__).resolve().parents[2] / "sam_probe" / "core"
    bad = []
    for path in sorted(core.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Raise) and node.exc is not None:
                for sub in ast.walk(node.exc):
                    if isinstance(sub, ast.Constant) and isinstance(sub.value, str) \
                            and re.search(r"(?<![\w-])--[a-z]", sub.value):
                        bad.append(f"{path.name}:{node.lineno}: {sub.value[:60]}")
    assert not bad, bad
